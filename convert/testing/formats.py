"""A contract suite every shard format passes: subclass `FormatTests`, set `format`, run with pytest.

    class TestHDF5(FormatTests):
        format = "hdf5"

It writes shards through `open_writer` in several batches (an empty one included) and reads them
back through `open_reader`: stored columns of every type (unicode, emoji, newlines, NUL, empty
strings, nulls) by row, whole and by selection, without touching image bytes; raw pixels of one
shape stored in the fixed layout even when the shard was planned variable; shards without columns.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ..formats.base import FORMATS, Sample, ShardInfo, open_reader, open_writer
from ..manifest import write_manifest
from ..records import shard_rel_path, write_record
from ..specs import Column, ItemResult, ShardRecord, Status, shard_name
from ..store import file_digest, open_store

SCHEMA = (
    Column("caption", "string"),
    Column("similarity", "float64"),
    Column("width", "int64"),
    Column("nsfw", "bool"),
    Column("sha256", "string"),
)
TEXTS = [
    "a photo of a cat",
    "ñandú über 日本語",
    "emoji 🐱🚀 ok",
    "line one\nline two\r\n\ttab",
    "",
    None,
    "quotes \"double\" and 'single'",
    "nul\x00inside",
    "x" * 5000,
]
BATCHES = (5, 0, 1, 11, 7)


def column_values(i: int) -> tuple[Any, ...]:
    """Row i's values of SCHEMA: every third value of each column is null, in a different row per column."""
    text = TEXTS[i % len(TEXTS)]
    sim = None if i % 3 == 1 else (i - 10) / 7
    width = None if i % 3 == 2 else (2**62 if i == 4 else -i if i % 2 else i * 100)
    nsfw = None if i % 5 == 0 else bool(i % 2)
    return text, sim, width, nsfw, f"{i:064x}"


def make_samples(
    n: int, shape: tuple[int, int, int] | None = (6, 5, 3), columns: bool = True, seed: int = 0
) -> list[Sample]:
    """n samples: raw pixels of `shape` (None: encoded bytes of varying length) with SCHEMA values."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        data: Any = rng.integers(0, 256, shape, np.uint8) if shape else rng.bytes(int(rng.integers(1, 400)))
        out.append(Sample(f"k{i:04d}-ü", None if i % 4 == 3 else i % 7, data, column_values(i) if columns else ()))
    return out


def write_shard(
    fmt: str,
    path: Path,
    samples: Sequence[Sample],
    *,
    encoding: str = "raw",
    image_shape: tuple[int, int, int] | None = None,
    columns: Sequence[Column] = SCHEMA,
    batches: Sequence[int] = BATCHES,
    name: str = "shard-00001",
) -> ShardInfo:
    """Write `samples` as one shard in `batches` (sizes; the rest in one more batch); its ShardInfo."""
    info = ShardInfo(
        name=name,
        encoding=encoding,
        image_shape=image_shape,
        expected_count=len(samples),
        attrs={"shard": name},
        columns=tuple(columns),
    )
    writer = open_writer(fmt, str(path), info)
    pos = 0
    for size in [*batches, max(0, len(samples) - sum(batches))]:
        writer.write_batch(samples[pos : pos + size])
        pos += size
    writer.close()
    return info


def write_dataset(
    root: Path,
    fmt: str,
    samples: Sequence[Sample],
    shard_size: int,
    *,
    encoding: str = "raw",
    image_shape: tuple[int, int, int] | None = None,
    columns: Sequence[Column] = SCHEMA,
) -> str:
    """A complete dataset at `root` (shards, records, index, manifest) written by the real modules
    from `samples` in order, as a run would commit them: for readers' tests of any column schema."""
    store = open_store(str(root))
    records = []
    for k, lo in enumerate(range(0, len(samples), shard_size)):
        part, name = samples[lo : lo + shard_size], shard_name(k)
        rel = shard_rel_path(name, FORMATS[fmt].extension)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_shard(fmt, root / rel, part, encoding=encoding, image_shape=image_shape, columns=columns, name=name)
        size, digest = file_digest(str(root / rel))
        ledger = tuple(ItemResult(s.key, f"list.csv#{s.key}", s.label, Status.OK) for s in part)
        record = ShardRecord(
            name, rel, fmt, len(part), len(part), 0, size, digest, image_shape, encoding, ledger, columns=tuple(columns)
        )
        write_record(store, record, "test")
        records.append(record)
    write_manifest(store, records, {"output": {"format": fmt}}, None, "urls")
    return str(root)


