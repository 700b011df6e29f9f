"""What every command-line module shares: the consoles, one-line user errors, Ctrl-C/SIGTERM handling.

`cli` (run, plan, submit) and `cli_dataset` (inspect, report, verify) both import this module and
neither imports the other's internals: `cli` registers `cli_dataset`'s commands on its group.

Signals: from the first line of a command on, Ctrl-C and SIGTERM end it the same way. While a run
waits for shards the executor stops at its next poll (convert.executor.request_stop); anywhere
else the command stops at once with one line, never a traceback. A second signal, or a run that
has not wound down `STOP_GRACE` seconds after the first (a fetch stuck in a C call, a cluster
slow to close), ends the process at once: exit 130 (SIGINT) or 143 (SIGTERM) in every state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError as FutureCancelled
from typing import Any

import click
from rich.console import Console

from .config import ConfigError, parse_override

console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)
STOP_GRACE = 10.0  # seconds a stopped run has to wind down before the process ends regardless
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def _user_errors() -> tuple[type[BaseException], ...]:
    from .executor.cluster import ClusterError
    from .manifest import ManifestError
    from .persist import PersistError
    from .sources import SourceError

    return (ConfigError, ManifestError, SourceError, PersistError, ClusterError, FileNotFoundError, PermissionError,
            ImportError)  # fmt: skip


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-facing exceptions into a one-line error and exit code 2; Ctrl-C / SIGTERM
    anywhere in the command into one line and exit 130 / 143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        install_signal_handlers()
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except KeyboardInterrupt as exc:  # before or after a run's own handling (start-up, a report)
            name = getattr(exc, "signal_name", "SIGINT")
            console.print("interrupted; rerun the same command", highlight=False)
            sys.exit(EXIT_CODES.get(name, 130))
        except Exception as exc:
            if os.environ.get("CONVERT_DEBUG"):
                raise
            user = isinstance(exc, _user_errors())
            label = "error" if user else f"error ({type(exc).__name__})"
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            console.print(f"[bold red]{label}:[/] {lines[0]}", highlight=False)
            if type(exc).__name__ == "ClusterError" and len(lines) > 1:  # job script, sbatch/squeue output
                console.print("\n".join(lines[1:]), highlight=False, markup=False)
            if not user:
                console.print("set CONVERT_DEBUG=1 for the full traceback", style="dim")
            sys.exit(2)

    return wrapper


def storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--storage-option KEY=VALUE` pairs as a dict (values parsed like `--set`)."""
    return dict(parse_override(p) for p in pairs)


# -- signals ------------------------------------------------------------------------------------
_SIGNALS: list[str] = []  # names received, in order


def install_signal_handlers() -> None:
    """Ctrl-C and SIGTERM as described in the module doc (main thread only: a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _SIGNALS.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    quiet_cancellations()


def _on_signal(signum: int, frame: Any) -> None:
    from .executor import Stopped, request_stop

    name = signal.Signals(signum).name
    _SIGNALS.append(name)
    if len(_SIGNALS) > 1:
        _force_exit(_SIGNALS[0], "stopped at once (second signal)")
    timer = threading.Timer(STOP_GRACE, _force_exit, (name, f"the run did not wind down within {STOP_GRACE:.0f} s"))
    timer.daemon = True
    timer.start()
    if not request_stop(name):
        raise Stopped(name)


def _force_exit(name: str, why: str) -> None:
    """End the process now: committed shards are safe (a commit is one rename/upload + a record),
    anything half-staged is debris the next run removes. Workers of a LocalCluster exit with us
    (their parent pipe closes); the forkserver too."""
    try:
        console.print(f"interrupted: {why}; committed shards stay, rerun the same command to resume", highlight=False)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(EXIT_CODES.get(name, 130))


class _NoCancellations(logging.Filter):
    """Drops log records about asyncio/concurrent CancelledError (what Dask's client and scheduler
    log when a run stops and its futures are cancelled): expected, and not the user's business."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (asyncio.CancelledError, FutureCancelled)):
            return False
        return "CancelledError" not in record.getMessage()


_FILTER = _NoCancellations()


def quiet_cancellations() -> None:
    """Install the CancelledError filter on the loggers and handlers that would print it."""
    for name in ("distributed", "distributed.client", "distributed.scheduler", "distributed.worker",
                 "distributed.core", "distributed.nanny", "asyncio", "tornado.application"):  # fmt: skip
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
