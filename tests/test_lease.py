"""One writer per output: real `python -m convert run` processes racing for one output, stale
leases, takeover, fenced publishes, and leftovers only removed when provably dead (local and S3)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert.lease import (
    LEASE,
    Lease,
    LeaseError,
    acquire,
    clean_debris,
    debris,
    hold_lease,
    publish,
    read_lease,
    release,
    renew,
    staging,
)
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
    return subprocess.run(
        [sys.executable, "-m", "convert", "run", *args], capture_output=True, text=True, timeout=300, **kw
    )


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
    args = [
        "--source",
        str(slow_list),
        "--output",
        str(out),
        "--set",
        "fetch.allow_private_networks=true",
        "--shard-size",
        "4",
        "--threads",
        "1",
        "--workers",
        "1",
        "--size",
        "16",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "convert", "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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
    with pytest.raises(
        LeaseError, match=r"locked by run deadbeef0001 \(someone on elsewhere, pid 4242.*looks dead.*--force-unlock"
    ):
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


def _taken_over(store, ttl: float = 0.3):
    """Run A takes the lease, goes silent past its ttl, and run B takes over with --force-unlock."""
    lease_a = acquire(store, "runA00000001", ttl=ttl)
    time.sleep(ttl + 0.1)
    lease_b = acquire(store, "runB00000001", force=True)
    return lease_a, lease_b


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def real_store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "out"))
    s3 = request.getfixturevalue("s3")
    return open_store(f"s3://test-bucket/fence-{time.time_ns()}", s3.storage_options())


def test_a_task_of_run_a_cannot_publish_after_run_b_took_over(real_store, tmp_path):
    store = real_store
    data = b"from run A" * 100
    with staging(store, "shard-00000", ".bin", run_id="runA00000001") as tmp:
        assert ".r-runA00000001." in tmp
        Path(tmp).write_bytes(data)
        lease_a, lease_b = _taken_over(store)
        with pytest.raises(LeaseError, match="not published, the output's lease moved from run runA00000001"):
            publish(store, tmp, "shards/shard-00000.bin", len(data), hashlib.sha256(data).hexdigest(), "runA00000001")
        assert not store.exists("shards/shard-00000.bin")
        assert renew(store, lease_a) is None  # A's heartbeat cannot write over B's lease either
        assert read_lease(store).run_id == "runB00000001"
        publish(store, tmp, "shards/shard-00000.bin", len(data), hashlib.sha256(data).hexdigest(), "runB00000001")
    assert store.read_bytes("shards/shard-00000.bin") == data
    assert renew(store, lease_b) is not None and read_lease(store).run_id == "runB00000001"


def test_renew_is_a_compare_and_swap(real_store):
    store = real_store
    lease = acquire(store, "runC00000001")
    renewed = renew(store, lease)
    assert renewed is not None and renewed.heartbeat >= lease.heartbeat and renewed.token != lease.token
    assert renew(store, renewed) is not None
    # a writer that replaced the lease between our read and our write: the renewal loses, nothing is overwritten
    store.write_bytes(LEASE, _foreign_lease("intruder0001", age=0))
    assert renew(store, renewed) is None and read_lease(store).run_id == "intruder0001"


@pytest.mark.parametrize(
    "fields",
    [
        {"heartbeat": float("nan")},
        {"heartbeat": time.time() + 86400},  # a day in the future
        {"ttl": 1e12},
        {"ttl": float("inf")},
        {"ttl": -5.0},
    ],
)
def test_untrustworthy_heartbeats_count_as_stale(tmp_path, fields):
    store = open_store(str(tmp_path / "out"))
    now = time.time()
    raw = {
        "run_id": "odd000000001",
        "owner": "x",
        "host": "elsewhere",
        "pid": 1,
        "started": now,
        "heartbeat": now,
        "ttl": 60.0,
        **fields,
    }
    store.write_bytes(LEASE, json.dumps(raw).encode())
    assert read_lease(store).stale(time.time())
    with pytest.raises(LeaseError, match="looks dead"):
        acquire(store, "mine00000001")
    assert acquire(store, "mine00000001", force=True).run_id == "mine00000001"


def test_a_fresh_lease_is_not_stale():
    now = time.time()
    assert not Lease("r", "o", "h", 1, now, now + 5, 60.0).stale(now)  # small clock skew is fine
    assert Lease("r", "o", "h", 1, now, now - 61, 60.0).stale(now)


def test_staging_is_named_by_run_and_leaves_nothing(real_store):
    store = real_store
    with hold_lease(store, "abc123"), staging(store, "shard-00000", ".bin", ("-lock",), run_id="abc123") as tmp:
        assert os.path.basename(tmp).startswith(".shard-00000.r-abc123.") and ".partial" in tmp
        Path(tmp).write_bytes(b"data")
        Path(tmp + "-lock").write_bytes(b"sidecar")  # e.g. LMDB's lock file
        publish(store, tmp, "shards/shard-00000.bin", 4)  # the fence comes from the staged name here
    assert not os.path.exists(tmp) and not os.path.exists(tmp + "-lock")
    assert [e.name for e in store.list("shards")] == ["shard-00000.bin"]  # nothing staged remains
    assert debris(store) == []


def test_only_provably_dead_debris_is_cleaned(real_store):
    store = real_store
    store.write_bytes("shards/.shard-00002.r-oldrun.0123abcd.partial.h5", b"killed")
    store.write_bytes("shards/.shard-00003.r-ours.4567abcd.partial.h5", b"running")
    found = {x.run_id: x for x in debris(store) if x.kind == "partial"}
    assert sorted(found) == ["oldrun", "ours"]
    assert [x.run_id for x in clean_debris(store, keep_run="ours", since=time.time() - 3600)] == ["oldrun"]
    assert [x.run_id for x in debris(store)] == ["ours"]
    assert [x.run_id for x in clean_debris(store, keep_run="ours", since=time.time() + 60)] == ["ours"]
    assert debris(store) == []


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
    with pytest.raises(Exception, match="cannot write objects conditionally"):
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
    s3.filesystem().call_s3("create_multipart_upload", Bucket=bucket, Key=f"{key}/shards/shard-00000.h5")
    store.delete(LEASE)
    with hold_lease(store, "s3run0000004"):
        assert debris(store) == []  # the dead attempt's upload was aborted by the new holder
