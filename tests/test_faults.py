"""Surviving dead processes, with real `dask scheduler`/`dask worker` processes on 127.0.0.1.

A worker death costs a re-run of its shard, a killed client costs only the uncommitted shards,
and a shard that kills its worker every time fails alone as KilledWorker.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convert.store import open_store
from convert.config import load_config
from convert.dataset import open_dataset
from convert import run
from convert.ledger import read_ledger
from convert.manifest import read_manifest
from convert.shards import verify
from convert.testing import images as gen
from convert.testing.dask import DaskProcesses
from convert.testing.http import StaticServer
from convert.testing.proxy import FaultProxy, Rule

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SHARDS = 20
PER_SHARD = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with DaskProcesses(tmp_path_factory.mktemp("dask"), workers=2) as dp:
        yield dp


@pytest.fixture(scope="module")
def slow_urls(tmp_path_factory):
    """A URL list served through a latency-adding proxy: each shard takes about a second."""
    root = tmp_path_factory.mktemp("www")
    paths = gen.write_image_folder(root, {"x": SHARDS * PER_SHARD}, size=(48, 40))
    with StaticServer(root=root) as server:
        proxy = FaultProxy(server.url, default=Rule(latency=0.2)).start()
        listing = root / "urls.csv"
        with open(listing, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "key"])
            w.writerows([f"{proxy.url}/x/{p.name}", p.stem] for p in paths)
        yield listing, [p.stem for p in paths]
        proxy.stop()


def cli_args(source: Path, out: Path, scheduler: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "convert",
        "run",
        "--source",
        str(source),
        "--output",
        str(out),
        "--scheduler",
        scheduler,
        "--shard-size",
        str(PER_SHARD),
        "--threads",
        "1",
        "--size",
        "16",
        "--set",
        "fetch.allow_private_networks=true",
    ]


def wait_for_records(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list((out / "shards").glob("*.record.gz"))) < n:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "client exited early"
        assert time.monotonic() < deadline, "shards did not complete in time"
        time.sleep(0.05)


def shard_digests(out: Path) -> list[tuple[str, str]]:
    return [(s["name"], s["sha256"]) for s in read_manifest(open_store(str(out)))["shards"]]


def test_external_scheduler_equals_local_cluster_byte_for_byte(cluster, tmp_path):
    root = tmp_path / "src"
    gen.write_image_folder(root, {"a": 7, "b": 6}, size=(50, 40))
    results = {}
    for name, extra in (("remote", {"cluster.scheduler": cluster.address}), ("local", {"cluster.workers": 2})):
        cfg = load_config(
            None,
            {
                "source.uri": str(root),
                "output.uri": str(tmp_path / name),
                "shard.size": 4,
                "image.size": 16,
                "output.format": "lmdb",
                **extra,
            },
        )
        summary = run(cfg, log=lambda m: None)
        assert summary.exit_code() == 0
        results[name] = tmp_path / name
    assert shard_digests(results["remote"]) == shard_digests(results["local"])
    a, b = open_dataset(str(results["remote"])), open_dataset(str(results["local"]))
    assert len(a) == len(b) == 13
    for x, y in zip(a, b):
        assert (x["key"], x["label"]) == (y["key"], y["label"])
        np.testing.assert_array_equal(x["image"], y["image"])


def test_sigkill_worker_mid_run_completes(cluster, slow_urls, tmp_path):
    listing, keys = slow_urls
    out = tmp_path / "out"
    proc = subprocess.Popen(cli_args(listing, out, cluster.address), stderr=subprocess.PIPE, text=True)
    wait_for_records(out, 3, proc)
    cluster.kill_worker(0)
    assert proc.wait(300) == 0, proc.stderr.read()
    assert all(c.ok for c in verify(open_store(str(out))))
    ledger = read_ledger(open_store(str(out)))
    assert sorted(ledger["key"]) == sorted(keys)  # every input item exactly once
    assert set(ledger["status"]) == {"ok"}
    cluster.wait_for_workers(2)  # the nanny restarted it


def test_sigkill_client_then_rerun_redoes_only_uncommitted(cluster, slow_urls, tmp_path):
    listing, _ = slow_urls
    clean = tmp_path / "clean"
    assert subprocess.run(cli_args(listing, clean, cluster.address), capture_output=True).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen(cli_args(listing, out, cluster.address), stderr=subprocess.PIPE, text=True)
    wait_for_records(out, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (out / "manifest.json").exists()  # nothing a reader would trust
    time.sleep(2)  # tasks the dead client released may still finish and commit: that is fine
    committed = len(list((out / "shards").glob("*.record.gz")))
    rerun = subprocess.run(cli_args(listing, out, cluster.address), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    resumed = int(rerun.stderr.split("shards (")[1].split(" already committed")[0])
    assert committed <= resumed < SHARDS
    assert shard_digests(out) == shard_digests(clean)
    assert json.loads((out / "manifest.json").read_text())["totals"]["ok"] == SHARDS * PER_SHARD


def test_kill_and_rerun_loop_ends_identical_to_a_clean_run(cluster, slow_urls, tmp_path):
    """Ten SIGKILLs of the client at random moments (start-up, planning, mid-conversion), then one
    run to the end: the shards are byte-identical to a clean run, every key is in the ledger exactly
    once, and nothing but listed shards and their records is left (no temps, no stale lease)."""
    listing, keys = slow_urls
    clean = tmp_path / "clean"
    began = time.monotonic()
    assert subprocess.run(cli_args(listing, clean, cluster.address), capture_output=True).returncode == 0
    whole = time.monotonic() - began
    out, rng, killed_mid_run = tmp_path / "out", np.random.default_rng(7), 0
    for _ in range(10):
        proc = subprocess.Popen(cli_args(listing, out, cluster.address), stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.1, 0.8)) * whole)  # anywhere from start-up to late in the run
        committed = len(list((out / "shards").glob("*.record.gz"))) if (out / "shards").exists() else 0
        killed_mid_run += proc.poll() is None and 0 < committed < SHARDS
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert killed_mid_run >= 1  # the loop did interrupt conversions, not only start-ups or finished runs
    final = subprocess.run(cli_args(listing, out, cluster.address), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert shard_digests(out) == shard_digests(clean)
    ledger = read_ledger(open_store(str(out)))
    assert sorted(ledger["key"]) == sorted(keys) and set(ledger["status"]) == {"ok"}
    listed = {s["path"] for s in read_manifest(open_store(str(out)))["shards"]}
    files = {f"shards/{p.name}" for p in (out / "shards").iterdir()}
    assert files == listed | {p.replace(".h5", ".record.gz") for p in listed}
    assert not (out / "_lease.json").exists()


@pytest.fixture(scope="module")
def poison_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("poison")
    gen.write_image_folder(root / "all", {"img": 9}, size=(40, 30))
    # sorts into shard 1 (items 3..5): a valid PNG whose decoded size blows the worker's memory limit
    (root / "all" / "img" / "img_0004b.png").write_bytes(gen.bomb_png(16000))
    return root / "all"


def test_poison_shard_fails_alone_as_killed_worker(poison_folder, tmp_path):
    # saturation 1.0: queued tasks wait on the scheduler, not on a worker the poison kills (a task
    # queued on a dying worker also counts a failure, and could reach KilledWorker innocently)
    env = {
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
        "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",
    }
    with DaskProcesses(
        tmp_path / "dask", workers=2, env=env, worker_args=("--nthreads", "1", "--memory-limit", "250MB")
    ) as dp:
        cfg = load_config(
            None,
            {
                "source.uri": str(poison_folder),
                "output.uri": str(tmp_path / "out"),
                "shard.size": 3,
                "image.size": 16,
                "image.max_pixels": 300_000_000,
                "fetch.prefetch_bytes": 64 * 2**20,  # must fit the 250 MB limit (config check)
                "cluster.scheduler": dp.address,
            },
        )
        summary = run(cfg, log=lambda m: None)
    assert list(summary.failed_shards) == ["shard-00001"]
    assert "KilledWorker" in summary.failed_shards["shard-00001"]
    assert summary.exit_code() == 1 and summary.items_ok == 7
    manifest = read_manifest(open_store(str(tmp_path / "out")))
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00002", "shard-00003"]
