"""A streaming S3 GetObject body read from a synchronous caller (the resilient reader's range stream).

The body is read on s3fs's event loop, a MiB per loop hop, each read bounded by a timeout; bytes
that arrived before a failure are handed out before the failure is raised.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from fsspec.asyn import sync

from .base import Entry


async def _read_upto(body: Any, n: int, timeout: float | None) -> tuple[list[bytes], Exception | None]:
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


class S3Range:
    """Bytes [first, first + remaining) of one GetObject response."""

    def __init__(self, loop: Any, body: Any, entry: Entry, first: int, remaining: int, timeout: float | None) -> None:
        self._loop, self._body, self.entry, self.first = loop, body, entry, first
        self._remaining, self._timeout = remaining, timeout
        self._ready: deque[bytes] = deque()
        self._error: Exception | None = None

    def read(self, n: int) -> bytes:
        if self._remaining <= 0:
            return b""
        if not self._ready:
            if self._error is not None:
                raise self._error
            want = min(max(n, 1 << 20), self._remaining)  # one loop hop per MiB, not per socket chunk
            chunks, self._error = sync(self._loop, _read_upto, self._body, want, self._timeout)
            self._ready.extend(chunks)
            if not self._ready:
                if self._error is not None:
                    raise self._error
                raise ConnectionError(f"body ended {self._remaining} bytes short")
        data = self._ready.popleft()
        if len(data) > n:
            data, rest = data[:n], data[n:]
            self._ready.appendleft(rest)
        self._remaining -= len(data)
        return data

    def close(self) -> None:
        try:
            sync(self._loop, _close_body, self._body, timeout=self._timeout)
        except Exception:  # noqa: BLE001 - closing a broken body may fail; nothing to recover
            pass


class EmptyRange:
    """A range starting at or past the end of the object."""

    def __init__(self, entry: Entry, first: int) -> None:
        self.entry, self.first = entry, first

    def read(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        pass
