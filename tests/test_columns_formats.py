"""Columns in every shard format (the convert.testing.FormatTests contract, run for each FORMATS
entry) and the HDF5 specifics: a column read touches no image byte of the file, the last data
chunk is trimmed to its length."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from convert.dataset import open_dataset
from convert.formats.base import open_reader
from convert.formats.hdf5_chunks import Chunks
from convert.stream import Stream
from convert.testing.formats import (
    SCHEMA,
    FormatTests,
    assert_column,
    expected_column,
    make_samples,
    write_dataset,
    write_shard,
)


class TestHDF5(FormatTests):
    format = "hdf5"


class TestLMDB(FormatTests):
    format = "lmdb"


class RecordingFile(io.FileIO):
    """A real file whose reads are recorded as (offset, length): what HDF5 actually touched."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "rb")
        self.ranges: list[tuple[int, int]] = []

    def read(self, n: int = -1) -> bytes:
        pos = self.tell()
        data = super().read(n)
        self.ranges.append((pos, len(data)))
        return data

    def readinto(self, b) -> int:  # type: ignore[override]
        pos = self.tell()
        n = super().readinto(b)
        self.ranges.append((pos, n or 0))
        return n or 0


def _image_ranges(path: Path, name: str) -> list[tuple[int, int]]:
    with h5py.File(path, "r") as f:
        ds = f[name]
        size = int(np.prod(ds.chunks))
        out: list[tuple[int, int]] = []
        ds.id.chunk_iter(lambda info: out.append((info.byte_offset, size)))
        if "data_tail" in f and f["data_tail"].size:
            out.append((f["data_tail"].id.get_offset(), f["data_tail"].size))
        return out


