"""Item deadlines for blocking HTTP calls: a per-process reaper thread shuts a connection's socket
down when the item that is using it runs out of time.

Socket timeouts bound each recv(), not a response: a server sending its status line and headers
(or its body) one byte a second keeps urllib3 busy for minutes. The header phase happens inside
urllib3, so the pool's `_make_request` registers the connection here while it runs (see netguard),
under the deadline the fetching thread set with `deadline_scope`; convert.fetch.http registers it
again for the body and any drain of it, so every byte of an item is bounded by its deadline. Hand-written: neither urllib3 nor the
standard library bounds a whole blocking request.

Cost: one lock round trip and a heap push per request; cancelled entries are dropped lazily and
the heap is compacted when they are the majority, so memory stays O(requests in flight).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from typing import Any, Iterator

_local = threading.local()


def current() -> float | None:
    """The monotonic deadline of the item this thread is fetching, if any."""
    return getattr(_local, "deadline", None)


@contextlib.contextmanager
def deadline_scope(deadline: float) -> Iterator[None]:
    previous = current()
    _local.deadline = deadline
    try:
        yield
    finally:
        _local.deadline = previous


class _Reaper:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[list[Any]] = []
        self._live = 0
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, conn: Any) -> list[Any]:
        entry = [deadline, next(self._seq), conn]
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="convert-deadlines", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, entry)
            self._live += 1
            if self._heap[0] is entry:
                self._cv.notify()
        return entry

    def unwatch(self, entry: list[Any]) -> None:
        with self._cv:
            if entry[2] is not None:
                entry[2] = None
                self._live -= 1
                if len(self._heap) > 1024 and self._live * 2 < len(self._heap):
                    self._heap = [e for e in self._heap if e[2] is not None]
                    heapq.heapify(self._heap)

    def _run(self) -> None:
        with self._cv:
            while True:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
                entry = heapq.heappop(self._heap)
                conn, entry[2] = entry[2], None
                self._live -= 1
                _shut(conn)


def _shut(conn: Any) -> None:
    """Wake a thread blocked in recv() on this connection: the read fails, the item times out."""
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


_reaper = _Reaper()


def _reset_after_fork() -> None:
    global _reaper
    _reaper = _Reaper()


os.register_at_fork(after_in_child=_reset_after_fork)


@contextlib.contextmanager
def watched(conn: Any) -> Iterator[None]:
    """Shut `conn` down if this thread's item deadline passes while the block runs."""
    deadline = current()
    if deadline is None:
        yield
        return
    reaper = _reaper
    entry = reaper.watch(deadline, conn)
    try:
        yield
    finally:
        reaper.unwatch(entry)
