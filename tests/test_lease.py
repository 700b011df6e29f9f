"""One writer per output: real `python -m convert run` processes racing for one output, stale
leases, takeover, fenced publishes, and leftovers only removed when provably dead (local and S3)."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert.lease import LEASE, Lease, LeaseError, acquire, hold_lease, publish, read_lease, release, staging
from convert.manifest import read_manifest
from convert.shards import verify
from convert.store import open_store
from convert.testing import images as gen
from convert.testing.http import StaticServer
from convert.testing.proxy import FaultProxy, Rule


def _foreign_lease(run_id: str = "deadbeef0001", age: float = 3600.0, host: str = "elsewhere") -> bytes:
    then = time.time() - age
    return Lease(run_id, "someone", host, 4242, then, then, 60.0).encode()


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", "run", *args], capture_output=True, text=True,
                          timeout=300, **kw)  # fmt: skip


@pytest.fixture
def slow_list(tmp_path):
    """A URL list behind a latency proxy: a run over it lasts several seconds."""
    root = tmp_path / "www"
    paths = gen.write_image_folder(root, {"x": 24}, size=(40, 30))
    with StaticServer(root=root) as server:
        proxy = FaultProxy(server.url, default=Rule(latency=0.25)).start()
        listing = tmp_path / "urls.csv"
        with open(listing, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "key"])
            w.writerows([f"{proxy.url}/x/{p.name}", p.stem] for p in paths)
        yield listing
        proxy.stop()


@pytest.mark.cluster
@pytest.mark.slow
def test_second_run_on_a_leased_output_exits_2_naming_the_owner(slow_list, tmp_path):
    out = tmp_path / "out"
    args = ["--source", str(slow_list), "--output", str(out), "--shard-size", "4", "--threads", "1",
            "--workers", "1", "--size", "16"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "convert", "run", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (out / LEASE).exists():
            assert first.poll() is None and time.monotonic() < deadline, "first run never took the lease"
            time.sleep(0.05)
        owner = json.loads((out / LEASE).read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        same = _cli(*args)
        other = _cli(*args[:-1], "8")  # a different config: the mixed-sizes case
        for second in (same, other):
            text = second.stdout + second.stderr
            assert second.returncode == 2, text
            assert f"being written by run {owner['run_id']}" in text and f"pid {first.pid}" in text, text
            assert "--force-unlock" in text and "Traceback" not in text and len(text.strip().splitlines()) == 1
        assert first.poll() is None, "the first run must still be running (the test proves nothing otherwise)"
        assert first.wait(240) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert not (out / LEASE).exists()  # released
    assert [c.ok for c in verify(open_store(str(out)))] == [True] * 6
    assert {tuple(s["image_shape"]) for s in read_manifest(open_store(str(out)))["shards"]} == {(16, 16, 3)}


def test_stale_lease_needs_force_unlock(tmp_path):
    store = open_store(str(tmp_path / "out"))
    store.write_bytes(LEASE, _foreign_lease())
    with pytest.raises(LeaseError, match=r"locked by run deadbeef0001 \(someone on elsewhere, pid 4242.*looks dead.*--force-unlock"):
        acquire(store, "mine000000001")
    lease = acquire(store, "mine000000001", force=True)
    assert read_lease(store).run_id == "mine000000001" == lease.run_id
    release(store, lease)
    assert not store.exists(LEASE)


def test_live_lease_is_not_taken_even_with_force(tmp_path):
    store = open_store(str(tmp_path / "out"))
    store.write_bytes(LEASE, _foreign_lease(age=1.0))
    with pytest.raises(LeaseError, match="being written by run deadbeef0001"):
        acquire(store, "mine", force=True)
    assert read_lease(store).run_id == "deadbeef0001"


def test_dead_pid_on_this_host_is_taken_over_without_force(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store = open_store(str(tmp_path / "out"))
    lease = Lease("killed000001", "me", socket.gethostname(), gone.pid, time.time(), time.time(), 60.0)
    store.write_bytes(LEASE, lease.encode())
    assert acquire(store, "fresh0000001").run_id == "fresh0000001"


def test_heartbeat_renews_and_release_keeps_a_taken_over_lease(tmp_path):
    store = open_store(str(tmp_path / "out"))
    with hold_lease(store, "run000000001", ttl=1.5) as lease:
        first = read_lease(store).heartbeat
        time.sleep(1.3)
        assert read_lease(store).heartbeat > first
        assert read_lease(store).started == lease.started
    assert not store.exists(LEASE)
    with pytest.raises(LeaseError, match="taken over"):
        with hold_lease(store, "run000000002", ttl=1.5):
            store.write_bytes(LEASE, _foreign_lease("thief0000001", age=0))  # someone forced it
            time.sleep(1.2)
    assert read_lease(store).run_id == "thief0000001"  # not released by the loser


def test_publish_is_fenced_by_the_lease(tmp_path):
    store = open_store(str(tmp_path / "out"))
    with hold_lease(store, "runA00000001"):
        with staging(store, "shard-00000", ".bin") as tmp:
            assert ".r-runA00000001." in tmp
            Path(tmp).write_bytes(b"from run A")
            store.write_bytes(LEASE, _foreign_lease("runB00000001", age=0))  # taken over meanwhile
            with pytest.raises(LeaseError, match="moved from run runA00000001"):
                publish(store, tmp, "shards/shard-00000.bin", 10)
    assert not store.exists("shards/shard-00000.bin")


def test_leftovers_of_killed_workers_go_with_the_next_lease_only(tmp_path):
    store = open_store(str(tmp_path / "out"))
    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    dead = shards / ".shard-00001.r-oldrun000001.0123456789ab.partial.h5"
    dead.write_bytes(b"killed worker")
    old_style = shards / ".shard-00002.0123abcd.partial.h5"
    old_style.write_bytes(b"wave-1 temp")
    lines = []
    with hold_lease(store, "newrun000001", log=lines.append):
        assert not dead.exists() and not old_style.exists()
        mine = shards / ".shard-00003.r-newrun000001.0123456789ab.partial.h5"
        mine.write_bytes(b"in progress")
        with pytest.raises(LeaseError):  # a second would-be writer cannot clean anything
            with hold_lease(store, "intruder0001"):
                pass
        assert mine.exists()
    assert lines == ["removed 2 leftovers of earlier attempts (incomplete uploads, temp files)"]


def test_generic_store_without_conditional_create_refuses(tmp_path):
    store = open_store("memory://lease-test-refusal")
    with pytest.raises(Exception, match="cannot create objects conditionally"):
        acquire(store, "run")


@pytest.mark.s3
def test_s3_lease_conditional_create_and_takeover(s3):
    store = open_store("s3://test-bucket/leased", s3.storage_options())
    with hold_lease(store, "s3run0000001") as lease:
        other = open_store("s3://test-bucket/leased", {**s3.storage_options(), "anon": False})  # a second client
        with pytest.raises(LeaseError, match="being written by run s3run0000001"):
            acquire(other, "s3run0000002")
        assert read_lease(other).run_id == lease.run_id
    assert not store.exists(LEASE)
    store.write_bytes(LEASE, _foreign_lease())
    with pytest.raises(LeaseError, match="looks dead"):
        acquire(store, "s3run0000003")
    assert acquire(store, "s3run0000003", force=True).run_id == "s3run0000003"
    bucket, key = store.root.split("/", 1)
    store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{key}/shards/shard-00000.h5")
    store.delete(LEASE)
    with hold_lease(store, "s3run0000004"):
        assert store.leftovers() == []  # the dead attempt's upload was aborted by the new holder