def test_a_short_column_is_a_corrupt_shard_not_a_wrong_row(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    write_shard("hdf5", path, make_samples(20), image_shape=(6, 5, 3))
    with h5py.File(path, "r+") as f:
        f["columns/2"].resize(15, axis=0)  # "width" loses its last 5 values
    with open_reader("hdf5", str(path)) as reader:
        assert reader.column("caption")[19] == make_samples(20)[19].columns[0]
        with pytest.raises(ValueError, match="column 'width' does not hold 20 int64 values"):
            reader.column("width")


@pytest.mark.parametrize("kind", ["fixed", "encoded"])
def test_hdf5_column_reads_touch_no_image_byte(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    if kind == "fixed":
        samples = make_samples(600, shape=(32, 32, 3))
        write_shard("hdf5", path, samples, image_shape=(32, 32, 3))
    else:
        samples = make_samples(600, shape=None)
        write_shard("hdf5", path, samples, encoding="jpeg")
    images = _image_ranges(path, "images" if kind == "fixed" else "data")
    assert images
    with RecordingFile(path) as fh:
        reader = open_reader("hdf5", fh)
        for col in SCHEMA:
            reader.column(col.name)
        assert reader.column("caption")[599] == samples[599].columns[0]
        # HDF5 reads object headers 512 bytes at a time: one such read may overlap a neighbour
        overlap = sum(min(a + n, b + m) - max(a, b) for a, n in fh.ranges for b, m in images if a < b + m and b < a + n)
        assert overlap < 512, f"column reads touched {overlap} image bytes"
        reader.get(3)  # the observer does see image reads
        assert any(a < b + m and b < a + n for a, n in fh.ranges for b, m in images)
        reader.close()


def test_hdf5_encoded_shard_is_within_five_percent_of_its_payload(tmp_path: Path) -> None:
    """The last 1 MiB chunk was stored whole: a 2.5 MB JPEG shard was 22 % over its bytes."""
    rng = np.random.default_rng(0)
    payload = [rng.bytes(int(rng.integers(20_000, 40_000))) for _ in range(80)]
    samples = [s.__class__(s.key, s.label, data, s.columns) for s, data in zip(make_samples(80, None), payload)]
    path = tmp_path / "jpeg.h5"
    write_shard("hdf5", path, samples, encoding="jpeg", columns=())
    total = sum(map(len, payload))
    assert path.stat().st_size < total * 1.05, (path.stat().st_size, total)
    with open_reader("hdf5", str(path)) as reader:
        assert [r["image"] for r in reader.get_batch(list(range(80)))] == payload
    with open(path, "rb") as fh, open_reader("hdf5", fh) as reader:  # the tail through a file object too
        assert reader.get(79)["image"] == payload[79]


def test_chunk_map_reads_across_data_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "t.h5"
    blob = np.arange(3 * 1000 + 17, dtype=np.uint64).view(np.uint8)[: 3 * 1000 + 17]
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=blob[:3000], chunks=(1000,), maxshape=(None,))
        f.create_dataset("data_tail", data=blob[3000:])
    with h5py.File(path, "r") as f:
        chunks = Chunks(f["data"], str(path), f["data_tail"])
        for lo, hi in [(0, 3017), (990, 1010), (2995, 3017), (3001, 3005), (5, 5)]:
            assert bytes(chunks.read(lo, hi)) == blob[lo:hi].tobytes()
        chunks.close()


# -- every reader: Dataset, get_batch, column(), Stream.batches, torch ---------------------------

N = 53


@pytest.fixture(scope="module", params=["hdf5", "lmdb"])
def column_dataset(request, tmp_path_factory) -> tuple[str, list]:
    samples = make_samples(N)
    root = tmp_path_factory.mktemp(f"cols-{request.param}")
    return write_dataset(root, request.param, samples, 12, image_shape=(6, 5, 3)), samples


def _assert_row(row: dict, sample) -> None:
    assert list(row) == ["image", "label", "key", *(c.name for c in SCHEMA)]
    assert row["key"] == sample.key and row["label"] == (-1 if sample.label is None else sample.label)
    np.testing.assert_array_equal(row["image"], sample.data)
    for col, want in zip(SCHEMA, sample.columns):
        assert row[col.name] == want and type(row[col.name]) is type(want), (col.name, row[col.name], want)


def test_dataset_rows_and_batches_carry_every_column(column_dataset) -> None:
    uri, samples = column_dataset
    ds = open_dataset(uri)
    assert ds.schema == SCHEMA
    for i in (0, 5, 12, N - 1):
        _assert_row(ds[i], samples[i])
    order = [40, 3, 3, 17, 52, 0]
    for row, i in zip(ds.get_batch(order), order):
        _assert_row(row, samples[i])


def test_dataset_whole_columns_touch_no_image(column_dataset) -> None:
    uri, samples = column_dataset
    ds = open_dataset(uri)
    whole = ds.columns()
    assert list(whole) == [c.name for c in SCHEMA]
    for col in SCHEMA:
        assert_column(ds.column(col.name), col, expected_column(col, samples))
    counts = ds.read_counts()
    assert counts["image"] == 0 and counts["column:caption"] == 5  # one read per shard
    with pytest.raises(KeyError, match="no column 'nope'"):
        ds.column("nope")


def test_open_dataset_columns_reads_only_those(column_dataset) -> None:
    uri, samples = column_dataset
    ds = open_dataset(uri, columns=["width"])
    assert ds.schema == (SCHEMA[2],)
    row = ds[13]
    assert set(row) == {"image", "label", "key", "width"} and row["width"] == samples[13].columns[2]
    ds.get_batch(list(range(N)))
    counts = ds.read_counts()
    assert counts["image"] == N + 1 and {k for k in counts if k.startswith("column:")} == {"column:width"}
    assert set(open_dataset(uri, columns=[])[0]) == {"image", "label", "key"}
    with pytest.raises(ValueError, match="no column 'captions'; its columns are"):
        open_dataset(uri, columns=["captions"])


def _check_batch_columns(batch: dict, by_key: dict, as_tensor: Any = np.asarray) -> None:
    for col in SCHEMA:
        wants = [by_key[k].columns[SCHEMA.index(col)] for k in batch["key"]]
        nulls = np.asarray(as_tensor(batch[f"{col.name}_null"])).tolist()
        assert nulls == [w is None for w in wants]
        got = batch[col.name]
        if col.type == "string":
            assert isinstance(got, list) and got == ["" if w is None else w for w in wants]
            continue
        arr = np.asarray(as_tensor(got))
        assert arr.dtype == np.dtype(col.type)
        for g, w in zip(arr.tolist(), wants):
            assert (g == w) if w is not None else (np.isnan(g) if col.type == "float64" else g in (0, False))


def test_stream_batches_strings_as_lists_numbers_as_arrays(column_dataset) -> None:
    uri, samples = column_dataset
    by_key = {s.key: s for s in samples}
    batches = list(Stream(uri, seed=1).batches(8))
    assert [len(b["key"]) for b in batches] == [8] * 6 + [5]
    for batch in batches:
        _check_batch_columns(batch, by_key)
        assert batch["image"].shape == (len(batch["key"]), 6, 5, 3)
    assert sorted(k for b in batches for k in b["key"]) == sorted(by_key)


@pytest.mark.torch
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batched_in", ["loader", "dataset"])
def test_torch_collates_columns(column_dataset, workers: int, batched_in: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from convert.torch import StreamingDataLoader, StreamingDataset

    uri, samples = column_dataset
    by_key = {s.key: s for s in samples}
    if batched_in == "loader":
        loader = StreamingDataLoader(
            StreamingDataset(uri, seed=2, cache_dir=tmp_path), batch_size=8, num_workers=workers
        )
    else:
        loader = StreamingDataLoader(
            StreamingDataset(uri, seed=2, batch_size=8, cache_dir=tmp_path), num_workers=workers
        )
    batches = list(loader)
    assert len(batches) == len(loader) == 7 and [len(b["key"]) for b in batches] == [8] * 6 + [5]
    for batch in batches:
        for col in SCHEMA:
            kind = list if col.type == "string" else torch.Tensor
            assert isinstance(batch[col.name], kind) and isinstance(batch[f"{col.name}_null"], torch.Tensor)
        _check_batch_columns(batch, by_key, as_tensor=lambda t: t.numpy())
    assert sorted(k for b in batches for k in b["key"]) == sorted(by_key)


def test_a_malformed_schema_in_the_manifest_is_one_line(column_dataset, tmp_path: Path) -> None:
    import json
    import shutil

    uri, _ = column_dataset
    copy = tmp_path / "copy"
    shutil.copytree(uri, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["columns"] = [["caption", "text"]]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    from convert.manifest import ManifestError

    with pytest.raises(ManifestError, match="columns are malformed"):
        open_dataset(str(copy))


@pytest.mark.cluster
@pytest.mark.parametrize("fmt", ["hdf5", "lmdb"])
def test_a_captioned_list_converts_and_reads_back(fmt: str, tmp_path: Path) -> None:
    """End to end: a CSV list with a caption and a float column -> shards -> every item's values."""
    import csv
    import hashlib

    from convert import run
    from convert.config import load_config
    from convert.testing import images as gen

    captions = ["a cat 🐱", "two\nlines", "", 'quote "x", comma', "ñandú"]
    rows = []
    for i in range(9):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(gen.jpeg_bytes(20, 16, seed=i))
        rows.append({"url": str(path), "caption": captions[i % 5], "similarity": str(i / 8)})
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["url", "caption", "similarity"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    cfg = load_config(
        None,
        {
            "source.uri": str(tmp_path / "list.csv"),
            "output.uri": str(out),
            "output.format": fmt,
            "image.size": 8,
            "source.columns": "similarity",
            "shard.size": 4,
            "cluster.workers": 1,
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    ds = open_dataset(str(out))
    names = [c.name for c in ds.schema]
    assert names[0] == "caption" and "similarity" in names and names[-1] == "sha256"
    assert ds.manifest["columns"] == [[c.name, c.type] for c in ds.schema]
    by_key = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    assert len(by_key) == 9
    # CSV: an empty field is null; the column's type is the source's (text here, or float64)
    got = sorted((r["caption"] or "", float(r["similarity"])) for r in by_key.values())
    assert got == sorted((r["caption"], float(r["similarity"])) for r in rows)
    assert [r["caption"] for r in by_key.values()].count(None) == 2
    item = ds[0]
    assert list(item)[:4] == ["image", "label", "key", "caption"]
    source = next(r for r in rows if float(r["similarity"]) == float(item["similarity"]))
    assert item["sha256"] == hashlib.sha256(Path(source["url"]).read_bytes()).hexdigest()
    assert ds.column("caption") == [ds[i]["caption"] for i in range(len(ds))]
