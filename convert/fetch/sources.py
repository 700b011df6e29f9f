"""Byte-range sources behind the resilient reader: HTTP (urllib3), S3 (s3fs) and any fsspec filesystem.

A source opens a *stream* of one object's bytes from an offset, pins the object's identity
(ETag, version id or modification stamp) from the first response and checks it on every
re-open, and turns a server that ignored the Range request into the right bytes.
"""

from __future__ import annotations

import asyncio
import re
import threading
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Protocol

import fsspec
import urllib3
from fsspec.asyn import sync

from . import http
from .errors import ObjectChanged, TransientError, boto_code, redact_url

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_SKIP_CHUNK = 1 << 20


class Stream(Protocol):
    def read(self, n: int) -> bytes:
        """Up to n (> 0) bytes; b"" only at the end of the requested range."""

    def close(self) -> None: ...


class Source(ABC):
    """One object: where it is, what it is (size, identity) and how to stream it from an offset."""

    def __init__(self, url: str) -> None:
        self.url = redact_url(url)
        self.size: int | None = None
        self.identity: str | None = None
        self.range_ignored = False  # set when a server answered a Range request with the whole body
        self._pin_lock = threading.Lock()

    @abstractmethod
    def open(self, start: int, end: int | None) -> Stream:
        """A stream of bytes [start, end) (end None: to the end of the object)."""

    @abstractmethod
    def stat(self) -> None:
        """Fill in size/identity without reading the body (for seeks from the end, read-ahead)."""

    def pin(self, identity: str | None, size: int | None, offset: int) -> None:
        """Remember the first identity/size seen; raise ObjectChanged if a later one differs."""
        with self._pin_lock:
            if self.identity is None and self.size is None:
                self.identity, self.size = identity, size
                return
            changed = (identity is not None and self.identity is not None and identity != self.identity) or (
                size is not None and self.size is not None and size != self.size
            )
            if changed:
                raise ObjectChanged(
                    f"{self.url} changed while being read (was {self.identity} size {self.size}, now "
                    f"{identity} size {size}) at byte {offset}; refusing to splice two versions",
                    self.url,
                    offset,
                )
            self.identity = self.identity or identity
            self.size = self.size if self.size is not None else size


