"""One contract suite for every Store (as fsspec and zarr do): local folder, memory://, S3 on moto.

`StoreTests` holds the behaviour every store promises; each subclass only says how to open one.
Capability flags decide the expected outcome where stores differ (conditional create, rename).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from convert.store import SHARDS_DIR, StorageError, Store, file_digest, open_store
from convert.store import s3 as s3_store


def _child_report(store: Store, parent_fs: Any, conn: Any) -> None:
    fresh = open_store(store.uri, store.storage_options)
    fresh.write_bytes("from-child", b"child")
    store.write_bytes("inherited", b"works")  # an instance inherited through fork rebuilds its filesystem
    conn.send((fresh is not store, store.fs is not parent_fs, fresh.read_bytes("from-child"), store.read_bytes("inherited")))


class StoreTests:
    """Mixed into one class per store; `store` is a fresh, empty root."""

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError

    def test_write_read_range_exists_info(self, store):
        assert not store.exists("a/b.bin")
        store.write_bytes("a/b.bin", b"0123456789")
        assert store.exists("a/b.bin") and store.read_bytes("a/b.bin") == b"0123456789"
        assert store.read_range("a/b.bin", 2, 5) == b"234"
        assert store.read_range("a/b.bin", 8, 100) == b"89"
        assert store.info("a/b.bin").size == 10
        with store.open("a/b.bin") as f:
            f.seek(7)
            assert f.read() == b"789"
        with pytest.raises(FileNotFoundError):
            store.read_bytes("a/missing")

    def test_atomic_write_never_shows_partial_content(self, store):
        store.write_bytes("m.json", b"old")
        with pytest.raises(RuntimeError):
            with store.writer("m.json") as f:
                f.write(b"half of the new")
                raise RuntimeError("killed mid-write")
        assert store.read_bytes("m.json") == b"old"
        assert [e.name for e in store.list("")] == ["m.json"]  # no temp left behind
        with store.writer("m.json") as f:
            f.write(b"new")
        assert store.read_bytes("m.json") == b"new"

    def test_create_exclusive_once(self, store):
        if not store.supports_conditional_create:
            with pytest.raises(StorageError, match="conditional"):
                store.create_exclusive("_lease.json", b"first")
            return
        assert store.create_exclusive("_lease.json", b"first") is True
        assert store.create_exclusive("_lease.json", b"second") is False
        assert store.read_bytes("_lease.json") == b"first"
        store.delete("_lease.json")
        assert store.create_exclusive("_lease.json", b"third") is True

    def test_list_and_delete(self, store):
        assert list(store.list("nothing-here")) == []
        for name in ("x.bin", "y.bin"):
            store.write_bytes(f"d/{name}", name.encode())
        store.write_bytes("d/sub/z.bin", b"zz")
        entries = {e.name: e for e in store.list("d")}
        assert sorted(entries) == ["sub", "x.bin", "y.bin"] and entries["sub"].is_dir
        assert entries["x.bin"].size == 5 and entries["x.bin"].rel == "d/x.bin"
        assert [e.rel for e in store.walk("d")] == ["d/sub/z.bin", "d/x.bin", "d/y.bin"]
        store.delete("d/x.bin")
        store.delete("d/x.bin")  # deleting what is gone is not an error
        assert sorted(e.name for e in store.list("d")) == ["sub", "y.bin"]
        store.delete_tree("d")
        assert list(store.list("d")) == [] and not store.exists("d/sub/z.bin")

    def test_staging_then_publish(self, store):
        data = os.urandom(300_000)
        with store.staging("shard-00000", ".bin", run_id="abc123", sidecars=("-lock",)) as tmp:
            assert "abc123" in os.path.basename(tmp) and not store.exists("shards/shard-00000.bin")
            Path(tmp).write_bytes(data)
            Path(tmp + "-lock").write_bytes(b"sidecar")  # e.g. LMDB's lock file
            store.publish(tmp, "shards/shard-00000.bin", len(data), hashlib.sha256(data).hexdigest())
        assert not os.path.exists(tmp) and not os.path.exists(tmp + "-lock")
        assert store.read_bytes("shards/shard-00000.bin") == data
        assert store.sha256("shards/shard-00000.bin") == (len(data), hashlib.sha256(data).hexdigest())
        assert [e.name for e in store.list(SHARDS_DIR)] == ["shard-00000.bin"]  # nothing staged remains

    def test_publish_a_directory_shard(self, store):
        with store.staging("shard-00001", ".zarr") as tmp:
            os.makedirs(os.path.join(tmp, "c"))
            Path(tmp, "zarr.json").write_bytes(b"{}")
            Path(tmp, "c", "0").write_bytes(b"chunk")
            staged = file_digest(tmp)
            store.publish(tmp, "shards/shard-00001.zarr", 7)
        assert store.sha256("shards/shard-00001.zarr") == staged and staged[0] == 7
        assert [e.rel for e in store.walk("shards/shard-00001.zarr")] == [
            "shards/shard-00001.zarr/c/0", "shards/shard-00001.zarr/zarr.json"]  # fmt: skip

    def test_publish_refuses_a_short_upload(self, store, tmp_path):
        path = tmp_path / "f.bin"
        path.write_bytes(b"12345")
        if store.supports_rename:
            pytest.skip("a rename cannot be short")
        with pytest.raises(OSError, match="incomplete: 5 of 6 bytes"):
            store.publish(str(path), "shards/f.bin", 6)

    def test_identity_proves_the_same_object(self, store):
        store.write_bytes("shards/a.h5", b"A" * 1000)
        store.write_bytes("shards/b.h5", b"B" * 1000)
        recorded = store.identity("shards/a.h5")
        listed = {e.name: e for e in store.list(SHARDS_DIR)}
        assert store.same_object("shards/a.h5", recorded, listed["a.h5"])
        time.sleep(0.01)
        store.write_bytes("shards/a.h5", store.read_bytes("shards/b.h5"))  # same size, other content
        listed = {e.name: e for e in store.list(SHARDS_DIR)}
        assert not store.same_object("shards/a.h5", recorded, listed["a.h5"])

    def test_leftovers_only_provably_dead_are_cleaned(self, store):
        if store.is_local:
            folder = Path(store.local_path(SHARDS_DIR))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".shard-00002.r-oldrun.0123abcd.partial.h5").write_bytes(b"killed")
            (folder / ".shard-00003.r-ours.4567abcd.partial.h5").write_bytes(b"running")
        else:
            store.write_bytes("shards/.shard-00002.r-oldrun.0123abcd.partial.h5", b"killed")
            store.write_bytes("shards/.shard-00003.r-ours.4567abcd.partial.h5", b"running")
        found = {x.run_id: x for x in store.leftovers() if x.kind == "partial"}
        assert sorted(found) == ["oldrun", "ours"]
        removed = store.clean_leftovers(keep_run="ours", since=time.time() - 3600)
        assert [x.run_id for x in removed] == ["oldrun"]
        assert [x.run_id for x in store.leftovers()] == ["ours"]
        assert [x.run_id for x in store.clean_leftovers(keep_run="ours", since=time.time() + 60)] == ["ours"]
        assert store.leftovers() == []

    def test_pickles_as_uri_and_options(self, store):
        assert pickle.loads(pickle.dumps(store)) is store  # same process: the cached instance

    def test_fork_child_gets_a_fresh_instance(self, store):
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child_report, args=(store, store.fs, child))
        proc.start()
        fresh, rebuilt, data, inherited = parent.recv()
        proc.join(30)
        assert proc.exitcode == 0 and fresh and rebuilt and (data, inherited) == (b"child", b"works")


class TestLocalStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path):
        return open_store(str(tmp_path / "root"))

    def test_preflight_names_the_uri_and_fix(self, tmp_path):
        (tmp_path / "file").write_text("x")
        with pytest.raises(StorageError, match=r"output.uri .*file.*not a directory"):
            open_store(str(tmp_path / "file")).preflight("output")
        open_store(str(tmp_path / "new" / "deeper")).preflight("output")  # created on first write


class TestMemoryStore(StoreTests):
    @pytest.fixture
    def store(self):
        return open_store(f"memory://store-{uuid.uuid4().hex}")


@pytest.mark.s3
class TestS3Store(StoreTests):
    @pytest.fixture
    def store(self, s3):
        return open_store(f"s3://test-bucket/{uuid.uuid4().hex}", s3.storage_options())

    def test_multipart_publish_and_leftovers(self, store, tmp_path, monkeypatch):
        monkeypatch.setattr(s3_store, "PART_SIZE", 5 * 2**20)
        blob = os.urandom(11 * 2**20)
        path = tmp_path / "big.bin"
        path.write_bytes(blob)
        store.publish(str(path), "shards/big.bin", len(blob), hashlib.sha256(blob).hexdigest())
        assert store.info("shards/big.bin").etag.endswith("-3") and store.read_bytes("shards/big.bin") == blob
        bucket, key = store.root.split("/", 1)
        store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{key}/shards/killed.h5")
        assert [(x.kind, x.url.rsplit("/", 1)[-1]) for x in store.leftovers()] == [("multipart", "killed.h5")]
        assert len(store.clean_leftovers()) == 1 and store.leftovers() == []

    def test_preflight_missing_bucket(self, s3):
        with pytest.raises(StorageError, match=r"bucket 'nope' does not exist; create it or fix output.uri"):
            open_store("s3://nope/out", s3.storage_options()).preflight("output")
