"""Warm worker processes for a LocalCluster: a preloaded multiprocessing forkserver.

With the default ``spawn`` method every worker process starts a fresh interpreter and imports
distributed, numpy, h5py, Pillow and the convert worker code itself (~1 s of CPU per worker on a
small machine), and finalizes the interpreter again on close. With ``forkserver`` one server process
imports all of that once - started early, it does so while the client is still importing and planning
- and each worker is a fork of it; a forked worker also leaves with ``os._exit``, so closing the
cluster does not wait for interpreter teardown.

Ctrl-C: the server is started with SIGINT ignored (main thread) or blocked (any other thread), and
every worker it forks inherits that, including ones a nanny restarts later; a terminal's Ctrl-C then
stops only the client, which shuts the workers down itself (tests/test_interrupts.py).

Environment: a forked worker sees the environment the server was started with, so the server is
restarted whenever this process's environment changed since (a library user setting credentials
between two runs keeps working). ``CONVERT_WORKER_START=spawn`` restores the old start method.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: environment variable choosing how LocalCluster workers start: forkserver (default) or spawn
WORKER_START_ENV = "CONVERT_WORKER_START"

_LOCK = threading.Lock()
_STARTED_WITH: dict[str, str] | None = None  # os.environ when the running forkserver was started


def start_method() -> str:
    """'forkserver' where the platform has it (unless $CONVERT_WORKER_START says spawn), else 'spawn'."""
    wanted = os.environ.get(WORKER_START_ENV, "forkserver").strip().lower() or "forkserver"
    if wanted not in ("forkserver", "spawn"):
        from ..config import ConfigError

        raise ConfigError(f"${WORKER_START_ENV}={wanted!r}: expected forkserver or spawn")
    if wanted == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return wanted


def ensure_forkserver() -> None:
    """Start (or restart, if the environment changed) the preloaded forkserver; returns at once,
    the server imports its modules in the background. Safe from any thread."""
    global _STARTED_WITH
    from multiprocessing import forkserver

    with _LOCK:
        _apply_pre_spawn_environ()
        server: Any = forkserver._forkserver  # the process-wide server multiprocessing uses (private API)
        alive = server._forkserver_pid is not None and os.waitpid(server._forkserver_pid, os.WNOHANG)[0] == 0
        if alive and _STARTED_WITH == dict(os.environ):
            return
        if alive:
            server._stop()  # forked workers would miss the new variables
        multiprocessing.set_forkserver_preload(["convert.executor._preload", *_main_script_imports()])
        with _sigint_off():
            forkserver.ensure_running()
        _STARTED_WITH = dict(os.environ)


def _main_script_imports() -> list[str]:
    """A worker re-runs a main *script* (the `convert-dataset` entry point, not `python -m convert`)
    as __mp_main__, which imports convert.cli: preload that too."""
    main = sys.modules.get("__main__")
    is_script = getattr(getattr(main, "__spec__", None), "name", None) is None and getattr(main, "__file__", None)
    return ["convert.cli"] if is_script and "convert.cli" in sys.modules else []


def _apply_pre_spawn_environ() -> None:
    """What a nanny puts in os.environ before each spawn (OMP/MKL/OpenBLAS threads = 1, malloc trim,
    a fixed PYTHONHASHSEED), set before the server starts so the preloaded numpy and every forked
    worker see it; since nannies set the same values again, the snapshot compared above stays stable."""
    env = {str(k): os.environ.get(str(k), str(v)) for k, v in _pre_spawn_config().items() if v is not None}
    if env.get("PYTHONHASHSEED") in (None, "0"):  # as distributed.nanny does: consistent hashing in workers
        env["PYTHONHASHSEED"] = "6640"
    os.environ.update(env)


def _pre_spawn_config() -> dict[str, Any]:
    """distributed.nanny.pre-spawn-environ: from dask's config once distributed is imported, else from
    the file distributed ships (importing dask costs ~0.4 s; a user override missed here only means
    the server is restarted with it when the cluster starts)."""
    if "distributed" in sys.modules:
        import dask.config

        return dict(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {})
    try:
        import yaml

        spec = importlib.util.find_spec("distributed")
        folder = list(spec.submodule_search_locations or [])[0] if spec else ""
        with open(os.path.join(folder, "distributed.yaml")) as f:
            return dict(yaml.safe_load(f)["distributed"]["nanny"]["pre-spawn-environ"] or {})
    except (ImportError, OSError, IndexError, KeyError, TypeError, ValueError):
        return {}


def claim_preload() -> None:
    """distributed sets its own preload list (importing pandas here to test for it) the first time it
    uses a forkserver context; mark that as done so our list stays."""
    import distributed.utils

    if hasattr(distributed.utils, "_forkserver_preload_set"):  # called before the cluster starts
        distributed.utils._forkserver_preload_set = True


@contextmanager
def _sigint_off() -> Iterator[None]:
    """SIGINT ignored (main thread) or blocked (other threads) while the server process is created:
    the server and every process it forks inherit it."""
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
