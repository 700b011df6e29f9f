"""Start the executor while the client is still planning.

A LocalCluster takes seconds to come up (import distributed, start a scheduler, fork workers), paid
on every run; listing and planning the source, reading committed records and taking the lease need
none of it. `StartingExecutor` starts the worker forkserver at once and opens the executor in a
background thread; `executor()` joins it when the first task is about to be submitted.

With `cluster.kind: auto` the cluster is chosen once the plan is known (`executor(shards, items)`,
executor/auto.py): a small plan runs in this process and never pays for a cluster; a LocalCluster
starts early only when the source is obviously large before planning (`likely_large`).

Only a LocalCluster whose workers fork from the forkserver starts early: the server is started here,
on the calling thread, with SIGINT ignored, so every worker ignores Ctrl-C as before (spawned workers
inherit the signal disposition of the thread that creates them, which a background thread cannot
set). External schedulers, batch clusters, threads and `CONVERT_WORKER_START=spawn` open lazily, as
they always did.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from ..config import ClusterConfig, SourceConfig
from . import Executor, open_executor
from .auto import Choice, choose_cluster, likely_large
from .warm import ensure_forkserver, start_method

POLL = 0.1  # seconds between joins, so Ctrl-C reaches the waiting main thread at once


def can_start_early(cfg: ClusterConfig) -> bool:
    """True for a LocalCluster whose workers fork from a preloaded forkserver."""
    return cfg.kind == "local" and not cfg.scheduler and not cfg.scheduler_file and start_method() == "forkserver"


class StartingExecutor:
    """An executor being opened in the background (`early`), or opened on first use.

    With `kind: auto`, `source` lets it start a LocalCluster early for an obviously large source and
    otherwise wait for the plan size given to `executor()`; without `source` it starts one early.
    A cluster started early is used whatever the plan size."""

    def __init__(
        self, cfg: ClusterConfig, job_name: str = "convert", *, early: bool = True, source: SourceConfig | None = None
    ) -> None:
        self._cfg, self._job_name = cfg, job_name
        self._early: Choice | None = None  # the cluster started before the plan was known
        self._stack = contextlib.ExitStack()
        self._executor: Executor | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._used = False
        local = cfg.model_copy(update={"kind": "local"})
        if cfg.kind != "auto":
            self._early = Choice(cfg)
        elif source is None:  # a caller that cannot tell a small job: a LocalCluster, as before `auto`
            self._early = Choice(local, "auto: plan size not known")
        elif likely_large(source):
            self._early = Choice(local, "auto: a large source list")
        if early and self._early is not None and can_start_early(self._early.config):
            ensure_forkserver()  # here: SIGINT ignored for the server and every worker it forks
            self._thread = threading.Thread(target=self._open, name="convert-cluster-start", daemon=True)
            self._thread.start()

    def _open(self) -> None:
        try:
            assert self._early is not None
            self._executor = self._stack.enter_context(open_executor(self._early.config, self._job_name))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread by executor()
            self._error = exc

    def _join(self) -> None:
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(POLL)

    @contextlib.contextmanager
    def executor(self, shards: int | None = None, items: int | None = None) -> Iterator[Executor]:
        """The executor (waiting for the background start) for a plan of `shards` shards and `items`
        items to convert (`kind: auto` decides with them); closed when the block ends."""
        self._used = True
        if self._thread is None:
            choice = choose_cluster(self._cfg, shards, items)
            with open_executor(choice.config, self._job_name) as ex:
                yield _described(ex, choice)
            return
        self._join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert self._executor is not None and self._early is not None
        with self._stack:  # exceptions of the block reach the executor's own context (cancel, close)
            yield _described(self._executor, self._early)

    def close(self) -> None:
        """Shut down a cluster started early and never used (nothing to convert, or planning failed)."""
        if self._thread is None or self._used:
            return
        self._used = True
        self._join()
        with contextlib.suppress(Exception):  # the run did not need it: its start-up failure is moot
            self._stack.close()

    def __enter__(self) -> "StartingExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _described(ex: Executor, choice: Choice) -> Executor:
    """The executor, its description followed by why `auto` chose it (the run's `cluster:` line)."""
    if choice.reason and choice.reason not in ex.description:
        ex.description = f"{ex.description} ({choice.reason})"
    return ex
