"""The executor seam: how the orchestration runs shard tasks, whatever the engine.

    with open_executor(cluster_config) as ex:
        with ex.share_secrets(values):
            ex.submit("shard-00000", process_shard, task, retries=2)
            for done in ex.completions():   # each task once, as it finishes; submit more meanwhile
                ...

Implementations: `DaskExecutor` (executor/dask_executor.py - LocalCluster, a running scheduler,
SLURM/PBS; with cluster.py and worker_settings.py the only code that imports `distributed`) and
`ThreadExecutor` (executor/threads.py, an in-process thread pool for `cluster.kind: threads` and for
small plans under `auto`, see executor/auto.py). A new engine (Ray, ...) is one more module
implementing `Executor` plus one branch in `open_executor`.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

from ..config import ClusterConfig
from .auto import choose_cluster


@dataclass(frozen=True)
class Completion:
    """A finished task: its name and either its result or the exception it ended with."""

    name: str
    result: Any = None
    error: BaseException | None = None


class Executor(ABC):
    """Bounded work on some workers: submit named tasks, iterate completions, share secrets."""

    description: str = ""
    dashboard: str | None = None
    #: True where every task costs the engine milliseconds (scheduling, a result gather, a poll):
    #: the client then sends tiny shards several to a task (convert.submit.shards_per_task)
    groups_small_tasks: bool = False

    @property
    def job_ids(self) -> list[str]:
        return []

    @abstractmethod
    def slots(self) -> int:
        """Task threads the workers have now (the orchestrator keeps about 4x this many in flight)."""

    @property
    @abstractmethod
    def in_flight(self) -> int:
        """Submitted tasks not yet yielded by `completions`."""

    @abstractmethod
    def submit(self, name: str, fn: Callable[..., Any], *args: Any, retries: int = 0) -> None:
        """Run fn(*args) on a worker, retried up to `retries` times if it raises."""

    @abstractmethod
    def completions(self) -> Iterator[Completion]:
        """Yield each task once as it finishes, until none is in flight (submitting meanwhile is fine)."""

    @abstractmethod
    def share_secrets(self, values: dict[str, str]) -> ContextManager[None]:
        """Make sealed secret values resolvable on every (current and future) worker for a while."""

    def memory_limit(self) -> int | None:
        """The smallest worker memory limit in bytes (None when unlimited or unknown)."""
        return None

    def check_paths(self, uris: Sequence[str]) -> None:
        """Refuse local paths the workers cannot see (no-op where every worker runs here)."""

    def close(self) -> None:
        """Release workers and connections (idempotent)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Stopped(KeyboardInterrupt):
    """Ctrl-C / SIGTERM, delivered at a safe point of the completion loop (see request_stop)."""

    def __init__(self, signal_name: str = "SIGINT") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


_WAITING = threading.Event()
_STOP: list[str] = []


def request_stop(signal_name: str) -> bool:
    """Called by a signal handler: True if an executor is waiting for completions and will raise
    Stopped at its next poll (an exception raised inside Dask's client calls instead would leave
    tracebacks); False means the caller should raise at once."""
    if _WAITING.is_set():
        _STOP.append(signal_name)
        return True
    return False


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Marks a completion loop that polls `check_stop()`."""
    _WAITING.set()
    try:
        yield
    finally:
        _WAITING.clear()


def check_stop() -> None:
    if _STOP:
        raise Stopped(_STOP.pop())


@contextlib.contextmanager
def open_executor(cfg: ClusterConfig, job_name: str = "convert") -> Iterator[Executor]:
    """The executor a ClusterConfig describes (threads in this process, or a Dask cluster); `kind: auto`
    with no plan size known is a LocalCluster (StartingExecutor.executor decides with the size)."""
    cfg = choose_cluster(cfg).config
    if cfg.kind == "threads":
        from .threads import ThreadExecutor

        with ThreadExecutor(cfg.workers or 2) as ex:
            yield ex
        return
    from .dask_executor import open_dask_executor

    with open_dask_executor(cfg, job_name) as ex:
        yield ex


__all__ = ["Completion", "Executor", "Stopped", "check_stop", "open_executor", "request_stop", "stoppable"]
