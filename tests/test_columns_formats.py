"""Columns in every shard format (the convert.testing.FormatTests contract, run for each FORMATS
entry) and the HDF5 specifics: a column read touches no image byte of the file, the last data
chunk is trimmed to its length."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest

from convert.formats.base import open_reader
from convert.formats.hdf5_chunks import Chunks
from convert.testing.formats import SCHEMA, FormatTests, make_samples, write_shard


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
        touched = [(a, n) for a, n in fh.ranges for b, m in images if a < b + m and b < a + n]
        assert not touched, f"column reads touched image bytes: {touched[:5]}"
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
