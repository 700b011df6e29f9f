"""Real headless Chromium for tests: dump a page's DOM after its scripts ran, or screenshot it.

    dom = chromium_dom("file:///tmp/report.html")          # serialized DOM (str)
    chromium_screenshot("file:///tmp/report.html", png)    # writes png (1280 x 2400 by default)

Debian's `chromium` package (/usr/bin/chromium). Runs as root in containers, so the sandbox is off;
every background service that could reach the network (component updates, sync, QUIC, first-run
fetches) is disabled, and each call gets a fresh, empty profile directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium_path() -> str | None:
    """The Chromium executable, or None if it is not installed."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="convert-chromium-") as profile:
        result = subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "HOME": profile},
        )
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited {result.returncode}: {result.stderr[-2000:]}")
    return result


def chromium_dom(url: str, timeout: float = 120) -> str:
    """The page's DOM serialized after load (scripts have run), as `--dump-dom` prints it."""
    return _run(["--dump-dom", url], timeout).stdout


def chromium_screenshot(url: str, png: str | Path, width: int = 1280, height: int = 2400, timeout: float = 120) -> Path:
    """A PNG screenshot of the page at the given window size."""
    png = Path(png)
    _run([f"--screenshot={png}", f"--window-size={width},{height}", url], timeout)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png
