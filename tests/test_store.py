"""The Store contract (`convert.testing.StoreTests`) on every store we ship: a local folder,
memory://, and S3 on a moto server; plus what only one backend does (multipart, preflight)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import uuid
from pathlib import Path

import fsspec
import pytest

from convert.lease import LEASE, LeaseError, acquire, clean_debris, debris, publish
from convert.store import Guard, StorageError, Store, is_local, open_object, open_store, scheme_of
from convert.store import s3 as s3_store
from convert.testing import StoreTests


class TestLocalStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path):
        return open_store(str(tmp_path / "root"))

    def set(self, store: Store, rel: str, data: bytes) -> None:
        path = Path(store.uri, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def get(self, store: Store, rel: str) -> bytes:
        return Path(store.uri, rel).read_bytes()

    def test_preflight_names_the_uri_and_fix(self, tmp_path):
        (tmp_path / "file").write_text("x")
        with pytest.raises(StorageError, match=r"output.uri .*file.*not a directory"):
            open_store(str(tmp_path / "file")).preflight("output")
        open_store(str(tmp_path / "new" / "deeper")).preflight("output")  # created on first write

    def test_a_guarded_publish_holds_the_lock_against_a_takeover(self, store, tmp_path):
        """Locally the compare and the rename are one step: a conditional replace of the guard
        object waits for a publish that is between them."""
        store.write_bytes("guard", b"mine")
        path = tmp_path / "f.bin"
        path.write_bytes(b"x")
        inside, release = threading.Event(), threading.Event()

        def holds(data: bytes) -> bool:
            inside.set()
            release.wait(5)
            return data == b"mine"

        guard = Guard("guard", holds)
        worker = threading.Thread(target=store.publish, args=(str(path), "shards/f.bin", 1, None, guard))
        worker.start()
        assert inside.wait(5)
        _, token = store.read_versioned("guard")
        swapped: list[str | None] = []
        taker = threading.Thread(target=lambda: swapped.append(store.replace_if("guard", b"theirs", token)))
        taker.start()
        taker.join(0.3)
        assert taker.is_alive(), "the takeover must wait for the publish that holds the lock"
        release.set()
        worker.join(5)
        taker.join(5)
        assert swapped and swapped[0] and store.read_bytes("shards/f.bin") == b"x"


class TestMemoryStore(StoreTests):
    @pytest.fixture
    def store(self):
        return open_store(f"memory://store-{uuid.uuid4().hex}")

    def set(self, store: Store, rel: str, data: bytes) -> None:
        fsspec.filesystem("memory").pipe_file(f"{store.uri}/{rel}", data)

    def get(self, store: Store, rel: str) -> bytes:
        return fsspec.filesystem("memory").cat_file(f"{store.uri}/{rel}")


@pytest.mark.s3
class TestS3Store(StoreTests):
    backend_serialises_races = False  # moto's If-Match check and write are two steps (AWS S3 is atomic)

    @pytest.fixture
    def store(self, s3):
        self._fs = s3.filesystem()  # a separate s3fs client: the hooks never touch the store under test
        return open_store(f"s3://test-bucket/{uuid.uuid4().hex}", s3.storage_options())

    def set(self, store: Store, rel: str, data: bytes) -> None:
        self._fs.pipe_file(f"{store.uri}/{rel}", data)
        self._fs.invalidate_cache()

    def get(self, store: Store, rel: str) -> bytes:
        self._fs.invalidate_cache()
        return self._fs.cat_file(f"{store.uri}/{rel}")

    def test_multipart_publish_and_incomplete_uploads(self, store, tmp_path, monkeypatch):
        monkeypatch.setattr(s3_store, "PART_SIZE", 5 * 2**20)
        blob = os.urandom(11 * 2**20)
        path = tmp_path / "big.bin"
        path.write_bytes(blob)
        store.publish(str(path), "shards/big.bin", len(blob), hashlib.sha256(blob).hexdigest())
        assert store.info("shards/big.bin").etag.endswith("-3") and self.get(store, "shards/big.bin") == blob
        bucket, key = store.root.split("/", 1)
        self._fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{key}/shards/killed.h5")
        assert [(x.kind, x.rel) for x in debris(store)] == [("multipart", "shards/killed.h5")]
        assert len(clean_debris(store)) == 1 and debris(store) == [] and store.incomplete_uploads() == []

    def test_a_takeover_during_a_multipart_upload_stops_its_commit(self, store, tmp_path, monkeypatch):
        """The fence runs after the parts and before CompleteMultipartUpload: run A's upload that
        was overtaken by run B never becomes an object, and its parts are aborted."""
        monkeypatch.setattr(s3_store, "PART_SIZE", 5 * 2**20)
        blob = os.urandom(11 * 2**20)
        path = tmp_path / "big.bin"
        path.write_bytes(blob)
        acquire(store, "runA00000001", ttl=0.01)
        real_parts = s3_store.S3Store._parts

        async def parts_then_takeover(self, *args, **kwargs):
            done = await real_parts(self, *args, **kwargs)
            await asyncio.to_thread(acquire, store, "runB00000001", True)
            return done

        monkeypatch.setattr(s3_store.S3Store, "_parts", parts_then_takeover)
        with pytest.raises(LeaseError, match="moved from run runA00000001"):
            publish(store, str(path), "shards/big.bin", len(blob), hashlib.sha256(blob).hexdigest(), "runA00000001")
        assert not store.exists("shards/big.bin") and store.incomplete_uploads() == []
        assert b"runB00000001" in self.get(store, LEASE)

    def test_preflight_missing_bucket(self, s3):
        with pytest.raises(StorageError, match=r"bucket 'nope' does not exist; create it or fix output.uri"):
            open_store("s3://nope/out", s3.storage_options()).preflight("output")


def test_one_local_rule_and_one_scheme_rule():
    assert is_local("/data/x") and is_local("rel/x") and is_local("file:///data/x") and is_local("C:\\data")
    assert not is_local("s3://b/k") and not is_local("https://h/x") and not is_local("memory://m")
    assert scheme_of("data:image/png;base64,xx") == "data" and scheme_of("S3://b") == "s3"


def test_open_object_roots_stores_at_the_bucket(tmp_path):
    (tmp_path / "o.bin").write_bytes(b"obj")
    store, rel = open_object(str(tmp_path / "o.bin"))
    assert store.read_bytes(rel) == b"obj" and store.is_local
    one, rel1 = open_object("memory://bucket-x/a/b.bin")
    two, rel2 = open_object("memory://bucket-x/c.bin")
    assert one is two and (rel1, rel2) == ("a/b.bin", "c.bin")
