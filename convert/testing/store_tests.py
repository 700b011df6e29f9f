"""`StoreTests`: the contract every `convert.store.Store` must pass, shipped for third-party stores.

Subclass it in a pytest module, give a `store` fixture (a fresh, empty root) and the two hooks
that reach the bytes *without* the store under test (like zarr-python's StoreTests):

    class TestMyStore(StoreTests):
        @pytest.fixture
        def store(self, tmp_path):
            return open_store(f"my://bucket/{uuid.uuid4().hex}")

        def set(self, store, rel, data):      # write `data` at `rel` by other means
            my_client.put(..., data)

        def get(self, store, rel):            # read `rel` by other means (FileNotFoundError if absent)
            return my_client.get(...)

Capability flags decide the expected outcome where stores legitimately differ (conditional
writes, rename, ETags). Needs pytest (the `test` extra).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ..store import Guard, PreconditionFailed, StorageError, Store, file_digest, open_store


def _child_report(store: Store, conn: Any) -> None:
    fresh = open_store(store.uri, store.storage_options)
    fresh.write_bytes("from-child", b"child")
    store.write_bytes("inherited", b"works")  # an instance inherited through fork rebuilds its client
    conn.send((fresh is not store, fresh.read_bytes("from-child"), store.read_bytes("inherited")))


def _read_all(stream: Any) -> bytes:
    out = []
    while chunk := stream.read(1 << 16):
        out.append(chunk)
    stream.close()
    return b"".join(out)


class StoreTests:
    """Mixed into one test class per store; `store` is a fresh, empty root."""

    # False where the backend under test (not the Store) is known not to serialise racing
    # conditional writes: moto checks If-Match and then writes without a lock (AWS S3 is atomic).
    backend_serialises_races = True

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError("give the subclass a `store` fixture")

    def set(self, store: Store, rel: str, data: bytes) -> None:
        """Write `data` at `rel` without going through `store`."""
        raise NotImplementedError

    def get(self, store: Store, rel: str) -> bytes:
        """The bytes at `rel`, read without going through `store` (FileNotFoundError if absent)."""
        raise NotImplementedError

    # -- reading ---------------------------------------------------------------------------
    def test_reads_what_was_set(self, store: Store) -> None:
        self.set(store, "a/b.bin", b"0123456789")
        assert store.exists("a/b.bin") and not store.exists("a/missing")
        assert store.read_bytes("a/b.bin") == b"0123456789"
        assert store.read_range("a/b.bin", 2, 5) == b"234"
        assert store.read_range("a/b.bin", 8, 100) == b"89"
        assert store.read_range("a/b.bin", -3, 10) == b"789"
        assert store.info("a/b.bin").size == 10 and not store.info("a/b.bin").is_dir
        with store.open("a/b.bin") as f:
            f.seek(7)
            assert f.read() == b"789"
        with pytest.raises(FileNotFoundError):
            store.read_bytes("a/missing")
        with pytest.raises(FileNotFoundError):
            store.info("a/missing")

    def test_open_range_streams_and_pins_the_version(self, store: Store) -> None:
        self.set(store, "r.bin", bytes(range(256)) * 10)
        stream = store.open_range("r.bin", 100, 300)
        token = stream.entry.token
        assert stream.entry.size == 2560 and stream.first == 100 and token
        assert _read_all(stream) == (bytes(range(256)) * 10)[100:300]
        assert _read_all(store.open_range("r.bin", 2500, None, match=token)) == (bytes(range(256)) * 10)[2500:]
        assert _read_all(store.open_range("r.bin", 2560)) == b""  # at the end: empty, not an error
        time.sleep(0.01)
        self.set(store, "r.bin", b"another version, other length")
        with pytest.raises(PreconditionFailed):
            _read_all(store.open_range("r.bin", 0, 10, match=token))

    def test_get_file_and_sha256(self, store: Store, tmp_path: Path) -> None:
        data = os.urandom(70_000)
        self.set(store, "g/x.bin", data)
        store.get_file("g/x.bin", str(tmp_path / "x.bin"))
        assert (tmp_path / "x.bin").read_bytes() == data
        assert store.sha256("g/x.bin") == (len(data), hashlib.sha256(data).hexdigest())

    # -- writing ---------------------------------------------------------------------------
    def test_write_bytes_lands_whole(self, store: Store) -> None:
        store.write_bytes("w/m.json", b"{}")
        assert self.get(store, "w/m.json") == b"{}"
        store.write_bytes("w/m.json", b"[1]")
        assert self.get(store, "w/m.json") == b"[1]"

    def test_writer_never_shows_partial_content(self, store: Store) -> None:
        store.write_bytes("m.json", b"old")
        with pytest.raises(RuntimeError):
            with store.writer("m.json") as f:
                f.write(b"half of the new")
                raise RuntimeError("killed mid-write")
        assert self.get(store, "m.json") == b"old"
        assert [e.name for e in store.list("")] == ["m.json"]  # no temp left behind
        with store.writer("m.json") as f:
            f.write(b"new")
        assert self.get(store, "m.json") == b"new"

    def test_create_exclusive_once(self, store: Store) -> None:
        if not store.supports_conditional_writes:
            with pytest.raises(StorageError, match="conditionally"):
                store.create_exclusive("_lock", b"first")
            return
        assert store.create_exclusive("_lock", b"first") is True
        assert store.create_exclusive("_lock", b"second") is False
        assert self.get(store, "_lock") == b"first"
        store.delete("_lock")
        assert store.create_exclusive("_lock", b"third") is True

    def test_replace_if_is_a_compare_and_swap(self, store: Store) -> None:
        if not store.supports_conditional_writes:
            with pytest.raises(StorageError, match="conditionally"):
                store.replace_if("cas", b"x", "token")
            return
        self.set(store, "cas", b"v1")
        data, token = store.read_versioned("cas")
        assert data == b"v1"
        token2 = store.replace_if("cas", b"v2", token)
        assert token2 and token2 != token and self.get(store, "cas") == b"v2"
        assert store.replace_if("cas", b"lost update", token) is None  # token is stale now
        self.set(store, "cas", b"v3 by someone else")
        assert store.replace_if("cas", b"lost update", token2) is None
        assert self.get(store, "cas") == b"v3 by someone else"
        assert store.replace_if("absent", b"x", token2) is None and not store.exists("absent")
        same, again = store.read_versioned("cas")
        assert store.replace_if("cas", same, again) == again  # same bytes keep the version

    def test_racing_replaces_from_one_version_have_one_winner(self, store: Store) -> None:
        if not store.supports_conditional_writes or not self.backend_serialises_races:
            pytest.skip("no conditional writes, or a test double that does not serialise them")
        self.set(store, "race", b"v0")
        _, token = store.read_versioned("race")
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(lambda i: store.replace_if("race", f"writer {i}".encode(), token), range(8)))
        winners = [i for i, t in enumerate(won) if t is not None]
        assert len(winners) == 1 and self.get(store, "race") == f"writer {winners[0]}".encode()

    def test_delete_if_only_deletes_the_version_read(self, store: Store) -> None:
        if not store.supports_conditional_writes:
            with pytest.raises(StorageError, match="conditionally"):
                store.delete_if("cas", "token")
            return
        self.set(store, "cas", b"v1")
        _, token = store.read_versioned("cas")
        self.set(store, "cas", b"v2 by someone else")
        assert store.delete_if("cas", token) is False and self.get(store, "cas") == b"v2 by someone else"
        _, token = store.read_versioned("cas")
        assert store.delete_if("cas", token) is True and not store.exists("cas")
        assert store.delete_if("cas", token) is False

    # -- listing and deleting --------------------------------------------------------------
    def test_list_with_identity_walk_and_delete(self, store: Store) -> None:
        assert list(store.list("nothing-here")) == []
        for name in ("x.bin", "y.bin"):
            self.set(store, f"d/{name}", name.encode())
        self.set(store, "d/sub/z.bin", b"zz")
        entries = {e.name: e for e in store.list("d")}
        assert sorted(entries) == ["sub", "x.bin", "y.bin"] and entries["sub"].is_dir
        assert entries["x.bin"].size == 5 and entries["x.bin"].rel == "d/x.bin"
        if store.supports_etags:
            assert entries["x.bin"].etag == store.info("d/x.bin").etag != ""
        assert [e.rel for e in store.walk("d")] == ["d/sub/z.bin", "d/x.bin", "d/y.bin"]
        store.delete("d/x.bin")
        store.delete("d/x.bin")  # deleting what is gone is not an error
        with pytest.raises(FileNotFoundError):
            self.get(store, "d/x.bin")
        assert sorted(e.name for e in store.list("d")) == ["sub", "y.bin"]
        store.delete_tree("d")
        store.delete_tree("d")
        assert list(store.list("d")) == [] and not store.exists("d/sub/z.bin")

    # -- publishing ------------------------------------------------------------------------
    def test_publish_a_file(self, store: Store, tmp_path: Path) -> None:
        data = os.urandom(300_000)
        tmp = tmp_path / "staged.bin"
        tmp.write_bytes(data)
        store.publish(str(tmp), "shards/s.bin", len(data), hashlib.sha256(data).hexdigest())
        assert self.get(store, "shards/s.bin") == data
        assert store.sha256("shards/s.bin") == (len(data), hashlib.sha256(data).hexdigest())

    def test_publish_a_directory(self, store: Store, tmp_path: Path) -> None:
        tmp = tmp_path / "staged.zarr"
        os.makedirs(tmp / "c")
        Path(tmp, "zarr.json").write_bytes(b"{}")
        Path(tmp, "c", "0").write_bytes(b"chunk")
        staged = file_digest(str(tmp))
        store.publish(str(tmp), "shards/d.zarr", 7)
        assert store.sha256("shards/d.zarr") == staged and staged[0] == 7
        assert [e.rel for e in store.walk("shards/d.zarr")] == ["shards/d.zarr/c/0", "shards/d.zarr/zarr.json"]

    def test_publish_refuses_a_short_upload(self, store: Store, tmp_path: Path) -> None:
        if store.supports_rename:
            pytest.skip("a rename cannot be short")
        path = tmp_path / "f.bin"
        path.write_bytes(b"12345")
        with pytest.raises(OSError, match="incomplete: 5 of 6 bytes"):
            store.publish(str(path), "shards/f.bin", 6)

    def test_guarded_publish_commits_only_while_the_guard_holds(self, store: Store, tmp_path: Path) -> None:
        if not store.supports_conditional_writes:
            pytest.skip("no conditional writes: nothing can be guarded atomically")
        data = b"shard bytes" * 1000
        path = tmp_path / "f.bin"
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        mine = Guard("guard", lambda held: held == b"mine")
        self.set(store, "guard", b"someone else's")
        with pytest.raises(PreconditionFailed):
            store.publish(str(path), "shards/g.bin", len(data), digest, guard=mine)
        assert not store.exists("shards/g.bin")
        with pytest.raises(PreconditionFailed):
            store.publish(str(path), "shards/g.bin", len(data), digest, guard=Guard("absent", lambda _: True))
        self.set(store, "guard", b"mine")
        store.publish(str(path), "shards/g.bin", len(data), digest, guard=mine)
        assert self.get(store, "shards/g.bin") == data and self.get(store, "guard") == b"mine"

    # -- identity --------------------------------------------------------------------------
    def test_identity_proves_the_same_object(self, store: Store) -> None:
        self.set(store, "shards/a.h5", b"A" * 1000)
        self.set(store, "shards/b.h5", b"B" * 1000)
        recorded = store.identity("shards/a.h5")
        listed = {e.name: e for e in store.list("shards")}
        assert store.same_object("shards/a.h5", recorded, listed["a.h5"])
        time.sleep(0.01)
        self.set(store, "shards/a.h5", b"B" * 1000)  # same size, other content
        listed = {e.name: e for e in store.list("shards")}
        assert not store.same_object("shards/a.h5", recorded, listed["a.h5"])

    # -- processes -------------------------------------------------------------------------
    def test_pickles_as_uri_and_options(self, store: Store) -> None:
        assert pickle.loads(pickle.dumps(store)) is store  # same process: the cached instance

    def test_fork_child_gets_a_fresh_instance(self, store: Store) -> None:
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child_report, args=(store, child))
        proc.start()
        fresh, data, inherited = parent.recv()
        proc.join(30)
        assert proc.exitcode == 0 and fresh and (data, inherited) == (b"child", b"works")
