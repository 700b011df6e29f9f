"""Ordered, bounded prefetch on a thread pool: fetches overlap each other and the consumer's work.

    for r in prefetch(items, fetch, depth=16, max_bytes=256 << 20):
        if r.error is None:
            process(r.item, r.value)

`concurrent.futures.Executor.map` would do the ordering but submits every item up front (no
bound on count or bytes) and raises on the first error, hence this small scheduler.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

THREAD_PREFIX = "convert-prefetch"


@dataclass(frozen=True, slots=True)
class Fetched(Generic[T, R]):
    """One input item and what fetching it gave: a value, or the exception it raised."""

    item: T
    value: R | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Budget:
    """Bytes held by finished-but-unconsumed results, and the running mean result size."""

    def __init__(self, size_of: Callable[[R], int], estimate: int | None) -> None:
        self._size_of = size_of
        self._lock = threading.Lock()
        self.buffered = 0
        self.seen = 1 if estimate is not None else 0  # a prior counts as one observation
        self.total = estimate or 0
        self.sizes: dict[int, int] = {}

    def done(self, key: int, fut: Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        self.record(key, fut.result())

    def record(self, key: int, value: R) -> None:
        """Result `key` is held (until consumed): count its size."""
        try:
            size = int(self._size_of(value))
        except Exception:  # noqa: BLE001 - an unsizable value counts as 0 bytes
            size = 0
        with self._lock:
            self.sizes[key] = size
            self.buffered += size
            self.seen += 1
            self.total += size

    def consumed(self, key: int) -> None:
        with self._lock:
            self.buffered -= self.sizes.pop(key, 0)

    def room(self, pending: int, max_bytes: int) -> bool:
        """May another fetch start? Unfinished fetches (and the new one) are costed at the mean
        size seen so far; until a first size (or the estimate) is known only one fetch runs."""
        with self._lock:
            if pending == 0:
                return True
            if self.seen == 0:
                return False
            unfinished = pending - len(self.sizes)
            return self.buffered + (unfinished + 1) * (self.total / self.seen) <= max_bytes


def prefetch(
    items: Iterable[T],
    fetch: Callable[[T], R],
    depth: int = 16,
    max_bytes: int | None = None,
    size_of: Callable[[R], int] = len,  # type: ignore[assignment]
    estimate: int | None = None,
    threads: int | None = None,
) -> Iterator[Fetched[T, R]]:
    """Yield Fetched(item, value, error) in input order with up to `depth` fetches in flight.

    With `max_bytes`, a new fetch starts only while finished-but-unconsumed results plus the
    in-flight ones (costed at the mean result size) fit in max_bytes; one fetch always runs.
    `estimate` (bytes per result) lets the first fetches run in parallel before any size is
    known; without it the first result is awaited before a second fetch starts.
    `threads` (default `depth`) caps the pool: fewer threads than `depth` queue the rest, for
    CPU-bound fetches that should run on few threads yet always have the next one ready.
    Closing the generator early (or the consumer raising) cancels queued fetches and joins
    the pool's threads before returning, so none are left running.
    """
    if depth < 1 or (threads is not None and threads < 1):
        raise ValueError("depth and threads must be >= 1")
    budget = Budget(size_of, estimate)
    source = iter(items)
    pending: deque[tuple[int, T, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=min(depth, threads or depth), thread_name_prefix=THREAD_PREFIX)
    exhausted = False
    index = 0
    try:
        while True:
            while not exhausted and len(pending) < depth:
                if max_bytes is not None and not budget.room(len(pending), max_bytes):
                    break
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                fut = pool.submit(fetch, item)
                fut.add_done_callback(lambda f, k=index: budget.done(k, f))
                pending.append((index, item, fut))
                index += 1
            if not pending:
                return
            key, item, fut = pending.popleft()
            error = fut.exception()  # waits for this item
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt / SystemExit from a fetch are not per-item errors
            budget.consumed(key)
            yield Fetched(item, None if error is not None else fut.result(), error)
    finally:
        for _, _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
