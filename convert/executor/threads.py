"""An in-process Executor on a thread pool: proves the seam and runs unit tests without Dask."""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..secrets import register, unregister
from . import Completion, Executor, check_stop, stoppable


class ThreadExecutor(Executor):
    """Tasks run on `threads` threads of this process; a task that raises is rerun `retries` times."""

    def __init__(self, threads: int = 2) -> None:
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="convert-task")
        self._done: queue.Queue[Completion] = queue.Queue()
        self._pending = 0
        self.description = f"ThreadExecutor {threads} thread{'s' if threads != 1 else ''} in this process"

    def slots(self) -> int:
        return self._threads

    @property
    def in_flight(self) -> int:
        return self._pending

    def submit(self, name: str, fn: Callable[..., Any], *args: Any, retries: int = 0) -> None:
        def attempt() -> Any:
            for left in range(retries, -1, -1):
                try:
                    return fn(*args)
                except Exception:
                    if not left:
                        raise
            raise AssertionError("unreachable")

        def finished(fut: Future) -> None:
            error = fut.exception()
            self._done.put(Completion(name, None if error else fut.result(), error))

        self._pending += 1
        self._pool.submit(attempt).add_done_callback(finished)

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

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
