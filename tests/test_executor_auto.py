"""`cluster.kind: auto` (the default): which executor a run gets for its plan, and what the run says.

Real executors (threads in this process, a real LocalCluster) behind StartingExecutor, as orchestrate
uses it; the rule itself is a pure function (convert.executor.auto.choose_cluster)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from convert.config import ClusterConfig, SourceConfig, load_config
from convert.executor.auto import LARGE_LIST_BYTES, SMALL_ITEMS, SMALL_SHARDS, choose_cluster, likely_large
from convert.executor.early import StartingExecutor
from convert.testing import images as gen
from convert.testing.http import StaticServer
from convert.testing.proxy import FaultProxy, Rule

ROOT = Path(__file__).resolve().parents[1]


def test_auto_is_the_default_and_a_small_plan_runs_in_process() -> None:
    cfg = load_config(None, {"source.uri": "x", "output.uri": "y"}).cluster
    assert cfg.kind == "auto"
    choice = choose_cluster(cfg, shards=1, items=10)
    assert choice.config.kind == "threads" and choice.config.workers == 1  # one shard: one thread
    assert choice.reason == f"auto: 1 shard, 10 items <= {SMALL_SHARDS} shards and {SMALL_ITEMS} items"
    assert choose_cluster(cfg, shards=SMALL_SHARDS, items=SMALL_ITEMS).config.kind == "threads"


@pytest.mark.parametrize("shards,items", [(SMALL_SHARDS + 1, 10), (1, SMALL_ITEMS + 1), (None, None)])
def test_auto_uses_a_local_cluster_beyond_the_rule_or_without_a_plan(shards, items) -> None:
    choice = choose_cluster(ClusterConfig(), shards=shards, items=items)
    assert choice.config.kind == "local" and choice.reason.startswith("auto: ")


def test_explicit_kinds_and_schedulers_are_kept() -> None:
    for kind in ("local", "threads", "slurm", "pbs"):
        assert choose_cluster(ClusterConfig(kind=kind), shards=1, items=1).config.kind == kind
    external = choose_cluster(ClusterConfig(scheduler="tcp://127.0.0.1:8786"), shards=1, items=1)
    assert external.config.kind == "local" and external.config.scheduler  # open_client connects to it


def test_only_a_large_local_list_counts_as_obviously_large(tmp_path: Path) -> None:
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("http://example.invalid/a.jpg\n")
    with big.open("wb") as f:
        f.truncate(LARGE_LIST_BYTES)
    assert not likely_large(SourceConfig(uri=str(small))) and likely_large(SourceConfig(uri=str(big)))
    assert not likely_large(SourceConfig(uri=str(tmp_path)))  # a folder: not guessed before listing
    assert not likely_large(SourceConfig(uri="s3://bucket/list.txt")) and not likely_large(None)


def test_a_small_plan_gets_threads_and_the_cluster_line_says_why(tmp_path: Path) -> None:
    source = SourceConfig(uri=str(tmp_path))
    with StartingExecutor(ClusterConfig(), source=source) as starting:
        with starting.executor(shards=2, items=20) as ex:
            assert ex.description == (
                "ThreadExecutor 2 threads in this process "
                f"(auto: 2 shards, 20 items <= {SMALL_SHARDS} shards and {SMALL_ITEMS} items)"
            )
            ex.submit("a", os.getpid)
            (done,) = list(ex.completions())
            assert done.result == os.getpid()  # in this process: no cluster was started


@pytest.mark.cluster
def test_a_large_plan_gets_a_local_cluster_and_the_cluster_line_says_why(tmp_path: Path) -> None:
    source = SourceConfig(uri=str(tmp_path))
    with StartingExecutor(ClusterConfig(workers=1, dashboard=False), source=source) as starting:
        with starting.executor(shards=SMALL_SHARDS + 1, items=50) as ex:
            assert ex.description.startswith("LocalCluster 1 worker x 1 thread (auto: ")
            assert f"> {SMALL_SHARDS} shards" in ex.description
            ex.submit("a", os.getpid)
            (done,) = list(ex.completions())
            assert done.result != os.getpid()  # a worker process


@pytest.mark.cluster
def test_a_large_local_list_starts_its_local_cluster_while_planning(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        f.truncate(LARGE_LIST_BYTES)
    with StartingExecutor(ClusterConfig(workers=1, dashboard=False), source=SourceConfig(uri=str(big))) as starting:
        with starting.executor(shards=1, items=1) as ex:  # started before the plan was known: used anyway
            assert ex.description == "LocalCluster 1 worker x 1 thread (auto: a large source list)"


def _cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "convert", "run", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, **kw)


@pytest.mark.cluster
def test_a_ten_image_run_converts_in_process_and_says_why(tmp_path: Path) -> None:
    gen.write_image_folder(tmp_path / "src", {"a": 5, "b": 5}, size=(32, 32))
    proc = _cli("--source", str(tmp_path / "src"), "--output", str(tmp_path / "out"), "--size", "16")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    line = next(ln for ln in out.splitlines() if ln.startswith("cluster:"))
    assert line.startswith("cluster: ThreadExecutor 1 thread in this process (auto: 1 shard, 10 items <= "), line


@pytest.mark.timeout(120)
def test_sigterm_ends_a_small_run_at_once_while_its_shards_wait_on_a_slow_server(tmp_path: Path) -> None:
    """A small plan runs on threads of the client: SIGTERM must not wait for the shards in flight."""
    paths = gen.write_image_folder(tmp_path / "www", {"x": 8}, size=(16, 16))
    with StaticServer(root=tmp_path / "www") as server:
        proxy = FaultProxy(server.url, default=Rule(latency=3.0)).start()
        try:
            urls = tmp_path / "urls.txt"
            urls.write_text("".join(f"{proxy.url}/x/{p.name}\n" for p in paths))
            args = ["--source", str(urls), "--output", str(tmp_path / "out"), "--shard-size", "4", "--size", "8"]
            sets = ["fetch.threads=1", "fetch.allow_private_networks=true", "cluster.kind=threads"]  # what auto picks
            proc = _cli(*args, *(arg for kv in sets for arg in ("--set", kv)))
            assert proc.stdout is not None
            for line in proc.stdout:  # the shards are running once the executor is announced
                if line.startswith("cluster:"):
                    break
            time.sleep(0.5)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=60)
            assert proc.returncode == 143, rest
            assert time.monotonic() - sent < 2.5, "the run waited for its running shards"  # each needs 4 x 3 s
            assert "interrupted:" in rest and "Traceback" not in rest
        finally:
            proxy.stop()
