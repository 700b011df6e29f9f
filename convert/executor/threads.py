"""An in-process Executor on daemon threads: small plans under `cluster.kind: auto`, `kind: threads`, tests.

The threads are daemons and a stopped run does not wait for them: after Ctrl-C / SIGTERM (or any
exception leaving the executor's block) the queued tasks are dropped and the running ones are left
to die with the process, as a LocalCluster's workers are when the client closes it. A shard cut
short leaves only a staged temp file (publishing is atomic; the next run's lease holder clears it).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..secrets import register, unregister
from . import Completion, Executor, check_stop, stoppable

_Task = tuple[str, Callable[..., Any], tuple[Any, ...], int]


class ThreadExecutor(Executor):
    """Tasks run on `threads` threads of this process; a task that raises is rerun `retries` times."""

    def __init__(self, threads: int = 2) -> None:
        self._threads = threads
        self._tasks: queue.Queue[_Task | None] = queue.Queue()
        self._done: queue.Queue[Completion] = queue.Queue()
        self._pending = 0
        self._closed = threading.Event()
        self._workers = [
            threading.Thread(target=self._work, name=f"convert-task-{i}", daemon=True) for i in range(threads)
        ]
        for worker in self._workers:
            worker.start()
        self.description = f"ThreadExecutor {threads} thread{'s' if threads != 1 else ''} in this process"

    def slots(self) -> int:
        return self._threads

    @property
    def in_flight(self) -> int:
        return self._pending

    def submit(self, name: str, fn: Callable[..., Any], *args: Any, retries: int = 0) -> None:
        self._pending += 1
        self._tasks.put((name, fn, args, retries))

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None and not self._closed.is_set():
            name, fn, args, retries = task
            try:
                done = Completion(name, _attempt(fn, args, retries))
            except BaseException as exc:  # noqa: BLE001 - reported as the task's outcome, like a Dask future
                done = Completion(name, error=exc)
            self._done.put(done)

    def completions(self) -> Iterator[Completion]:
        while self._pending:
            with stoppable():
                while True:
                    check_stop()
                    try:
                        done = self._done.get(timeout=0.05)
                        break
                    except queue.Empty:
                        continue
            self._pending -= 1
            yield done

    @contextlib.contextmanager
    def share_secrets(self, values: dict[str, str]) -> Iterator[None]:
        register(values)  # one process: the registry is shared with the task threads
        try:
            yield
        finally:
            unregister(values)

    def close(self, wait: bool = True) -> None:
        """Stop the threads once their current task ends (`wait`: and join them); queued tasks are dropped."""
        if not self._closed.is_set():
            self._closed.set()
            for _ in self._workers:
                self._tasks.put(None)
        if wait:
            for worker in self._workers:
                worker.join()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(wait=exc_type is None)  # stopped or failed: leave running tasks to the process's end


def _attempt(fn: Callable[..., Any], args: tuple[Any, ...], retries: int) -> Any:
    """fn(*args), rerun up to `retries` times while it raises an Exception."""
    for left in range(retries, -1, -1):
        try:
            return fn(*args)
        except Exception:
            if not left:
                raise
    raise AssertionError("unreachable")
