"""`fetch_bytes`: one item's bytes from a local path, file://, http(s):// or any fsspec URL.

Every item has a deadline (`policy.item_timeout`, seconds, covering connect, every read and every
retry); local items must be regular files under the allowed roots, checked before and after
open() (O_NONBLOCK, so a FIFO swapped in between cannot block the open either).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import time
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from ..specs import ItemError, Status
from .curl import curl_fetch
from .errors import redact_url, to_item_error
from .http import fetch_http
from .policy import FetchPolicy
from .resilient import open_resilient
from .retry import check_deadline
from .sources import scheme_of


def _too_large(uri: str, cap: int, size: int | None = None) -> ItemError:
    what = f"{size} bytes" if size is not None else "more bytes"
    return ItemError(Status.TOO_LARGE, f"{redact_url(uri)}: {what} than the cap of {cap}")


def _local_path(uri: str) -> str:
    if not uri[:5].lower() == "file:":
        return uri
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ItemError(Status.BAD_URL, f"{redact_url(uri)}: file:// URL with a remote host")
    return unquote(parts.path)


def _check_root(path: str, uri: str, policy: FetchPolicy) -> str:
    """The resolved path, if local reads are allowed and it lies under an allowed root."""
    if not policy.allow_local:
        raise ItemError(Status.BAD_URL, f"{redact_url(uri)}: local paths are not allowed in a remote URL list")
    if policy.local_roots is None:  # anywhere (a folder we listed ourselves): no need to resolve links
        return path
    real = os.path.realpath(path)
    if not any(
        real == root or real.startswith(root.rstrip(os.sep) + os.sep)
        for root in map(os.path.realpath, policy.local_roots)
    ):
        raise ItemError(
            Status.BAD_URL,
            f"{redact_url(uri)}: outside the URL list's directory; add its folder to source.allowed_roots to allow it",
        )
    return real


def _not_regular(path: str, mode: int) -> ItemError:
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device or special file"
    return ItemError(Status.BAD_URL, f"{path}: not a regular file ({kind}); refused")


def _fetch_local(uri: str, policy: FetchPolicy) -> bytes:
    path = _local_path(uri)
    real = _check_root(path, uri, policy)
    try:
        st = os.stat(real)
        if stat.S_ISDIR(st.st_mode):
            raise ItemError(Status.ERROR, f"{path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)  # before open(): opening a FIFO blocks, a device may too
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with open(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped for something else since the stat
                raise _not_regular(path, st.st_mode)
            if st.st_size > policy.max_bytes:
                raise _too_large(uri, policy.max_bytes, st.st_size)
            # read what fstat saw plus one byte (a 50 MB buffer per item costs ~60 us to map and
            # shrink); a file that grew since is read on, up to one byte past the cap
            data = f.read(min(st.st_size, policy.max_bytes) + 1)
            if len(data) > st.st_size:
                data += f.read(policy.max_bytes + 1 - len(data))
    except FileNotFoundError:
        raise ItemError(Status.NOT_FOUND, f"{path}: no such file") from None
    except PermissionError:
        raise ItemError(Status.FORBIDDEN, f"{path}: permission denied") from None
    except OSError as exc:  # ENXIO (socket), EIO, ...: never quote the file, only the error
        raise ItemError(Status.ERROR, f"{path}: cannot read ({os.strerror(exc.errno or 0)})") from None
    if len(data) > policy.max_bytes:
        raise _too_large(uri, policy.max_bytes)
    return data


FSSPEC_CHUNK = 4 * 2**20  # object-store reads between deadline checks


def _fetch_fsspec(uri: str, policy: FetchPolicy, deadline: float) -> bytes:
    """Object stores and other fsspec URLs: each operation bounded by min(timeout, item_timeout),
    the deadline checked between chunked reads (so the item ends within item_timeout + timeout)."""
    op_timeout = min(policy.timeout, policy.item_timeout)
    chunks: list[bytes] = []
    try:
        with open_resilient(
            uri,
            policy.storage_options,
            timeout=op_timeout,
            max_stalled_resumes=policy.retries,
            backoff=policy.backoff,
        ) as f:
            if f.size is not None and f.size > policy.max_bytes:
                raise _too_large(uri, policy.max_bytes, f.size)
            got = 0
            while got <= policy.max_bytes:
                check_deadline(uri, deadline, policy)
                chunk = f.read(min(FSSPEC_CHUNK, policy.max_bytes + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
    except ItemError:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend error becomes a per-item status
        raise to_item_error(exc, uri) from None
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) > policy.max_bytes:
        raise _too_large(uri, policy.max_bytes)
    return data


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def has_control(uri: str) -> bool:
    """A URL or path holding a control character (NUL, CR/LF, tab...): no backend can take it (NUL
    ends a C string, CR/LF would inject a header line), so it is the item's bad_url."""
    return _CONTROL.search(uri) is not None


def fetch_bytes(uri: str, policy: FetchPolicy) -> bytes:
    """The bytes of one item, or ItemError(Status.X, message naming the redacted URL).

    Local paths and file:// are read directly; http(s) goes through the HTTP backend the policy
    chose once (`policy.uses_curl`: libcurl, curl.py, else the pooled urllib3 client, http.py),
    with retries; other fsspec schemes (s3://, memory://, gs://...) through the resilient reader
    with `policy.storage_options`. Schemes outside `policy.allowed_schemes` are BAD_URL.
    """
    if not uri.strip():
        raise ItemError(Status.BAD_URL, "empty URL: the list's url cell is empty; fill it in or delete the row")
    if has_control(uri):
        raise ItemError(
            Status.BAD_URL,
            f"{redact_url(uri)[:80]!r} holds a control character (NUL, CR/LF, tab); fix the URL in the list",
        )
    deadline = time.monotonic() + policy.item_timeout
    scheme = scheme_of(uri)
    if scheme not in policy.allowed_schemes:
        hint = "; add it to fetch.allowed_schemes to allow it" if scheme == "data" else ""
        raise ItemError(Status.BAD_URL, f"{redact_url(uri)[:80]}: scheme {scheme!r} is not allowed{hint}")
    if scheme == "file":
        return _fetch_local(uri, policy)
    if scheme in ("http", "https"):
        return (curl_fetch if policy.uses_curl else fetch_http)(uri, policy, deadline)
    if scheme == "data":
        return _fetch_data(uri, policy)
    return _fetch_fsspec(uri, policy, deadline)


def _fetch_data(uri: str, policy: FetchPolicy) -> bytes:
    """RFC 2397 `data:[<mediatype>][;base64],<data>` (only when "data" is an allowed scheme)."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ItemError(Status.BAD_URL, "data: URL without a ',' before its payload")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise _too_large("data:", policy.max_bytes)
    try:
        data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ItemError(Status.BAD_URL, "data: URL with a malformed base64 payload") from None
    if len(data) > policy.max_bytes:
        raise _too_large("data:", policy.max_bytes)
    return data
