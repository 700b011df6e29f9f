"""ThreadExecutor: the in-process executor small plans run on (`cluster.kind: auto`): results, retries,
and a stopped run that does not wait for its running shards."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from convert.executor.threads import ThreadExecutor


def test_tasks_run_in_this_process_and_failures_are_retried_then_reported() -> None:
    calls: list[str] = []

    def flaky(name: str, fail_times: int) -> str:
        calls.append(name)
        if calls.count(name) <= fail_times:
            raise ValueError(f"{name} failed")
        return name.upper()

    with ThreadExecutor(2) as ex:
        ex.submit("a", flaky, "a", 1, retries=1)
        ex.submit("b", flaky, "b", 5, retries=2)
        assert ex.in_flight == 2 and ex.slots() == 2
        done = {c.name: c for c in ex.completions()}
    assert done["a"].result == "A" and done["a"].error is None
    assert isinstance(done["b"].error, ValueError) and calls.count("b") == 3
    assert ex.in_flight == 0


def test_a_stopped_run_does_not_wait_for_its_running_tasks() -> None:
    """Ctrl-C / SIGTERM leave the executor's block with an exception: it returns at once, and the
    task threads are daemons, so the process can exit while a shard still waits on a slow server."""
    release = threading.Event()
    started = threading.Event()

    def slow() -> None:
        started.set()
        release.wait(30)

    ex = ThreadExecutor(1)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with ex:
            ex.submit("slow", slow)
            ex.submit("queued", slow)  # never starts
            assert started.wait(5)
            raise KeyboardInterrupt
    assert time.monotonic() - t0 < 2
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("convert-task-"))
    release.set()


def test_shards_closing_on_two_threads_leave_stderr_as_it_was() -> None:
    """Shards run on threads of one process under `auto`: muting one thread's stderr while it closes a
    writer must leave sys.stderr as it was however two closes interleave (else the summary is lost)."""
    from convert.mute import muted

    real = sys.stderr
    a, b = muted(), muted()
    a.__enter__()  # shard A closes its writer ...
    b.__enter__()  # ... while shard B, on another thread, closes its own
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    swapped, sys.stderr = sys.stderr, real
    assert swapped is real
