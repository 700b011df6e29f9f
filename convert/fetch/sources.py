"""Byte-range sources behind the resilient reader: HTTP (urllib3), and every other URL through its Store.

A source opens a *stream* of one object's bytes from an offset, pins the object's identity
(ETag, version id or modification stamp) from the first response and checks it on every
re-open, and turns a server that ignored the Range request into the right bytes. S3 and
fsspec objects are read through `convert.store` (no S3 client here); `scheme_of` is the
store's one URL-scheme rule, re-exported for the fetch layer.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Protocol

import urllib3

from ..store import PreconditionFailed, RangeStream, Store, open_object, scheme_of
from . import http
from .errors import ObjectChanged, TransientError, is_transient, redact_url

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


__all__ = ["HTTPSource", "Source", "StoreSource", "Stream", "make_source", "scheme_of"]


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
            raise ObjectChanged(
                f"{self.url} changed while being read (If-Match failed) at byte {start}", self.url, start
            )
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


class StoreSource(Source):
    """An object behind a Store (S3, a local file, any fsspec filesystem): one streamed ranged read
    per (re)open, conditional on the first identity seen (If-Match on S3's ETag; elsewhere the
    Store compares the version token)."""

    def __init__(self, url: str, store: Store, rel: str, timeout: float) -> None:
        super().__init__(url)
        self._store, self._rel, self._timeout = store, rel, timeout

    def stat(self) -> None:
        entry = self._store.info(self._rel)
        self.pin(entry.token, entry.size, 0)

    def open(self, start: int, end: int | None) -> Stream:
        try:
            stream = self._store.open_range(self._rel, start, end, match=self.identity, timeout=self._timeout)
        except PreconditionFailed as exc:
            raise ObjectChanged(
                f"{self.url} changed while being read (no longer {self.identity}) at byte "
                f"{start}; refusing to splice two versions",
                self.url,
                start,
            ) from exc
        try:
            self.pin(stream.entry.token, stream.entry.size, start)
            if stream.first != start:  # a full body for a ranged request: skip to the offset
                self.range_ignored = True
                _skip_stream(stream, start - stream.first, self.url)
        except BaseException:
            stream.close()
            raise
        # without ETags a version can change under an open file: check it again at the range's end
        return _Checked(stream, self.url, start, None if self._store.supports_etags else self.stat)


def _skip_stream(stream: RangeStream, count: int, url: str) -> None:
    while count > 0:
        data = stream.read(min(count, _SKIP_CHUNK))
        if not data:
            raise TransientError(f"{url}: body ended while skipping to the requested range", url)
        count -= len(data)


class _Checked:
    """A store's range stream with its short-body failures as TransientError (so the reader resumes),
    and, for stores without ETags, the object's identity checked again at the end of the range."""

    def __init__(self, stream: RangeStream, url: str, offset: int, at_end: Callable[[], None] | None) -> None:
        self._stream, self._url, self._offset, self._at_end = stream, url, offset, at_end

    def read(self, n: int) -> bytes:
        try:
            data = self._stream.read(n)
        except OSError as exc:
            if is_transient(exc) or "short" in str(exc):
                raise TransientError(f"{self._url}: {exc}", self._url, self._offset) from exc
            raise
        if not data and self._at_end is not None:
            self._at_end()
        self._offset += len(data)
        return data

    def close(self) -> None:
        self._stream.close()


def make_source(url: str, storage_options: dict[str, Any] | None, timeout: float) -> Source:
    """The Source for a URL: urllib3 for http(s), the Store of its bucket/filesystem for the rest."""
    options = dict(storage_options or {})
    if scheme_of(url) in ("http", "https"):
        return HTTPSource(url, timeout, options.get("headers"))
    store, rel = open_object(url, options)
    return StoreSource(url, store, rel, timeout)
