"""`python -m convert ...` is the same as `convert-dataset ...`.

Ctrl-C / SIGTERM while the command line itself is still being imported end it with one line (the
command installs its own handling, convert.cli_common, as soon as it starts)."""

import os
import signal
import sys


def _early_stop(signum: int, frame: object) -> None:
    os.write(2, b"interrupted while starting; rerun the same command\n")
    os._exit(143 if signum == signal.SIGTERM else 130)


signal.signal(signal.SIGINT, _early_stop)
signal.signal(signal.SIGTERM, _early_stop)

from .cli import entry  # noqa: E402 - after the handlers: importing click, rich and pydantic takes a while

entry()
