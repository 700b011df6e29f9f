"""Contract suite for every shard format in FORMATS x {fixed raw, variable raw, encoded}.

Write through open_writer in several batches, read back through open_reader, compare with what
was written; plus abort, growth, fork/re-open and format-specific layout checks.
"""

from __future__ import annotations

import copy
import hashlib
import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import h5py
import numpy as np
import pytest

from convert.formats.base import FORMATS, Sample, ShardInfo, open_reader, open_writer
from convert.formats.hdf5 import images_per_chunk

LAYOUTS = ["fixed", "variable", "encoded"]
FIXED = (8, 6, 3)
BATCHES = [5, 1, 0, 10, 7]  # includes an empty batch
KEYS = ["plain", "ñandú/über", "日本語の画像", "emoji-🐱", "space and, comma"]


def make_samples(layout: str, n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = f"{KEYS[i % len(KEYS)]}-{i}"
        label = None if i % 4 == 3 else int(i * 7 % 11)
        if layout == "fixed":
            data: np.ndarray | bytes = rng.integers(0, 256, FIXED, dtype=np.uint8)
        elif layout == "variable":
            shape = (int(rng.integers(1, 13)), int(rng.integers(1, 13)), int(rng.choice([1, 3])))
            data = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            data = rng.bytes(int(rng.integers(1, 300)))
        out.append(Sample(key, label, data))
    return out


def make_info(layout: str, count: int, **kw) -> ShardInfo:
    return ShardInfo(
        name="shard-00003",
        encoding="raw" if layout != "encoded" else "png",
        image_shape=FIXED if layout == "fixed" else None,
        expected_count=count,
        attrs={"fingerprint": "abc123", "image": {"size": [8, 6], "mode": "RGB"}, "note": "é"},
        **kw,
    )


def write(fmt: str, path: Path, info: ShardInfo, samples: list[Sample], batches=BATCHES) -> None:
    writer = open_writer(fmt, str(path), info)
    pos = 0
    for size in batches:
        writer.write_batch(samples[pos : pos + size])
        pos += size
    assert pos == len(samples)
    writer.close()


def assert_same(got: dict, sample: Sample) -> None:
    assert got["key"] == sample.key
    assert got["label"] == sample.label
    if isinstance(sample.data, bytes):
        assert isinstance(got["image"], bytes) and got["image"] == sample.data
    else:
        assert got["image"].dtype == np.uint8
        np.testing.assert_array_equal(got["image"], sample.data, strict=True)


@pytest.fixture(params=sorted(FORMATS))
def fmt(request) -> str:
    return request.param


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    return request.param


@pytest.fixture
def shard(fmt: str, layout: str, tmp_path: Path) -> tuple[Path, ShardInfo, list[Sample]]:
    samples = make_samples(layout, sum(BATCHES))
    info = make_info(layout, len(samples))
    path = tmp_path / f"shard{FORMATS[fmt].extension}"
    write(fmt, path, info, samples)
    return path, info, samples


def test_round_trip(fmt: str, layout: str, shard) -> None:
    path, info, samples = shard
    reader = open_reader(fmt, str(path))
    try:
        assert len(reader) == len(samples)
        assert reader.encoding == info.encoding
        assert reader.image_shape == info.image_shape
        assert reader.attrs() == info.attrs
        for i, sample in enumerate(samples):
            assert_same(reader.get(i), sample)
        assert_same(reader.get(-1), samples[-1])
        order = [17, 3, 3, 22, 0, 9, 17, 1]
        for got, i in zip(reader.get_batch(order), order):
            assert_same(got, samples[i])
        rng = np.random.default_rng(1)
        perm = rng.permutation(len(samples)).tolist()
        assert [g["key"] for g in reader.get_batch(perm)] == [samples[i].key for i in perm]
        assert reader.get_batch([]) == []
        with pytest.raises(IndexError):
            reader.get(len(samples))
    finally:
        reader.close()


def test_duplicates_in_a_batch_do_not_alias(fmt: str, shard) -> None:
    path, info, samples = shard
    reader = open_reader(fmt, str(path))
    a, b = reader.get_batch([4, 4])
    if isinstance(a["image"], np.ndarray):
        a["image"][...] = 0
        assert_same(b, samples[4])
    reader.close()


def test_empty_shard(fmt: str, layout: str, tmp_path: Path) -> None:
    path = tmp_path / f"empty{FORMATS[fmt].extension}"
    write(fmt, path, make_info(layout, 10), [], batches=[])
    reader = open_reader(fmt, str(path))
    assert len(reader) == 0 and reader.get_batch([]) == []
    assert reader.attrs()["fingerprint"] == "abc123"
    reader.close()


def test_abort_leaves_no_file(fmt: str, layout: str, tmp_path: Path) -> None:
    samples = make_samples(layout, 6)
    writer = open_writer(fmt, str(tmp_path / f"s{FORMATS[fmt].extension}"), make_info(layout, 6))
    writer.write_batch(samples)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_wrong_data(fmt: str, tmp_path: Path) -> None:
    cases = [
        ("fixed", np.zeros((8, 7, 3), np.uint8)),
        ("fixed", np.zeros(FIXED, np.float32)),
        ("variable", np.zeros((8, 7), np.uint8)),
        ("encoded", np.zeros(FIXED, np.uint8)),
    ]
    for i, (layout, data) in enumerate(cases):
        writer = open_writer(fmt, str(tmp_path / f"w{i}{FORMATS[fmt].extension}"), make_info(layout, 2))
        with pytest.raises(ValueError):
            writer.write_batch([Sample("k", 1, data)])
        writer.abort()


def test_batches_of_equal_size_items(fmt: str, layout: str, tmp_path: Path) -> None:
    """Ragged storage must not trip over a batch whose items all have one size (or one item)."""
    rng = np.random.default_rng(5)
    shape = FIXED if layout == "fixed" else (4, 5, 3)
    samples = [
        Sample(f"k{i}", i, rng.bytes(60) if layout == "encoded" else rng.integers(0, 256, shape, dtype=np.uint8))
        for i in range(7)
    ]
    path = tmp_path / f"s{FORMATS[fmt].extension}"
    write(fmt, path, make_info(layout, 7), samples, batches=[1, 3, 3])
    reader = open_reader(fmt, str(path))
    for i, got in enumerate(reader.get_batch(range(7))):
        assert_same(got, samples[i])
    reader.close()


def test_overwrites_a_stale_file(fmt: str, layout: str, tmp_path: Path) -> None:
    path = tmp_path / f"s{FORMATS[fmt].extension}"
    write(fmt, path, make_info(layout, 23), make_samples(layout, 23, seed=1))
    samples = make_samples(layout, 4, seed=2)
    write(fmt, path, make_info(layout, 4), samples, batches=[4])
    reader = open_reader(fmt, str(path))
    assert len(reader) == 4
    assert_same(reader.get(3), samples[3])
    reader.close()


def _digest(reader, indices) -> bytes:
    h = hashlib.sha256()
    for got in reader.get_batch(indices):
        image = got["image"]
        h.update(image if isinstance(image, bytes) else image.tobytes())
        h.update(f"{got['key']}|{got['label']}".encode())
    return h.digest()


def _child(reader, indices, conn) -> None:
    try:
        conn.send_bytes(_digest(reader, indices))
    except BaseException as exc:  # report instead of dying silently
        conn.send_bytes(b"ERR " + repr(exc).encode())
    finally:
        conn.close()


def test_reader_used_after_fork(fmt: str, shard) -> None:
    path, _, _ = shard
    reader = open_reader(fmt, str(path))
    indices = [5, 0, 22, 5]
    expected = _digest(reader, indices)  # the parent has an open handle before forking
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(reader, indices, child))
    proc.start()
    child.close()
    got = parent.recv_bytes()
    proc.join(30)
    assert got == expected and proc.exitcode == 0
    assert _digest(reader, indices) == expected  # the parent's handle still works
    reader.close()


