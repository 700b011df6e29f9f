"""Submission: the pending shard tasks onto an executor, bounded, and each finished shard's record back.

Shard tasks are built lazily, as they are submitted, and at most IN_FLIGHT_PER_THREAD x (worker
threads) engine tasks are in flight, so client and scheduler memory stay O(workers), whatever the
number of shards. Each finished shard's record goes to `keep` at once and is not held here.

Tiny shards travel several to one engine task on an engine whose tasks cost milliseconds each
(`Executor.groups_small_tasks`: Dask's scheduler transitions, a result gather and the client's poll
per task, as much as converting a 10-item shard takes). The batch is decided here, once, from the
plan's size (`shards_per_task`); the worker runs its shards in turn (`worker.process_batch`), each
still its own file, record and commit. A shard that fails inside a batch comes back as a value and
is resubmitted alone, so retries, failures and what the summary says stay per shard.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .config import ConfigError
from .executor import Completion, Executor
from .fetch import PrivateNetworkRefused
from .redact import redact_text
from .specs import ShardRecord
from .store import StorageError
from .task import ShardTask
from .worker import process_batch, process_shard

IN_FLIGHT_PER_THREAD = 4
BATCH_ITEMS = 400  # a batch of tiny shards carries about this many items (~0.3-1 s of a worker's time) ...
BATCH_SHARDS = 64  # ... and never more shards than this


@dataclass(frozen=True)
class Progress:
    """Where a run is: shards and items done of the total, images/s and the estimated time left."""

    name: str  # the shard that just finished
    shards_done: int
    shards_total: int
    items_done: int
    items_total: int
    items_ok: int
    seconds: float

    @property
    def items_per_second(self) -> float:
        return self.items_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.items_per_second
        return (self.items_total - self.items_done) / rate if rate > 0 else None


ProgressHook = Callable[[Progress], None]


def describe_error(exc: BaseException) -> str:
    """One line: exception type and first line of its message."""
    text = str(exc).strip().splitlines()
    return redact_text(f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))


def shards_per_task(ex: Executor, count: int, items: int) -> int:
    """Shards per engine task: 1 for ordinary shards and on engines without a per-task cost; for
    tiny shards enough to carry about BATCH_ITEMS items, but never so many that fewer than
    2 x IN_FLIGHT_PER_THREAD x slots tasks exist (every worker stays fed and the run's tail short)."""
    if not ex.groups_small_tasks or count <= 0:
        return 1
    mean = max(1, items // count)
    wanted = min(BATCH_SHARDS, max(1, BATCH_ITEMS // mean))
    return max(1, min(wanted, count // (2 * IN_FLIGHT_PER_THREAD * ex.slots())))


def _batches(tasks: Iterator[ShardTask], size: int) -> Iterator[tuple[ShardTask, ...]]:
    batch: list[ShardTask] = []
    for task in tasks:
        batch.append(task)
        if len(batch) == size:
            yield tuple(batch)
            batch = []
    if batch:
        yield tuple(batch)


def _fatal(error: BaseException) -> None:
    """Raise for a shard failure that every shard would share: stop the run with its one line."""
    if isinstance(error, StorageError):  # disk full / no permission
        raise error
    if isinstance(error, PrivateNetworkRefused):  # the list points at private hosts: say the setting
        raise ConfigError(str(error)) from None


class _Sender:
    """The in-flight engine tasks and which shard tasks each carries; shards to run again alone."""

    def __init__(self, ex: Executor, tasks: Iterator[ShardTask], per_task: int, retries: int) -> None:
        self.ex, self.retries = ex, retries
        self._queue = _batches(tasks, per_task)
        self._alone: deque[tuple[ShardTask, int]] = deque()  # shards of a batch to run again by themselves
        self._sent: dict[str, tuple[ShardTask, ...]] = {}  # engine task name -> the shard tasks it carries

    def top_up(self) -> None:
        limit = max(1, IN_FLIGHT_PER_THREAD * self.ex.slots())
        while self.ex.in_flight < limit:
            if self._alone:
                task, left = self._alone.popleft()
                self._send((task,), left)
                continue
            batch = next(self._queue, None)
            if batch is None:
                return
            self._send(batch, self.retries if len(batch) == 1 else 0)

    def _send(self, batch: tuple[ShardTask, ...], retries: int) -> None:
        name = batch[0].name if len(batch) == 1 else f"{batch[0].name}+{len(batch) - 1}"
        self._sent[name] = batch
        if len(batch) == 1:
            self.ex.submit(name, process_shard, batch[0], retries=retries)
        else:
            self.ex.submit(name, process_batch, batch, retries=0)

    def outcomes(self, done: Completion) -> Iterator[tuple[ShardTask, Any]]:
        """(shard task, record or exception) for each shard of a finished engine task whose outcome
        is final; a shard that failed inside a batch (or with its whole batch) is queued to run alone."""
        batch = self._sent.pop(done.name)
        if len(batch) == 1:
            yield batch[0], done.result if done.error is None else done.error
            return
        results = () if done.error is not None else tuple(done.result)
        for i, task in enumerate(batch):
            outcome = results[i] if i < len(results) else done.error
            if isinstance(outcome, BaseException):
                _fatal(outcome)
                left = self.retries if i >= len(results) else self.retries - 1  # a whole-batch loss is not the shard's
                if left >= 0:
                    self._alone.append((task, left))
                    continue
            if outcome is None:  # the batch ended early at a fatal error: that shard never ran
                self._alone.append((task, self.retries))
                continue
            yield task, outcome


def execute(
    ex: Executor,
    tasks: Iterator[ShardTask],
    count: int,
    total_items: int,
    retries: int,
    keep: Callable[[ShardRecord], Any],
    failed: dict[str, str],
    on_progress: ProgressHook | None,
) -> None:
    """Run `count` shard tasks of `total_items` items on `ex`: each finished record to `keep` as it
    completes, each shard that failed for good named in `failed` (the run goes on without it)."""
    sender = _Sender(ex, iter(tasks), shards_per_task(ex, count, total_items), retries)
    shards, done_items, ok, start = 0, 0, 0, time.perf_counter()
    sender.top_up()
    for done in ex.completions():
        for task, outcome in sender.outcomes(done):
            if isinstance(outcome, BaseException):
                _fatal(outcome)
                failed[task.name] = describe_error(outcome)
            else:
                keep(outcome)
                ok += outcome.ok
            shards, done_items = shards + 1, done_items + len(task)
            if on_progress:
                on_progress(
                    Progress(task.name, shards, count, done_items, total_items, ok, time.perf_counter() - start)
                )
        sender.top_up()
