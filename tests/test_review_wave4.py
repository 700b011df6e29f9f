"""Review of wave 4 (batched submission, the thread's curl engine, the lazy dashboard, scandir listing,
streamed stale-file removal): a bug the review confirmed, now fixed (regression test); its other find,
concurrent first dashboard visits, is tested beside the lazy dashboard in tests/test_cluster.py."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec

from convert import run
from convert.config import load_config
from convert.sources import Workdir, plan_source
from convert.testing import images as gen


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