def test_readers_share_a_shard_across_threads(fmt: str, shard) -> None:
    path, _, samples = shard
    first, second = open_reader(fmt, str(path)), open_reader(fmt, str(path))
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: (first if i % 2 else second).get(i)["key"], range(len(samples))))
    assert got == [s.key for s in samples]
    first.close()  # closing one reader must not break another on the same file
    assert_same(second.get(8), samples[8])
    second.close()


def test_reader_reduces_to_its_source(fmt: str, shard) -> None:
    path, _, samples = shard
    reader = open_reader(fmt, str(path))
    reader.get(0)  # opened: the copy must not carry the handle
    cls, args = reader.__reduce__()[:2]
    assert cls is type(reader) and args == (str(path), None)
    clone = copy.deepcopy(reader)  # goes through __reduce__, like pickling for a Dask worker
    assert_same(clone.get(7), samples[7])
    clone.close()
    reader.close()


# ---------------------------------------------------------------- HDF5 specifics


@pytest.mark.parametrize("opener", ["builtin", "fsspec-memory"])
def test_hdf5_reads_from_binary_file_object(layout: str, opener: str, tmp_path: Path) -> None:
    samples = make_samples(layout, 23)
    path = tmp_path / "s.h5"
    write("hdf5", path, make_info(layout, 23), samples)
    if opener == "builtin":
        handle = open(path, "rb")  # noqa: SIM115
    else:
        url = f"memory://{tmp_path.name}/s.h5"
        fsspec.filesystem("memory").pipe(url, path.read_bytes())
        handle = fsspec.open(url, "rb").open()
    with handle as fh:
        reader = open_reader("hdf5", fh)
        assert len(reader) == 23
        for got, i in zip(reader.get_batch([9, 2, 9]), [9, 2, 9]):
            assert_same(got, samples[i])
        reader.close()


