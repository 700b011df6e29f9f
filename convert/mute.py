"""Silence one thread's stderr and unraisable-exception echoes while it closes a shard writer.

h5py handles that fail to flush (a full disk) print "Exception ignored" tracebacks from their
finalizers; the error itself is raised and reported in one line, so the echoes are noise. Python
offers only process-wide switches (`sys.stderr`, `sys.unraisablehook`), and with shards converting
on several threads of one process (`cluster.kind: threads` / auto) swapping them per shard raced:
a thread restored another's replacement and the run's summary went into a StringIO. So the
switches are installed once while any thread needs them (a count under a lock) and drop only what
the muted threads write; every other thread's output passes through.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

_LOCK = threading.Lock()
_MUTED: Counter[int] = Counter()  # thread ident -> nesting depth
_SAVED: list[Any] = []  # (stderr, unraisablehook) while installed


class _ThreadFilteredStream:
    """A stream that drops the writes of muted threads and passes the rest to the real one."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def write(self, text: str) -> int:
        if threading.get_ident() in _MUTED:
            return len(text)
        return self._real.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _hook(unraisable: Any) -> None:
    if threading.get_ident() not in _MUTED and _SAVED:
        _SAVED[1](unraisable)


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """This thread's stderr writes and unraisable echoes are dropped for the block."""
    me = threading.get_ident()
    with _LOCK:
        if not _SAVED:
            _SAVED[:] = [sys.stderr, sys.unraisablehook]
            sys.stderr, sys.unraisablehook = _ThreadFilteredStream(sys.stderr), _hook
        _MUTED[me] += 1
    try:
        yield
    finally:
        with _LOCK:
            _MUTED[me] -= 1
            if _MUTED[me] <= 0:
                del _MUTED[me]
            if not _MUTED and _SAVED:
                sys.stderr, sys.unraisablehook = _SAVED
                _SAVED.clear()