def expected_column(col: Column, samples: Sequence[Sample]) -> list[Any]:
    j = SCHEMA.index(col)
    return [s.columns[j] for s in samples]


def assert_column(got: Any, col: Column, want: list[Any]) -> None:
    """A whole column as readers return it: strings a list with None, numbers an array (masked for nulls)."""
    if col.type == "string":
        assert isinstance(got, list) and got == want
        return
    assert isinstance(got, np.ndarray) and got.dtype == np.dtype(col.type) and got.shape == (len(want),)
    nulls = [v is None for v in want]
    if any(nulls):
        assert isinstance(got, np.ma.MaskedArray) and got.mask.tolist() == nulls
    got_values = got.tolist() if not any(nulls) else np.ma.getdata(got).tolist()
    for g, w in zip(got_values, want):
        if w is not None:
            assert g == w and type(g) is type(w), (g, w)


class FormatTests:
    """The contract; subclasses set `format` (a FORMATS name)."""

    format = ""

    def path(self, tmp_path: Path, name: str = "shard") -> Path:
        return tmp_path / f"{name}{FORMATS[self.format].extension}"

    def written(self, tmp_path: Path, n: int = 40, **kw: Any) -> tuple[Path, list[Sample]]:
        samples = make_samples(n)
        path = self.path(tmp_path)
        write_shard(self.format, path, samples, image_shape=(6, 5, 3), **kw)
        return path, samples

    def test_columns_round_trip_by_row_and_whole(self, tmp_path: Path) -> None:
        path, samples = self.written(tmp_path)
        with open_reader(self.format, str(path)) as reader:
            assert reader.columns == SCHEMA
            for col in SCHEMA:
                assert_column(reader.column(col.name), col, expected_column(col, samples))
            order = [17, 3, 3, 39, 0, 5, 7]
            for row, i in zip(reader.get_batch(order), order):
                assert row["key"] == samples[i].key
                for col, want in zip(SCHEMA, samples[i].columns):
                    got = row[col.name]
                    assert got == want and type(got) is type(want), (col.name, i, got, want)
            assert reader.get(-1)["caption"] == samples[-1].columns[0]

    def test_nan_is_a_value_not_a_null(self, tmp_path: Path) -> None:
        samples = [Sample(f"k{i}", 0, np.zeros((2, 2, 1), np.uint8), (v,)) for i, v in enumerate([math.nan, None, 1.5])]
        path = self.path(tmp_path)
        write_shard(self.format, path, samples, image_shape=(2, 2, 1), columns=[Column("f", "float64")])
        with open_reader(self.format, str(path)) as reader:
            values = [r["f"] for r in reader.get_batch([0, 1, 2])]
            assert math.isnan(values[0]) and values[1:] == [None, 1.5]
            assert np.ma.getmaskarray(reader.column("f")).tolist() == [False, True, False]

    def test_a_selection_reads_only_its_columns(self, tmp_path: Path) -> None:
        path, _ = self.written(tmp_path)
        with open_reader(self.format, str(path), columns=["width", "caption"]) as reader:
            assert [c.name for c in reader.columns] == ["width", "caption"]
            row = reader.get(2)
            assert set(row) == {"image", "label", "key", "width", "caption"}
            with pytest.raises(KeyError):
                reader.column("similarity")
            assert not [k for k in reader.reads if k in ("column:similarity", "column:nsfw", "column:sha256")]
        with open_reader(self.format, str(path), columns=()) as reader:
            assert reader.columns == () and set(reader.get(0)) == {"image", "label", "key"}
            assert reader.reads == {"image": 1}

    def test_whole_columns_read_no_image_bytes(self, tmp_path: Path) -> None:
        path, _ = self.written(tmp_path)
        with open_reader(self.format, str(path)) as reader:
            for col in SCHEMA:
                reader.column(col.name)
            assert reader.reads["image"] == 0 and all(reader.reads[f"column:{c.name}"] == 1 for c in SCHEMA)

    def test_selection_pickles_with_the_reader(self, tmp_path: Path) -> None:
        path, samples = self.written(tmp_path)
        with open_reader(self.format, str(path), columns=["nsfw"]) as reader:
            reader.get(0)
            copy = pickle.loads(pickle.dumps(reader))
        with copy:
            assert [c.name for c in copy.columns] == ["nsfw"] and copy.get(1)["nsfw"] is samples[1].columns[3]

    def test_encoded_and_columnless_shards(self, tmp_path: Path) -> None:
        samples = make_samples(30, shape=None, columns=False)
        path = self.path(tmp_path)
        write_shard(self.format, path, samples, encoding="png", columns=())
        with open_reader(self.format, str(path)) as reader:
            assert reader.columns == ()
            rows = reader.get_batch(list(range(30)))
            assert [r["image"] for r in rows] == [s.data for s in samples]
            assert set(rows[0]) == {"image", "label", "key"}

    def test_raw_pixels_of_one_shape_use_the_fixed_layout(self, tmp_path: Path) -> None:
        samples = make_samples(300, shape=(9, 7, 3))
        path = self.path(tmp_path)
        write_shard(self.format, path, samples, image_shape=None, batches=(64, 64, 0, 100))
        with open_reader(self.format, str(path)) as reader:
            assert reader.image_shape == (9, 7, 3)
            got = reader.get_batch([0, 299, 150])
            for row, i in zip(got, [0, 299, 150]):
                np.testing.assert_array_equal(row["image"], samples[i].data, strict=True)

    def test_a_shape_change_after_a_uniform_start_stays_exact(self, tmp_path: Path) -> None:
        samples = make_samples(150, shape=(4, 4, 3))
        samples[140:] = make_samples(10, shape=(5, 3, 1), seed=1)
        path = self.path(tmp_path)
        write_shard(self.format, path, samples, image_shape=None, batches=(64, 64))
        with open_reader(self.format, str(path)) as reader:
            assert reader.image_shape is None
            for row, s in zip(reader.get_batch(list(range(150))), samples):
                np.testing.assert_array_equal(row["image"], s.data, strict=True)
            assert_column(reader.column("caption"), SCHEMA[0], expected_column(SCHEMA[0], samples))

    def test_same_samples_give_identical_bytes(self, tmp_path: Path) -> None:
        """Resume and verify compare sha256s: columns must not make a shard's bytes vary."""
        samples = make_samples(150, shape=(4, 4, 3))
        samples[140:] = make_samples(10, shape=(5, 3, 1), seed=1)  # the adaptive layout's copy path too
        digests = set()
        for name in ("a", "b"):
            path = self.path(tmp_path, name)
            write_shard(self.format, path, samples, image_shape=None, batches=(64, 64))
            digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        assert len(digests) == 1

    def test_a_wrongly_typed_value_is_refused(self, tmp_path: Path) -> None:
        bad = [Sample("k", 0, np.zeros((1, 1, 1), np.uint8), (7,))]
        with pytest.raises(ValueError, match="'k'.*column 'caption'"):
            write_shard(self.format, self.path(tmp_path), bad, image_shape=(1, 1, 1), columns=[SCHEMA[0]])
