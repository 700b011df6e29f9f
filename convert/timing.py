"""A cheap per-stage clock: where a shard's time goes, summed over its items.

    clock = StageClock()
    t = clock.now()
    ... decode ...
    t = clock.lap("decode", t)    # adds the elapsed ns to "decode", returns the new start
    clock.seconds()               # {"decode": 0.81, ...} -> ShardRecord.stages

Stages (seconds summed over a shard's items; threads overlap, so sums can exceed wall time):
`fetch` (wall time of each item's fetch, in the prefetch threads), `fetch_cpu` (those threads' CPU
time for the same fetches), `wait` (the converting thread blocked on the next fetched item: idle),
`decode`, `resize`, `encode`, `write`, `verify` (re-open and count), `hash`, `commit` (publish), and
`convert_cpu` (the converting thread's CPU time over decode..write: the stages are wall time, which
on a loaded machine includes waiting for a core).

`time.perf_counter_ns` costs ~50 ns; one lock round trip ~100 ns; per image that is noise next to a
~500 us decode. Accumulation takes a lock because fetches report from several threads at once.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

STAGES = (
    "fetch",
    "fetch_cpu",
    "wait",
    "decode",
    "resize",
    "encode",
    "write",
    "convert_cpu",
    "verify",
    "hash",
    "commit",
)

now_ns = time.perf_counter_ns


class StageClock:
    """Thread-safe nanosecond totals per stage name."""

    __slots__ = ("_ns", "_lock")

    def __init__(self) -> None:
        self._ns: dict[str, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def now() -> int:
        return now_ns()

    def add(self, stage: str, ns: int) -> None:
        with self._lock:
            self._ns[stage] = self._ns.get(stage, 0) + ns

    def lap(self, stage: str, start: int) -> int:
        """Charge now - start to `stage`; returns now (the start of the next stage)."""
        end = now_ns()
        self.add(stage, end - start)
        return end

    def timed(self, stage: str, fn: Callable[..., T], *args: object) -> T:
        """fn(*args), its wall time charged to `stage` (also on exception)."""
        start = now_ns()
        try:
            return fn(*args)
        finally:
            self.add(stage, now_ns() - start)

    def seconds(self) -> dict[str, float]:
        """Per-stage seconds, in STAGES order first, then any other stage names."""
        with self._lock:
            ns = dict(self._ns)
        order = [s for s in STAGES if s in ns] + sorted(s for s in ns if s not in STAGES)
        return {s: ns[s] / 1e9 for s in order}


class _NullClock(StageClock):
    """A clock that records nothing (transform() called outside a shard)."""

    __slots__ = ()

    def add(self, stage: str, ns: int) -> None:
        pass


NULL_CLOCK: StageClock = _NullClock()


def timed_fetch(clock: StageClock, fn: Callable[[T], object]) -> Callable[[T], object]:
    """Wrap a per-item fetch so its wall time goes to `fetch` and its thread CPU time to `fetch_cpu`."""

    def run(item: T) -> object:
        cpu, start = time.thread_time_ns(), now_ns()
        try:
            return fn(item)
        finally:
            clock.add("fetch", now_ns() - start)
            clock.add("fetch_cpu", time.thread_time_ns() - cpu)

    return run
