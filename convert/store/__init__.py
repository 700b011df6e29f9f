"""The storage seam: `open_store(uri, options)` -> a `Store` for a dataset root (local, S3, any fsspec URL).

    store = open_store("s3://bucket/out", {"profile": "x"})
    store.write_bytes("manifest.json", data)          # atomic
    store.publish(tmp, "shards/shard-00000.h5", size, sha256, guard=...)

`open_store` is the one factory and the one `url_to_fs` call of the package; `open_object`
splits an object URL into (store of its bucket / filesystem, relative path) for readers of
single objects (the resilient reader). `is_local(uri)` is the one local-vs-remote rule and
`scheme_of(uri)` the one URL-scheme rule. Stores are cached per (process id, uri, options): a
forked child (a DataLoader worker, a Dask nanny's process) never reuses its parent's instance or
connection pool (s3fs is not fork-safe). `${VAR}` / `${secret:id}` references in the options
are resolved once, when the store is built.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..backends import missing_backend
from ..secrets import resolve_options
from . import base
from .base import (
    PARTIAL,
    Entry,
    Guard,
    PreconditionFailed,
    RangeStream,
    StorageError,
    Store,
    entry_of,
    file_digest,
    first_line,
    has_scheme,
    is_local,
    reopen,
    scheme_of,
    tree_digest,
)
from .generic import FsspecStore, fs_url
from .local import LocalStore, atomic_write
from .s3 import S3Store

__all__ = [
    "PARTIAL",
    "Entry",
    "FsspecStore",
    "Guard",
    "LocalStore",
    "PreconditionFailed",
    "RangeStream",
    "S3Store",
    "StorageError",
    "Store",
    "atomic_write",
    "entry_of",
    "file_digest",
    "first_line",
    "fs_url",
    "has_scheme",
    "is_local",
    "open_object",
    "open_store",
    "preflight",
    "scheme_of",
    "tree_digest",
]


def open_store(uri: str, options: dict[str, Any] | None = None, role: str = "output") -> Store:
    """The store rooted at `uri`, built once per process; local paths become absolute."""
    return reopen(uri, options, role)


def _build(uri: str, options: dict[str, Any], role: str) -> Store:
    resolved = resolve_options(options, f"{role}.storage_options")
    try:
        fs, root = fsspec.core.url_to_fs(uri, **resolved)
    except (ImportError, ValueError) as exc:
        if missing := missing_backend(uri):
            raise StorageError(f"{role}.uri {uri}: {missing}") from None
        raise StorageError(
            f"{role}.uri {uri}: cannot open ({first_line(exc)}); check the URL scheme "
            f"(pip install the fsspec backend it needs) and {role}.storage_options"
        ) from None
    if isinstance(fs, LocalFileSystem):
        return LocalStore(uri, options, fs, os.path.abspath(root))
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" in protocols or "s3a" in protocols:
        return S3Store(uri, options, fs, root)
    return FsspecStore(uri, options, fs, root)


base._BUILDERS[:] = [_build]


def open_object(url: str, options: dict[str, Any] | None = None, role: str = "source") -> tuple[Store, str]:
    """(store, relative path) for one object URL. The store is rooted at the URL's bucket or
    host ("s3://bucket"), or at "/" for local paths, so reading many objects opens few stores."""
    if is_local(url):
        path = url.split("://", 1)[1] if "://" in url else url.removeprefix("file:")
        path = os.path.abspath(path)
        return open_store("/", options, role), path.lstrip("/")
    if "://" not in url:
        raise StorageError(f"{url[:80]}: not an object URL; write it as scheme://bucket/key")
    scheme, rest = url.split("://", 1)
    container, _, rel = rest.partition("/")
    return open_store(f"{scheme}://{container}", options, role), rel


def preflight(uri: str, options: dict[str, Any] | None, role: str) -> Store:
    """open_store + Store.preflight(role): one-line StorageError naming the uri and the fix."""
    store = open_store(uri, options, role)
    store.preflight(role)
    return store
