"""A read-only file object that survives transient failures by re-opening at the exact byte offset.

    with open_resilient("s3://bucket/big.bin", storage_options=opts) as f:
        data = f.read()

Connection resets, short bodies, read timeouts, 5xx and S3 SlowDown make the reader re-open the
object at the offset it reached (a Range request pinned to the first response's ETag/version),
so the caller sees one uninterrupted stream of the right bytes. The budget counts consecutive
re-opens that delivered no new bytes; a stream that keeps making progress is never abandoned.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import ResumeExhausted, TransientError, is_transient
from .retry import retry_delay
from .prefetch import prefetch
from .sources import Source, Stream, make_source


@dataclass(frozen=True)
class ResumePolicy:
    """How hard the reader tries, and how it reads."""

    max_stalled_resumes: int = 5  # consecutive re-opens without new bytes before giving up
    max_resumes: int | None = None  # optional cap on all re-opens of one reader / block
    backoff: float = 0.1  # base seconds; exponential with jitter while no progress is made
    max_backoff: float = 5.0
    timeout: float = 10.0  # connect and per-read timeout, seconds
    chunk_size: int = 1 << 20  # bytes per underlying read and per iteration chunk
    readahead: int = 0  # >0: ranged blocks fetched concurrently ahead of the reader
    readahead_block: int = 8 << 20
    readahead_bytes: int = 64 << 20  # bound on bytes fetched ahead and not yet read

    def __post_init__(self) -> None:
        if self.max_stalled_resumes < 0 or (self.max_resumes is not None and self.max_resumes < 0):
            raise ValueError("resume budgets must be >= 0")
        if self.chunk_size <= 0 or self.readahead_block <= 0 or self.timeout <= 0:
            raise ValueError("chunk_size, readahead_block and timeout must be > 0")


class _Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.resumes = 0

    def add(self) -> None:
        with self._lock:
            self.resumes += 1


class _Resumer:
    """The resume budget of one sequential read: decides whether to go on, and sleeps first."""

    def __init__(self, policy: ResumePolicy, url: str, offset: int, stats: _Stats) -> None:
        self.policy, self.url, self.mark, self.stats = policy, url, offset, stats
        self.resumes = 0
        self.stalled = 0

    def failed(self, exc: BaseException, offset: int) -> None:
        """Record a transient failure at `offset`; raise ResumeExhausted once the budget is spent."""
        progress = offset > self.mark
        self.mark = max(self.mark, offset)
        self.stalled = 0 if progress else self.stalled + 1
        p = self.policy
        if self.stalled > p.max_stalled_resumes or (p.max_resumes is not None and self.resumes >= p.max_resumes):
            raise ResumeExhausted(self.url, offset, exc, self.resumes, self.stalled) from exc
        self.resumes += 1
        self.stats.add()
        if self.stalled:  # progress since the last cut: re-open at once; otherwise back off
            time.sleep(retry_delay(self.stalled, p.backoff, getattr(exc, "retry_after", None), p.max_backoff))


class _Cursor:
    """Sequential bytes [pos, end) of one source, re-opened at the exact offset after transient failures."""

    def __init__(self, source: Source, policy: ResumePolicy, pos: int, end: int | None, stats: _Stats) -> None:
        self.source, self.pos, self.end = source, pos, end
        self._stream: Stream | None = None
        self._resumer = _Resumer(policy, source.url, pos, stats)

    def read(self, n: int) -> bytes:
        """Up to n bytes (n == 0: just open); b"" at the end."""
        while True:
            try:
                if self._stream is None:
                    if self.end is not None and self.pos >= self.end:
                        return b""
                    self._stream = self.source.open(self.pos, self.end)
                if n == 0:
                    return b""
                data = self._stream.read(n)
                if data:
                    self.pos += len(data)
                    return data
                stop = self.end if self.end is not None else self.source.size
                if stop is not None and self.pos < stop:
                    raise TransientError(f"{self.source.url}: stream ended at byte {self.pos} of {stop}")
                self.close()
                return b""
            except Exception as exc:  # noqa: BLE001 - permanent errors re-raised right below
                self.close()
                if not is_transient(exc):
                    raise
                self._resumer.failed(exc, self.pos)

    def read_all(self) -> bytes:
        chunks = []
        while chunk := self.read(1 << 30):
            chunks.append(chunk)
        return b"".join(chunks)  # one join (a single chunk is returned as is)

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a broken stream must not mask the real error
                pass


def _retrying(source: Source, policy: ResumePolicy, stats: _Stats, fn: Any) -> Any:
    resumer = _Resumer(policy, source.url, 0, stats)
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            if not is_transient(exc):
                raise
            resumer.failed(exc, 0)


class _Readahead:
    """Blocks [start, size) fetched concurrently (bounded in count and bytes), consumed in order."""

    def __init__(self, source: Source, policy: ResumePolicy, start: int, stats: _Stats) -> None:
        assert source.size is not None
        self._source, self._policy, self._stats = source, policy, stats
        bs = policy.readahead_block
        blocks = [(a, min(a + bs, source.size)) for a in range(start, source.size, bs)]
        self._results = prefetch(
            blocks, self._fetch, depth=policy.readahead, max_bytes=policy.readahead_bytes, estimate=bs
        )
        self._buf, self._off = b"", 0

    def _fetch(self, block: tuple[int, int]) -> bytes:
        cursor = _Cursor(self._source, self._policy, block[0], block[1], self._stats)
        try:
            return cursor.read_all()
        finally:
            cursor.close()

    def read(self, n: int) -> bytes:
        if self._off >= len(self._buf):
            result = next(self._results, None)
            if result is None:
                return b""
            if result.error is not None:
                raise result.error
            self._buf, self._off = result.value, 0
        if self._off == 0 and n >= len(self._buf):
            self._off = len(self._buf)
            return self._buf  # a whole block: no copy
        data = self._buf[self._off : self._off + n]
        self._off += len(data)
        return data

    def close(self) -> None:
        self._results.close()  # cancels queued blocks, joins the fetch threads


class ResilientReader(io.BufferedIOBase):
    """Read-only binary file over a Source; see the module docstring. Iterating yields chunks."""

    def __init__(self, source: Source, policy: ResumePolicy) -> None:
        super().__init__()
        self._source, self._policy = source, policy
        self._pos = 0
        self._stats = _Stats()
        self._cursor: _Cursor | None = None
        self._ahead: _Readahead | None = None
        self._use_ahead = False
        if policy.readahead > 0:
            _retrying(source, policy, self._stats, source.stat)
            self._use_ahead = source.size is not None and source.size > policy.readahead_block
        if not self._use_ahead:
            self._reader().read(0)  # open now: permanent errors (404, 403) surface at open time

    @property
    def url(self) -> str:
        """The (redacted) URL."""
        return self._source.url

    @property
    def size(self) -> int | None:
        """Object size in bytes, once known (after the first response)."""
        return self._source.size

    @property
    def resumes(self) -> int:
        """How many times the reader re-opened the object after a transient failure."""
        return self._stats.resumes

    @property
    def range_ignored(self) -> bool:
        """True if the server answered a Range request with the whole body (handled by skipping)."""
        return self._source.range_ignored

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _reader(self) -> _Cursor | _Readahead:
        if self._use_ahead:
            if self._ahead is None:
                self._ahead = _Readahead(self._source, self._policy, self._pos, self._stats)
            return self._ahead
        if self._cursor is None:
            self._cursor = _Cursor(self._source, self._policy, self._pos, None, self._stats)
        return self._cursor

    def _chunk(self, n: int) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        data = self._reader().read(n)
        self._pos += len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes (all remaining if size is None or < 0); b"" at EOF."""
        if size is not None and size >= 0:
            chunks, got = [], 0
            while got < size and (chunk := self._chunk(size - got)):
                chunks.append(chunk)
                got += len(chunk)
        else:
            chunks = []
            while chunk := self._chunk(self._policy.chunk_size):
                chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read1(self, size: int = -1) -> bytes:
        return self._chunk(size if size > 0 else self._policy.chunk_size)

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = 0
        while n < len(view) and (chunk := self._chunk(len(view) - n)):
            view[n : n + len(chunk)] = chunk
            n += len(chunk)
        return n

    def readinto1(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        chunk = self._chunk(len(view)) if len(view) else b""
        view[: len(chunk)] = chunk
        return len(chunk)

    def __iter__(self) -> Iterator[bytes]:  # type: ignore[override]
        while chunk := self.read1(self._policy.chunk_size):
            yield chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            if self._source.size is None:
                _retrying(self._source, self._policy, self._stats, self._source.stat)
            assert self._source.size is not None
            target = self._source.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        if target != self._pos:
            self._drop()
            self._pos = target
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _drop(self) -> None:
        cursor, self._cursor = self._cursor, None
        ahead, self._ahead = self._ahead, None
        if cursor is not None:
            cursor.close()
        if ahead is not None:
            ahead.close()

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()


def open_resilient(url: str, storage_options: dict[str, Any] | None = None, **policy: Any) -> ResilientReader:
    """Open `url` (http(s)://, s3://, file://, memory://, any fsspec URL) for resilient reading.

    Keyword arguments are ResumePolicy fields (max_stalled_resumes, max_resumes, backoff,
    max_backoff, timeout, chunk_size, readahead, readahead_block, readahead_bytes). For HTTP,
    storage_options may carry extra request `headers`.
    """
    pol = ResumePolicy(**policy)
    return ResilientReader(make_source(url, storage_options, pol.timeout), pol)
