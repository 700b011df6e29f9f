"""Dask distributed behind the Executor interface (with executor/cluster.py, the only code importing it).

Tasks are `client.submit` calls with unique keys (`<shard>-<run token>`, pure=False) so a rerun never
reuses an old result; each future is released as soon as its completion is read, so neither the
client nor the scheduler keeps finished tasks. Secrets reach workers through a WorkerPlugin that is
removed when the run ends (see convert.secrets for how they are sealed).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask.config
from distributed import as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from ..config import ClusterConfig
from ..secrets import register, unregister
from . import Completion, Executor, check_stop, stoppable
from .cluster import ClusterHandle, check_reachable_paths, open_client
from .worker_settings import WORKER_CONFIG, ProfilerOff

#: what every worker we start runs with (no profiler, short logs): see worker_settings.py; here, in the
#: client process (and a LocalCluster's scheduler, which lives in it), low-level-log-length also bounds
#: the scheduler's event topics and every BatchedSend's recent-message log, which holds each compute-task
#: message WITH its pickled ShardTask: at 1000 that was ~10 MB in the client of a default LocalCluster
#: before it stopped growing (issue 22, tracemalloc); 20 is enough for a post-mortem of the last messages.
QUIET_LOGS = {**WORKER_CONFIG, "distributed.admin.low-level-log-length": 20}


POLL = 0.05  # seconds between checks for a finished task or a stop request


class SecretsPlugin(WorkerPlugin):
    """Holds sealed secret values; installs them in each worker process's registry."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = dict(values)

    def __repr__(self) -> str:  # never show values in logs
        return f"SecretsPlugin({len(self._values)} secrets)"

    def setup(self, worker: Any) -> None:
        register(self._values)

    def teardown(self, worker: Any) -> None:
        unregister(self._values)


class _HideComputeFailed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


class QuietTaskErrors(WorkerPlugin):
    """Workers of a LocalCluster print to the user's terminal: a failed shard is reported once, in
    the run's summary, so Dask's "Compute Failed" dump is kept off stderr (get_worker_logs keeps it)."""

    def setup(self, worker: Any) -> None:
        for handler in logging.getLogger("distributed").handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _HideComputeFailed) for f in handler.filters
            ):
                handler.addFilter(_HideComputeFailed())


class DaskExecutor(Executor):
    """Shard tasks on a connected Dask cluster (ClusterHandle)."""

    groups_small_tasks = True  # a task costs the scheduler, a gather and a poll: ~ms each

    def __init__(self, handle: ClusterHandle) -> None:
        self.handle = handle
        self.client = handle.client
        self.description = handle.description
        self.dashboard = handle.dashboard_link
        self._token = uuid.uuid4().hex[:8]
        self._names: dict[str, str] = {}
        self._ac = as_completed([], with_results=False)
        self._slots: tuple[float, int] = (0.0, 0)
        if handle.cluster is not None and not handle.job_ids and type(handle.cluster).__name__ == "LocalCluster":
            self.client.register_plugin(QuietTaskErrors(), name="convert-quiet-task-errors")
        self._profiler_off = handle.cluster is None  # workers we did not start: their profiler, off for the run
        if self._profiler_off:
            self.client.register_plugin(ProfilerOff(), name=ProfilerOff.name)

    @property
    def job_ids(self) -> list[str]:
        return self.handle.job_ids

    def slots(self) -> int:
        at, n = self._slots
        if time.monotonic() - at > 2.0 or not n:  # the cluster may grow or shrink; ask now and then
            n = max(1, sum(self.client.nthreads().values()))
            self._slots = (time.monotonic(), n)
        return n

    @property
    def in_flight(self) -> int:
        return len(self._names)

    def submit(self, name: str, fn: Callable[..., Any], *args: Any, retries: int = 0) -> None:
        key = f"{name}-{self._token}"
        future = self.client.submit(fn, *args, key=key, retries=retries, pure=False)
        self._names[key] = name
        self._ac.add(future)

    def completions(self) -> Iterator[Completion]:
        while self._names:
            with stoppable():
                while not self._ac.has_ready():
                    check_stop()
                    time.sleep(POLL)
                future = next(self._ac)
                name = self._names.pop(future.key)
                if future.status == "finished":
                    done = Completion(name, future.result())
                else:
                    done = Completion(name, error=future.exception())
                future.release()
            yield done

    @contextlib.contextmanager
    def share_secrets(self, values: dict[str, str]) -> Iterator[None]:
        if not values:
            yield
            return
        name = f"convert-secrets-{uuid.uuid4().hex[:12]}"
        register(values)
        self.client.register_plugin(SecretsPlugin(values), name=name)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # a lost scheduler forgets its plugins anyway
                self.client.unregister_worker_plugin(name)
            unregister(values)

    def memory_limit(self) -> int | None:
        limits = [w.get("memory_limit") or 0 for w in self.client.scheduler_info()["workers"].values()]
        return min((x for x in limits if x), default=None)

    def check_paths(self, uris: Sequence[str]) -> None:
        check_reachable_paths(list(uris), self.handle)

    def restore_workers(self) -> None:
        """Give workers we did not start their profiler back (ProfilerOff's teardown)."""
        if self._profiler_off:
            with contextlib.suppress(Exception):  # a lost scheduler forgets its plugins anyway
                self.client.unregister_worker_plugin(ProfilerOff.name)

    def cancel(self) -> None:
        """Cancel what is still queued or running (an interrupted run) on a scheduler we do not own;
        a cluster we started is closed right after, which stops its tasks anyway (and quietly)."""
        if self.handle.cluster is not None:
            return
        with contextlib.suppress(Exception):
            self.client.cancel(list(self._ac.futures), force=True)


@contextlib.contextmanager
def open_dask_executor(cfg: ClusterConfig, job_name: str = "convert") -> Iterator[DaskExecutor]:
    with dask.config.set(QUIET_LOGS), open_client(cfg, job_name=job_name) as handle:
        ex = DaskExecutor(handle)
        try:
            yield ex
        except BaseException:
            ex.cancel()
            raise
        finally:
            ex.restore_workers()
