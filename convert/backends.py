"""Which package an fsspec URL scheme needs: a one-line error naming the pip command, never a bare
"No module named ..." (s3fs and pyarrow are default dependencies; gs:// and az:// are extras).

    missing_backend("gs://bucket/out")   # -> "gs:// needs gcsfs: pip install gcsfs" (or the extra convert[gcs])
"""

from __future__ import annotations

import importlib.util

from fsspec.core import split_protocol

#: scheme -> (module to import, pip package, the convert extra that installs it or "")
PACKAGES: dict[str, tuple[str, str, str]] = {
    "s3": ("s3fs", "s3fs", ""),
    "s3a": ("s3fs", "s3fs", ""),
    "gs": ("gcsfs", "gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcsfs", "gcs"),
    "az": ("adlfs", "adlfs", "azure"),
    "abfs": ("adlfs", "adlfs", "azure"),
    "abfss": ("adlfs", "adlfs", "azure"),
    "hf": ("huggingface_hub", "huggingface_hub", ""),
    "sftp": ("paramiko", "paramiko", ""),
    "ssh": ("paramiko", "paramiko", ""),
    "webdav": ("webdav4", "webdav4", ""),
    "oci": ("ocifs", "ocifs", ""),
}


def missing_backend(uri: str) -> str | None:
    """What to install for `uri`'s scheme when its backend cannot be imported here; None if nothing is missing."""
    scheme = (split_protocol(uri)[0] or "").lower()
    if scheme not in PACKAGES:
        return None
    module, package, _extra = PACKAGES[scheme]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{scheme}:// needs {package}: pip install {package}"  # no [extra]: terminals' markup eats brackets
