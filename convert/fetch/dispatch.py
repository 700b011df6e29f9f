"""`fetch_bytes`: one item's bytes from a local path, file://, http(s):// or any fsspec URL."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from ..specs import ItemError, Status
from .errors import redact_url, to_item_error
from .http import fetch_http
from .policy import FetchPolicy
from .resilient import open_resilient
from .sources import scheme_of


def _too_large(uri: str, cap: int, size: int | None = None) -> ItemError:
    what = f"{size} bytes" if size is not None else "more bytes"
    return ItemError(Status.TOO_LARGE, f"{redact_url(uri)}: {what} than the cap of {cap}")


def _local_path(uri: str) -> str:
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ItemError(Status.BAD_URL, f"{redact_url(uri)}: file:// URL with a remote host")
    return unquote(parts.path)


def _fetch_local(uri: str, policy: FetchPolicy) -> bytes:
    path = _local_path(uri)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > policy.max_bytes:
                raise _too_large(uri, policy.max_bytes, size)
            data = f.read(policy.max_bytes + 1)  # the file may grow after fstat
    except FileNotFoundError:
        raise ItemError(Status.NOT_FOUND, f"{path}: no such file") from None
    except PermissionError:
        raise ItemError(Status.FORBIDDEN, f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ItemError(Status.ERROR, f"{path}: is a directory") from None
    if len(data) > policy.max_bytes:
        raise _too_large(uri, policy.max_bytes)
    return data


def _fetch_fsspec(uri: str, policy: FetchPolicy) -> bytes:
    try:
        with open_resilient(
            uri,
            policy.storage_options,
            timeout=policy.timeout,
            max_stalled_resumes=policy.retries,
            backoff=policy.backoff,
        ) as f:
            if f.size is not None and f.size > policy.max_bytes:
                raise _too_large(uri, policy.max_bytes, f.size)
            data = f.read(policy.max_bytes + 1)
    except ItemError:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend error becomes a per-item status
        raise to_item_error(exc, uri) from None
    if len(data) > policy.max_bytes:
        raise _too_large(uri, policy.max_bytes)
    return data


def fetch_bytes(uri: str, policy: FetchPolicy) -> bytes:
    """The bytes of one item, or ItemError(Status.X, message naming the redacted URL).

    Local paths and file:// are read directly; http(s) goes through the pooled urllib3 client
    with retries; other fsspec schemes (s3://, memory://, gs://...) through the resilient reader
    with `policy.storage_options`. Schemes outside `policy.allowed_schemes` are BAD_URL.
    """
    scheme = scheme_of(uri)
    if scheme not in policy.allowed_schemes:
        raise ItemError(Status.BAD_URL, f"{redact_url(uri)}: scheme {scheme!r} is not allowed")
    if scheme == "file":
        return _fetch_local(uri, policy)
    if scheme in ("http", "https"):
        return fetch_http(uri, policy)
    return _fetch_fsspec(uri, policy)
