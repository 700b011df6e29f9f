"""Review of wave 4 (batched submission, the thread's curl engine, the lazy dashboard, scandir listing,
streamed stale-file removal): each test shows one bug the review confirmed, now fixed (regression tests)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest

from convert import run
from convert.config import load_config
from convert.sources import Workdir, plan_source
from convert.testing import images as gen

_CONCURRENT_FIRST_VISITS = """
import socket
from convert.config import ClusterConfig
from convert.executor.cluster import open_client
if __name__ == "__main__":
    with open_client(ClusterConfig(workers=1)) as handle:
        handle.client.submit(sum, [1, 2]).result()
        host, port = handle.dashboard_link.split("//")[1].split("/")[0].split(":")
        socks = [socket.create_connection((host, int(port)), timeout=60) for _ in range(4)]
        for s in socks:  # four tabs (or a tab and a link preview) open the printed link at once
            s.sendall(b"GET /status HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
        for s in socks:
            while s.recv(65536):
                pass
        apps = handle.cluster.scheduler.http_application.applications
        print(sum(type(a).__name__ == "DaskBokehTornado" for a in apps))
"""


@pytest.mark.cluster
def test_concurrent_first_visits_connect_the_dashboard_once(tmp_path: Path) -> None:
    """Visits arriving together at the lazy dashboard build it once (each had connected its own copy)."""
    script = tmp_path / "visits.py"
    script.write_text(_CONCURRENT_FIRST_VISITS)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "1"  # one dashboard, however many tabs asked for it first


def _cached_memory_folder() -> str:
    """A class-folder of images in fsspec's memory filesystem; its URI through simplecache::."""
    root = f"/review-{uuid.uuid4().hex[:8]}"
    mem = fsspec.filesystem("memory")
    for i in range(3):
        mem.pipe(f"{root}/cat/{i}.jpg", gen.jpeg_bytes(20, 20, seed=i))
        mem.pipe(f"{root}/{i}.jpg", gen.jpeg_bytes(20, 20, seed=10 + i))
    return f"simplecache::memory://{root}"


def test_a_folder_behind_fsspec_simplecache_is_listed_from_its_remote_filesystem(tmp_path: Path) -> None:
    """simplecache:: sets `local_file` but lists the remote filesystem: not read with os.scandir."""
    uri = _cached_memory_folder()
    config = load_config(
        None, {"source.uri": uri, "output.uri": str(tmp_path / "out"), "cluster.kind": "threads", "image.size": 16}
    )
    source_plan = plan_source(config.source, 2, Workdir(str(tmp_path / "work")))
    assert source_plan.items == 6
    summary = run(config, log=lambda m: None)
    assert (summary.items_ok, summary.exit_code()) == (6, 0)
