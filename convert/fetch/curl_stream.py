"""CurlStream: a shard's items fetched ahead in input order, HTTP(S) on libcurl (see curl.py).

The converting thread drives the transfers itself whenever it asks for the next item, so a URL
list costs no thread hand-off per item; anything that is not http(s) goes to a small thread pool.
Same bounds as `prefetch()`: at most `depth` items in flight and, with `max_bytes`, held plus
in-flight bytes within the budget.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Generic, TypeVar

from .curl import return_engine, thread_engine
from .curl_transfer import Transfer
from .policy import FetchPolicy
from .prefetch import THREAD_PREFIX, Budget, Fetched
from .retry import http_url

T = TypeVar("T")


class CurlStream(Generic[T]):
    """`prefetch()` with HTTP(S) items on libcurl: yields Fetched(item, value, error) in input order.

    `url_of(item)` names the http(s) URL to fetch for an item, or None to fetch it with
    `fallback(item)` on a small thread pool instead (local files, object stores, archive members).
    At most `depth` items are in flight and, with `max_bytes`, fetched-but-unconsumed bytes plus
    in-flight ones (costed at the mean size so far) stay within it, as in prefetch(). The transfers
    advance whenever the consumer asks for the next item. `inline_cpu_ns` is this thread's CPU spent
    fetching, so the caller can tell it apart from its own work.
    """

    def __init__(
        self,
        items: Iterable[T],
        url_of: Callable[[T], str | None],
        fallback: Callable[[T], Any],
        policy: FetchPolicy,
        depth: int = 16,
        max_bytes: int | None = None,
        size_of: Callable[[Any], int] = len,
        on_done: Callable[[int], None] | None = None,
    ) -> None:
        self._source = iter(items)
        self._url_of, self._fallback, self._policy = url_of, fallback, policy
        self._depth, self._max_bytes = depth, max_bytes
        self._on_done = on_done  # called with each item's fetch wall time (ns)
        self._engine = thread_engine(policy, depth)  # this thread's, with its connections, if idle
        self._engine.on_settle = self._settled
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Transfer] = deque()  # in input order; each knows its budget key
        self._budget = Budget(size_of, None)
        self._exhausted = False
        self._index = 0
        self.inline_cpu_ns = 0

    def __iter__(self) -> Iterator[Fetched[T, Any]]:
        return self

    def __next__(self) -> Fetched[T, Any]:
        cpu = time.thread_time_ns()
        try:
            self._top_up()
            if not self._pending:
                raise StopIteration
            t = self._pending[0]
            while not self._ready(t):
                if t.future is not None and not self._engine.active:
                    wait([t.future], timeout=1.0)  # nothing for libcurl to do: block on the pool
                else:
                    self._engine.drive(0.005 if self._pool_busy() else 1.0)
            self._pending.popleft()
            self._budget.consumed(t.key)
            return Fetched(t.item, t.value, t.error)
        finally:
            self.inline_cpu_ns += time.thread_time_ns() - cpu

    def _top_up(self) -> None:
        while not self._exhausted and len(self._pending) < self._depth:
            if self._max_bytes is not None and not self._budget.room(len(self._pending), self._max_bytes):
                return
            try:
                item = next(self._source)
            except StopIteration:
                self._exhausted = True
                return
            listed = self._url_of(item)
            url = None if listed is None else http_url(listed)  # as sent; errors name it as listed
            key = self._index
            t = Transfer(item, url, time.monotonic() + self._policy.item_timeout, self._policy.max_bytes, key, listed)
            self._pending.append(t)
            self._index += 1
            if url is None:
                t.future = self._submit(item)
                t.future.add_done_callback(lambda f, k=key: self._budget.done(k, f))
            else:
                self._engine.start(t)

    def _settled(self, t: Transfer) -> None:
        """A curl item finished: its bytes count against the budget, its wall time is reported."""
        if t.error is None:
            self._budget.record(t.key, t.value)
        if self._on_done is not None:
            self._on_done(time.perf_counter_ns() - t.started)

    def _ready(self, t: Transfer) -> bool:
        """True once `t` is settled; settles a fallback item whose future has finished."""
        if t.future is not None and not t.done and t.future.done():
            error = t.future.exception()
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt / SystemExit are not per-item errors
            t.value, t.error, t.done = (None if error else t.future.result()), error, True
        return t.done

    def _pool_busy(self) -> bool:
        return any(t.future is not None and not t.done for t in self._pending)

    def _submit(self, item: T) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(self._depth, 16), thread_name_prefix=THREAD_PREFIX)
        return self._pool.submit(self._fallback, item)

    def close(self, keep_engine: bool = True) -> None:
        """Abort transfers in flight (else keep the engine for this thread's next shard), cancel queued
        fallback fetches and join the pool's threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if keep_engine:
            return_engine(self._engine)
        else:
            self._engine.close()
        if self._pool is not None:
            for t in self._pending:
                if t.future is not None:
                    t.future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __del__(self) -> None:  # a consumer that stopped early and dropped the stream
        try:  # collected: its engine's handles may be finalised already (the engine is dropped, not kept)
            self.close(keep_engine=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
