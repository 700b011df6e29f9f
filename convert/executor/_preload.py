"""Imported once by the LocalCluster forkserver (convert.executor.warm): everything a worker process
needs to run shard tasks, so each forked worker starts warm. A module that fails to import is left
for the worker to import (and report) itself - the server must never die of it."""

from __future__ import annotations

import atexit
import importlib
import os

MODULES = (
    "numpy",
    "numpy.random",
    "PIL.Image",
    "h5py",
    "distributed",
    "distributed.nanny",
    "distributed.worker",
    "distributed.http.worker.prometheus",
    "convert.worker",
    "convert.formats.hdf5",
    "convert.formats.lmdb",
    "convert.decoders",
)

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001,S112 - optional extras (lmdb, ...) or a broken install: the worker says so
        continue


_SERVER = os.getpid()


def _exit_at_once() -> None:
    """The server leaves when its client does (its alive pipe closes); skip tearing down numpy, h5py
    and distributed - that took ~0.5 s, during which the server still held the client's stdout/stderr
    open (a `| tee` or a captured subprocess waited for it). Forked workers never run atexit."""
    if os.getpid() == _SERVER:
        os._exit(0)


atexit.register(_exit_at_once)
