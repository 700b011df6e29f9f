"""Quiet logging of expected cancellations: what Dask logs when a stopped run cancels its tasks.

On Ctrl-C / SIGTERM the client cancels the shard tasks in flight; each worker then logs "Async
instruction ... ended with CancelledError" (distributed.worker.state_machine, WARNING) and the
client side may log a CancelledError too. They are expected and not the user's business, so the
command line installs `CancelledFilter` in its own process (`install()`) and, as a Dask worker
preload (`dask_setup`, named in `distributed.worker.preload` by convert.cli_common), in every
LocalCluster worker. Dependency-free: a worker imports it in microseconds.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import CancelledError as FutureCancelled
from typing import Any

LOGGERS = (
    "distributed",
    "distributed.client",
    "distributed.core",
    "distributed.nanny",
    "distributed.scheduler",
    "distributed.worker",
    "distributed.worker.state_machine",
    "asyncio",
    "tornado.application",
)


class CancelledFilter(logging.Filter):
    """Drops records about asyncio / concurrent.futures CancelledError; keeps everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (asyncio.CancelledError, FutureCancelled)):
            return False
        return "CancelledError" not in record.getMessage()


FILTER = CancelledFilter()


def install() -> None:
    """Add the filter to the loggers that log cancellations (idempotent). A logger's filter sees
    the records logged on that logger itself, which is where each of these messages is made."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if FILTER not in logger.filters:
            logger.addFilter(FILTER)


def dask_setup(worker: Any = None) -> None:
    """Dask's worker preload hook (`distributed.worker.preload: [convert.quietlog]`)."""
    install()
