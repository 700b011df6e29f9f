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

import atexit
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

from . import quietlog
from .config import ConfigError, parse_override
from .redact import redact_text

console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)
STOP_GRACE = 10.0  # seconds a stopped run has to wind down before the process ends regardless
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def _user_errors() -> tuple[type[BaseException], ...]:
    from .executor.cluster import ClusterError
    from .manifest import ManifestError
    from .persist import PersistError
    from .sources import SourceError

    return (
        ConfigError,
        ManifestError,
        SourceError,
        PersistError,
        ClusterError,
        FileNotFoundError,
        PermissionError,
        ImportError,
    )


WHOLE_PROCESS: list[bool] = []  # set by the command-line entry points: this process is ours to end


def exit_now(code: int) -> None:
    """Exit with `code`: Python's atexit handlers, log handlers and stdio are flushed, then the
    process leaves without the C library's exit handlers. libhdf5 registers one that closes every
    handle still open; after a failed write (a full disk) in a shard run in this process it
    crashed on a half-closed dataset (SIGSEGV, exit -11, after the one-line error). In-process
    callers (click's CliRunner, tests) get an ordinary SystemExit."""
    if not WHOLE_PROCESS:  # in-process callers
        sys.exit(code)
    h5py = sys.modules.get("h5py")
    if h5py is not None:  # its atexit handler unregisters HDF5's type converters; a shard task left
        # running by a stopped in-process run (ThreadExecutor's daemon threads) then failed inside an
        # attribute write (KeyError, a traceback after the "interrupted" line) or crashed (SIGSEGV).
        # The process leaves by os._exit, so the converters need no cleanup.
        atexit.unregister(getattr(h5py, "_unregister_converters", lambda: None))
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-facing exceptions into a one-line error and exit code 2; Ctrl-C / SIGTERM
    anywhere in the command into one line and exit 130 / 143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = install_signal_handlers()
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except KeyboardInterrupt as exc:  # before or after a run's own handling (start-up, a report)
            name = getattr(exc, "signal_name", "SIGINT")
            console.print("interrupted; rerun the same command", highlight=False)
            exit_now(EXIT_CODES.get(name, 130))
        except Exception as exc:
            if os.environ.get("CONVERT_DEBUG"):
                raise
            user = isinstance(exc, _user_errors())
            label = "error" if user else f"error ({type(exc).__name__})"
            lines = redact_text(str(exc)).strip().splitlines() or [type(exc).__name__]  # a URL's credentials
            console.print(f"[bold red]{label}:[/] {lines[0]}", highlight=False)
            if type(exc).__name__ == "ClusterError" and len(lines) > 1:  # job script, sbatch/squeue output
                console.print("\n".join(lines[1:]), highlight=False, markup=False)
            if not user:
                console.print("set CONVERT_DEBUG=1 for the full traceback", style="dim")
            exit_now(2)
        finally:
            if not _SIGNALS:  # a command run in-process (click's CliRunner): leave the caller's handlers
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return wrapper


def storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--storage-option KEY=VALUE` pairs as a dict (values parsed like `--set`)."""
    return dict(parse_override(p) for p in pairs)


# -- signals ------------------------------------------------------------------------------------
_SIGNALS: list[str] = []  # names received, in order


def install_signal_handlers() -> dict[int, Any]:
    """Ctrl-C and SIGTERM as described in the module doc; returns the handlers they replace.
    Main thread only (elsewhere nothing is installed). Once a signal came, the handlers and the
    watchdog stay until the process ends: its shutdown is what they guard."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _SIGNALS.clear()
    quietlog.install()
    return {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


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
    # the run winds down at the executor's next poll; say so, or a user presses again to see if it heard
    notice = "stopping: cancelling the running shards (committed shards stay); press Ctrl-C again to stop at once\n"
    try:  # straight to the descriptor: a signal handler must not wait for the console's lock
        os.write(2, (("\n" if os.isatty(2) else "") + notice).encode())
    except OSError:
        pass


def _force_exit(name: str, why: str) -> None:
    """End the process now: committed shards are safe (a commit is one rename/upload + a record),
    anything half-staged is debris the next run removes. Workers of a LocalCluster exit with us
    (their parent pipe closes); the forkserver too."""
    line = f"interrupted: {why}; committed shards stay, rerun the same command to resume\n"
    cleanup = threading.Thread(target=_unlink_semaphores, daemon=True)
    cleanup.start()
    cleanup.join(1.0)
    try:  # straight to the file descriptors: the console's lock may be held by the thread we cut short
        sys.stdout.flush()
        os.write(2, (("\x1b[?25h" if os.isatty(2) else "") + line).encode())  # a progress bar hid the cursor
    except (OSError, ValueError):
        pass
    finally:
        os._exit(EXIT_CODES.get(name, 130))


def _unlink_semaphores() -> None:
    """Run multiprocessing's exit finalizers now (the ones a normal exit runs first): they unlink
    the named semaphores of the cluster's queues, which the resource tracker would otherwise
    clean up after us with a "leaked semaphore objects" warning."""
    try:
        from multiprocessing import util

        util._run_finalizers(0)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def quiet_workers() -> None:
    """Name convert.quietlog as a Dask worker preload (beside the user's own), so the workers a run
    starts drop the CancelledError lines a stop makes them log. Call before the cluster starts."""
    import dask.config

    preload = list(dask.config.get("distributed.worker.preload", None) or [])
    if quietlog.__name__ not in preload:
        dask.config.set({"distributed.worker.preload": [*preload, quietlog.__name__]})