@pytest.mark.parametrize("compression", ["none", "gzip", "lzf"])
def test_hdf5_fixed_raw_layout(compression: str, tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    samples = make_samples("fixed", 23)
    write("hdf5", path, make_info("fixed", 23, compression=compression, compression_level=7), samples)
    with h5py.File(path, "r") as f:
        ds = f["images"]
        assert ds.shape == (23, *FIXED) and ds.dtype == np.uint8
        rows = 1 if compression != "none" else images_per_chunk(FIXED, False)
        assert ds.chunks == (rows, *FIXED) and ds.maxshape == (None, *FIXED)
        assert ds.compression == (None if compression == "none" else compression)
        if compression == "gzip":
            assert ds.compression_opts == 7
        assert f.attrs["count"] == 23
        np.testing.assert_array_equal(f["labels"][:4], [0, 7, 3, -1])
    reader = open_reader("hdf5", str(path))
    assert_same(reader.get(11), samples[11])
    reader.close()


# ---------------------------------------------------------------- LMDB specifics


def test_lmdb_map_grows_automatically(layout: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    if layout == "fixed":
        samples = [Sample(f"k{i}", i, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(400)]
        info = ShardInfo("s", "raw", (64, 64, 3), expected_count=1, attrs={})
    elif layout == "variable":
        samples = [Sample(f"k{i}", i, rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)) for i in range(120)]
        info = ShardInfo("s", "raw", None, expected_count=1, attrs={})
    else:
        samples = [Sample(f"k{i}", None, rng.bytes(40_000 + i)) for i in range(200)]
        info = ShardInfo("s", "jpeg", None, expected_count=1, attrs={})
    path = tmp_path / "s.lmdb"
    writer = open_writer("lmdb", str(path), info)
    for start in range(0, len(samples), 50):
        writer.write_batch(samples[start : start + 50])
    writer.close()  # the last block is committed by close(): it may be the one that grows the map
    assert writer.grow_count > 0  # the tiny estimate really was too small
    reader = open_reader("lmdb", str(path))
    assert len(reader) == len(samples)
    for i in (0, 77, len(samples) - 1):
        assert_same(reader.get(i), samples[i])
    reader.close()


def test_lmdb_is_one_compact_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    samples = [Sample(f"k{i}", i, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(50)]
    path = tmp_path / "s.lmdb"
    writer = open_writer("lmdb", str(path), ShardInfo("s", "raw", (64, 64, 3), expected_count=2000, attrs={}))
    writer.write_batch(samples)
    map_size = writer.map_size
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["s.lmdb"]  # no -lock file
    data = 50 * 64 * 64 * 3
    size = os.path.getsize(path)
    assert size < map_size / 10  # the reserved map is not materialised
    assert size <= data * 1.1 + 64 * 1024  # packed blocks: no page per item (one value per item took 4/3)


def test_lmdb_reader_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        open_reader("lmdb", open(__file__, "rb"))  # noqa: SIM115
    with pytest.raises(FileNotFoundError):
        len(open_reader("lmdb", str(tmp_path / "missing.lmdb")))


def test_same_samples_give_identical_bytes(fmt: str, layout: str, tmp_path: Path) -> None:
    """Deterministic shards: two attempts of one shard (or two clusters) produce the same sha256."""
    samples = make_samples(layout, 23)
    info = make_info(layout, 23)
    write(fmt, tmp_path / "a", info, samples)
    write(fmt, tmp_path / "b", info, samples)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_hdf5_bytes_do_not_depend_on_handle_lifetimes(tmp_path: Path) -> None:
    """A dataset handle kept alive elsewhere (e.g. until a GC cycle runs) must not move chunks."""
    samples, info = make_samples("fixed", 9), make_info("fixed", 9)
    for name, keep_handle in (("a", False), ("b", True)):
        writer = open_writer("hdf5", str(tmp_path / name), info)
        stray = writer._file["images"] if keep_handle else None
        for start in range(0, 9, 3):
            writer.write_batch(samples[start : start + 3])
        writer.close()
        del stray
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


@pytest.mark.parametrize("opener", ["path", "file-object"])
@pytest.mark.parametrize("kind", ["fixed", "encoded", "variable"])
def test_hdf5_reads_across_chunk_boundaries(kind: str, opener: str, tmp_path: Path) -> None:
    """Items straddling a chunk (or blob chunk) boundary come back whole, in any batch order."""
    rng = np.random.default_rng(5)
    if kind == "fixed":
        n, info = 700, make_info("fixed", 700)  # 256 images of 8x6x3 per chunk: 3 chunks
        samples = [Sample(f"k{i}", i, rng.integers(0, 256, FIXED, dtype=np.uint8)) for i in range(n)]
    elif kind == "encoded":
        n, info = 60, make_info("encoded", 60)  # ~60 KB each: 1 MiB blob chunks split items
        samples = [Sample(f"k{i}", i, rng.bytes(int(rng.integers(30_000, 90_000)))) for i in range(n)]
    else:
        n, info = 40, make_info("variable", 40)
        samples = [Sample(f"k{i}", i, rng.integers(0, 256, (100 + i, 150, 3), dtype=np.uint8)) for i in range(n)]
    path = tmp_path / "s.h5"
    write("hdf5", path, info, samples, batches=[7, n - 7])
    handle = open(path, "rb") if opener == "file-object" else None  # noqa: SIM115
    reader = open_reader("hdf5", handle or str(path))
    order = rng.permutation(n).tolist() + [0, n - 1, 0]
    for got, i in zip(reader.get_batch(order), order):
        assert_same(got, samples[i])
    assert [g["key"] for g in reader.get_batch(range(n))] == [s.key for s in samples]
    reader.close()
    if handle:
        handle.close()


@pytest.mark.parametrize("kind", ["raw", "jpeg-sized"])
def test_lmdb_disk_use_is_within_ten_percent_of_payload(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    if kind == "raw":
        info = ShardInfo("s", "raw", (64, 64, 3), expected_count=300, attrs={})
        samples = [Sample(f"k{i}", i, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(300)]
    else:  # small encoded values used to sit in half-empty leaf pages
        info = ShardInfo("s", "jpeg", None, expected_count=1000, attrs={})
        samples = [Sample(f"k{i}", i, rng.bytes(int(rng.integers(1500, 3500)))) for i in range(1000)]
    path = tmp_path / "s.lmdb"
    write("lmdb", path, info, samples, batches=[64] * (len(samples) // 64) + [len(samples) % 64])
    payload = sum(len(s.data) if isinstance(s.data, bytes) else s.data.nbytes for s in samples)
    assert os.path.getsize(path) <= 1.1 * payload
    reader = open_reader("lmdb", str(path))
    for i in (0, 1, 137, len(samples) - 1):
        assert_same(reader.get(i), samples[i])
    reader.close()
