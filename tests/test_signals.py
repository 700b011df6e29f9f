"""Ctrl-C and SIGTERM of a real `python -m convert` in states the run's own handling does not cover:
while the command line is still importing and starting, and while a fetch hangs in a blocking call
(urllib3, threads executor) - the process ends in every state, with one line and no traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert.testing import images as gen
from convert.testing.http import StaticServer
from convert.testing.proxy import FaultProxy, Rule


def _run(source: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        "-m",
        "convert",
        "run",
        "--source",
        str(source),
        "--output",
        str(out),
        "--size",
        "16",
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.cluster
@pytest.mark.parametrize("delay", [0.25, 0.5, 0.8, 1.5])
def test_ctrl_c_while_starting_is_one_line_and_exit_130(tmp_path: Path, delay: float) -> None:
    """From the interpreter's first imports to the cluster starting: never a KeyboardInterrupt traceback."""
    src = tmp_path / "src"
    gen.write_image_folder(src, {"a": 40}, size=(20, 20))
    proc = _run(src, tmp_path / "out", "--shard-size", "2", "--workers", "1")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")  # a fast machine: nothing to interrupt
    if "init_import_site" in err:
        pytest.skip("the signal came before the interpreter ran any code of ours")  # a very loaded machine
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "CancelledError" not in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("interrupted")]) == 1, err


@pytest.mark.slow
def test_sigterm_ends_a_run_whose_fetch_hangs(tmp_path: Path) -> None:
    """The server stops sending mid-body and the fetch's own limits are far away: SIGTERM (docker
    stop, `timeout`, a batch system's job end) still ends the run, within the stop grace."""
    from convert.cli_common import STOP_GRACE

    root = tmp_path / "www"
    paths = gen.write_image_folder(root, {"x": 2}, size=(64, 64))
    with StaticServer(root=root) as server:
        proxy = FaultProxy(server.url, default=Rule(stall_after=200)).start()
        try:
            lst = root / "urls.txt"
            lst.write_text("".join(f"{proxy.url}/x/{p.name}\n" for p in paths))
            proc = _run(
                lst,
                tmp_path / "out",
                "--set",
                "cluster.kind=threads",
                "--set",
                "fetch.backend=urllib3",
                "--set",
                "fetch.timeout=300",
                "--set",
                "fetch.item_timeout=600",
                "--set",
                "fetch.retries=0",
                "--set",
                "fetch.allow_private_networks=true",
            )
            deadline = time.monotonic() + 60
            while proxy.connections == 0 and time.monotonic() < deadline:  # the fetch has begun
                time.sleep(0.05)
            time.sleep(0.5)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=STOP_GRACE + 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"SIGTERM did not end the run: {proc.communicate()[1]}")
        finally:
            proxy.stop()
    assert proc.returncode == 143 and time.monotonic() - sent < STOP_GRACE + 5, err
    assert "Traceback" not in err and "interrupted" in err, err