class _Empty:
    def read(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _HTTPStream:
    def __init__(self, resp: urllib3.BaseHTTPResponse, remaining: int | None, url: str, offset: int) -> None:
        self._resp, self._remaining, self._url, self._offset = resp, remaining, url, offset
        self._eof = False

    def read(self, n: int) -> bytes:
        if self._remaining is not None:
            n = min(n, self._remaining)
            if n <= 0:
                return b""
        # read1: whatever one socket read gives, so bytes that arrived before a reset are kept
        data = self._resp.read1(n)
        self._eof = not data
        if self._remaining is not None:
            if not data:
                raise TransientError(f"{self._url}: body ended {self._remaining} bytes short", self._url, self._offset)
            self._remaining -= len(data)
        return data

    def close(self) -> None:
        if (self._eof or self._remaining == 0) and self._resp.length_remaining in (0, None):
            self._resp.release_conn()  # fully read: keep the connection alive in the pool
        else:
            self._resp.close()  # unread bytes: never hand a dirty connection back
            self._resp.release_conn()


def _http_identity(headers: Any) -> str | None:
    etag = headers.get("ETag")
    if etag:
        return f"etag:{etag}"
    modified = headers.get("Last-Modified")
    return f"modified:{modified}" if modified else None


class HTTPSource(Source):
    """HTTP(S) via the shared urllib3 pool: Range + If-Match on re-opens, ETag compared on each."""

    def __init__(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
        super().__init__(url)
        self._raw_url, self._timeout, self._headers = url, timeout, dict(headers or {})

    def _conditional(self) -> dict[str, str]:
        hdrs = dict(self._headers)
        if self.identity and self.identity.startswith('etag:"'):  # If-Match needs a strong ETag
            hdrs["If-Match"] = self.identity[5:]
        return hdrs

    def stat(self) -> None:
        resp = http.request(self._raw_url, self._timeout, self._conditional(), method="HEAD")
        try:
            if resp.status == 412:
                raise ObjectChanged(f"{self.url} changed (If-Match failed)", self.url, 0)
            if resp.status >= 300:
                raise http.status_error(resp, self._raw_url, 0)
            length = resp.headers.get("Content-Length")
            self.pin(_http_identity(resp.headers), int(length) if length and length.isdigit() else None, 0)
        finally:
            http.discard(resp)

    def open(self, start: int, end: int | None) -> Stream:
        hdrs = self._conditional()
        if start > 0 or end is not None:
            hdrs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        resp = http.request(self._raw_url, self._timeout, hdrs)
        try:
            return self._stream(resp, start, end)
        except BaseException:
            http.discard(resp)
            raise

    def _stream(self, resp: urllib3.BaseHTTPResponse, start: int, end: int | None) -> Stream:
        status, identity = resp.status, _http_identity(resp.headers)
        if status == 416 and self.size is not None and start >= self.size:
            http.discard(resp)
            return _Empty()
        if status == 412:
            raise ObjectChanged(f"{self.url} changed while being read (If-Match failed) at byte {start}", self.url, start)
        if status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                raise TransientError(f"{self.url}: bad Content-Range {resp.headers.get('Content-Range')!r}", self.url)
            self.pin(identity, None if m.group(3) == "*" else int(m.group(3)), start)
            return _HTTPStream(resp, int(m.group(2)) + 1 - start, self.url, start)
        if status != 200:
            raise http.status_error(resp, self._raw_url, start)
        length = resp.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        self.pin(identity, size, start)
        if start > 0:  # the server ignored our Range header: drop what we already have
            self.range_ignored = True
            _skip(resp, start, self.url)
        stop = end if end is not None else size
        return _HTTPStream(resp, None if stop is None else max(stop - start, 0), self.url, start)


def _skip(resp: urllib3.BaseHTTPResponse, count: int, url: str) -> None:
    """Discard the first `count` bytes of a full-body answer to a Range request."""
    while count > 0:
        data = resp.read(min(count, _SKIP_CHUNK))
        if not data:
            raise TransientError(f"{url}: body ended while skipping to the requested range", url)
        count -= len(data)


async def _read_upto(body: Any, n: int, timeout: float) -> tuple[list[bytes], Exception | None]:
    """Chunks totalling up to n bytes from an aiobotocore body, each read bounded by `timeout`.

    A failure is returned with the chunks read before it, so bytes that arrived are not lost.
    """
    chunks: list[bytes] = []
    got = 0
    try:
        while got < n:
            chunk = await asyncio.wait_for(body.read(n - got), timeout)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except Exception as exc:  # noqa: BLE001 - handed back to the caller, raised after the chunks
        return chunks, exc
    return chunks, None


async def _close_body(body: Any) -> None:
    body.close()  # in the event loop's thread: aiohttp transports are not thread-safe


class _S3Stream:
    def __init__(self, fs: Any, body: Any, remaining: int, timeout: float, url: str, offset: int) -> None:
        self._fs, self._body, self._remaining, self._timeout = fs, body, remaining, timeout
        self._url, self._offset = url, offset
        self._ready: deque[bytes] = deque()
        self._error: Exception | None = None

    def read(self, n: int) -> bytes:
        if self._remaining <= 0:
            return b""
        if not self._ready:
            if self._error is not None:
                raise self._error
            want = min(max(n, 1 << 20), self._remaining)  # one loop hop per MiB, not per socket chunk
            chunks, self._error = sync(self._fs.loop, _read_upto, self._body, want, self._timeout)
            self._ready.extend(chunks)
            if not self._ready:
                if self._error is not None:
                    raise self._error
                raise TransientError(f"{self._url}: body ended {self._remaining} bytes short", self._url, self._offset)
        data = self._ready.popleft()
        if len(data) > n:
            data, rest = data[:n], data[n:]
            self._ready.appendleft(rest)
        self._remaining -= len(data)
        return data

    def close(self) -> None:
        try:
            sync(self._fs.loop, _close_body, self._body, timeout=self._timeout)
        except Exception:  # noqa: BLE001 - closing a broken body may fail; nothing to recover
            pass


class S3Source(Source):
    """S3 via s3fs's client: one streaming GetObject per (re)open, IfMatch-pinned to the first ETag."""

    def __init__(self, url: str, fs: Any, timeout: float) -> None:
        super().__init__(url)
        self._fs, self._timeout = fs, timeout
        self._bucket, self._key, self._version = fs.split_path(url)

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if self._version:
            kw["VersionId"] = self._version
        if self.identity and self.identity.startswith("etag:"):
            kw["IfMatch"] = self.identity[5:]
        return kw

    async def _call(self, method: str, **kw: Any) -> dict[str, Any]:
        return await asyncio.wait_for(self._fs._call_s3(method, **kw), self._timeout)

    def _s3(self, method: str, offset: int, **kw: Any) -> dict[str, Any]:
        try:
            return sync(self._fs.loop, self._call, method, **kw)
        except OSError as exc:
            code = boto_code(exc)
            if code in ("PreconditionFailed", "412"):
                raise ObjectChanged(
                    f"{self.url} changed while being read (ETag no longer {self.identity}) at byte {offset}",
                    self.url,
                    offset,
                ) from exc
            if code in ("InvalidRange", "416") and self.size is not None and offset >= self.size:
                return {}
            raise

    def stat(self) -> None:
        head = self._s3("head_object", 0, **self._kwargs())
        self.pin(f"etag:{head['ETag']}" if head.get("ETag") else None, head.get("ContentLength"), 0)

    def open(self, start: int, end: int | None) -> Stream:
        kw = self._kwargs()
        if start > 0 or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        resp = self._s3("get_object", start, **kw)
        if not resp:
            return _Empty()
        body = resp["Body"]
        try:
            total, first = _s3_extent(resp)
            self.pin(f"etag:{resp['ETag']}" if resp.get("ETag") else None, total, start)
            if first != start:  # a full body for a ranged request: skip to the offset
                self.range_ignored = True
                sync_skip = _S3Stream(self._fs, body, start, self._timeout, self.url, 0)
                while sync_skip.read(_SKIP_CHUNK):
                    pass
            stop = min(end, total) if end is not None else total
            return _S3Stream(self._fs, body, stop - start, self._timeout, self.url, start)
        except BaseException:
            _S3Stream(self._fs, body, 0, self._timeout, self.url, start).close()
            raise


def _s3_extent(resp: dict[str, Any]) -> tuple[int, int]:
    """(object size, first byte returned) from a GetObject response."""
    m = _CONTENT_RANGE.match(resp.get("ContentRange") or "")
    if m and m.group(3) != "*":
        return int(m.group(3)), int(m.group(1))
    return int(resp["ContentLength"]), 0


def _info_identity(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "content_md5"):
        if info.get(key):
            return f"{key}:{info[key]}"
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return f"{key}:{info[key]}"
    return None


class _FileStream:
    def __init__(self, source: "FsspecSource", f: Any, remaining: int) -> None:
        self._source, self._f, self._remaining = source, f, remaining

    def read(self, n: int) -> bytes:
        if self._remaining <= 0:
            self._source.stat()  # generic filesystems: re-check identity at the end of the range
            return b""
        data = self._f.read(min(n, self._remaining))
        if not data:
            raise TransientError(f"{self._source.url}: ended {self._remaining} bytes short", self._source.url)
        self._remaining -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


class FsspecSource(Source):
    """Any other fsspec filesystem: identity from info(), checked on every (re)open and at range end."""

    def __init__(self, url: str, fs: Any, path: str) -> None:
        super().__init__(url)
        self._fs, self._path = fs, path

    def stat(self) -> None:
        info = self._fs.info(self._path)
        self.pin(_info_identity(info), info.get("size"), 0)

    def open(self, start: int, end: int | None) -> Stream:
        self.stat()
        assert self.size is not None
        stop = self.size if end is None else min(end, self.size)
        f = self._fs.open(self._path, "rb", cache_type="none")
        try:
            f.seek(start)
        except BaseException:
            f.close()
            raise
        return _FileStream(self, f, stop - start)


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # 2+ chars, so "C:\\x" stays a path


def scheme_of(uri: str) -> str:
    """'file' for plain paths, else the lower-cased scheme ('https', 's3', 'data', 'file', ...).

    'data:...' and 'file:/x' have no '//' but are schemes all the same: they must meet the
    allow-list rather than pass as relative local paths."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else "file"


def make_source(url: str, storage_options: dict[str, Any] | None, timeout: float) -> Source:
    """The Source for a URL: urllib3 for http(s), s3fs streaming for s3, fsspec for the rest."""
    options = dict(storage_options or {})
    scheme = scheme_of(url)
    if scheme in ("http", "https"):
        return HTTPSource(url, timeout, options.get("headers"))
    if scheme in ("s3", "s3a"):
        return S3Source(url, fsspec.filesystem("s3", **options), timeout)
    fs, path = fsspec.core.url_to_fs(url, **options)
    return FsspecSource(url, fs, path)
