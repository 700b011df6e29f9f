"""Stored columns in an HDF5 shard, and the append-in-whole-chunks rule the writer uses for bytes.

Layout, in the group "columns" (i = the column's position in ShardInfo.columns):
- numbers: "<i>" (N,) int64 / float64 / bool;
- strings, Arrow-style: "<i>" every value's UTF-8 bytes concatenated (whole 256 KiB chunks) and
  "<i>.tail" (the rest, contiguous), "<i>.offsets" (N+1,) int64 byte offsets. h5py's
  variable-length strings cost ~1 us per value to read (a caption column read was 5x slower
  than this) and cannot hold NUL characters;
- "<i>.null" (N,) uint8, 1 = null, only when the shard has nulls there (the value is "", 0, NaN
  or False).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Sequence

import h5py
import numpy as np

from ..specs import Column
from .columns import NUMPY, StoredColumn, batch_values

ROW_CHUNK = 256  # rows per chunk of 1-D per-row datasets
TEXT_CHUNK = 2**18  # bytes per chunk of a string column's data


class Appender:
    """Bytes appended to a 1-D uint8 dataset in whole chunks only; `finish` stores the rest in a
    contiguous dataset exactly as long as it is (a last chunk is otherwise allocated whole)."""

    def __init__(self, ds: h5py.Dataset, chunk: int) -> None:
        self.ds, self.chunk = ds, chunk
        self.total = 0  # bytes appended so far (written + pending)
        self._pending = bytearray()

    def add(self, blob: Any) -> int:
        """Append `blob` (bytes-like); returns its start offset."""
        start = self.total
        view = memoryview(blob).cast("B")
        self.total += view.nbytes
        self._pending += view
        full = len(self._pending) // self.chunk * self.chunk
        if full:
            done = self.ds.shape[0]
            self.ds.resize(done + full, axis=0)
            head = np.frombuffer(self._pending, np.uint8, count=full)
            self.ds[done : done + full] = head
            del head  # release the view before the bytearray shrinks
            del self._pending[:full]
        return start

    def finish(self, group: h5py.Group, name: str) -> None:
        if self._pending:
            group.create_dataset(name, data=np.frombuffer(bytes(self._pending), np.uint8))
        self._pending = bytearray()


def read_bytes(group: h5py.Group, name: str, tail: str) -> bytes:
    """All bytes of an appended dataset and its tail (through h5py)."""
    head = group[name][:].tobytes()
    return head + group[tail][:].tobytes() if tail in group else head


class ColumnWriter:
    """Writes the shard's columns batch by batch; null masks at `finish`."""

    def __init__(self, f: h5py.File, columns: Sequence[Column]) -> None:
        self.columns = tuple(columns)
        self.group = f.create_group("columns")
        self._ds: list[h5py.Dataset] = []
        self._text: dict[int, tuple[Appender, h5py.Dataset]] = {}
        for i, col in enumerate(self.columns):
            if col.type == "string":
                data = self.group.create_dataset(str(i), (0,), np.uint8, maxshape=(None,), chunks=(TEXT_CHUNK,))
                offsets = self.group.create_dataset(
                    f"{i}.offsets", (1,), np.int64, maxshape=(None,), chunks=(ROW_CHUNK,)
                )
                self._text[i] = (Appender(data, TEXT_CHUNK), offsets)
                self._ds.append(data)
            else:
                self._ds.append(
                    self.group.create_dataset(str(i), (0,), NUMPY[col.type], maxshape=(None,), chunks=(ROW_CHUNK,))
                )
        self._nulls: list[list[np.ndarray]] = [[] for _ in self.columns]

    def write(self, lo: int, samples: Sequence[Any]) -> None:
        hi = lo + len(samples)
        for i, (values, nulls) in enumerate(batch_values(self.columns, samples)):
            self._nulls[i].append(nulls)
            if i in self._text:
                appender, offsets = self._text[i]
                encoded = [v.encode("utf-8", "surrogatepass") for v in values]
                start = appender.add(b"".join(encoded))
                offsets.resize(hi + 1, axis=0)
                offsets[lo + 1 : hi + 1] = start + np.cumsum([len(e) for e in encoded], dtype=np.int64)
            else:
                self._ds[i].resize(hi, axis=0)
                self._ds[i][lo:hi] = values

    def finish(self) -> None:
        for i, parts in enumerate(self._nulls):
            if i in self._text:
                self._text[i][0].finish(self.group, f"{i}.tail")
            mask = np.concatenate(parts) if parts else np.zeros(0, np.bool_)
            if mask.any():
                self.group.create_dataset(f"{i}.null", data=mask.astype(np.uint8))
        self._ds, self._text = [], {}


def read_column(f: h5py.File, schema: Sequence[Column], name: str, count: int) -> StoredColumn:
    """Column `name` of a shard with `count` items, read whole (two or three reads)."""
    pos = [c.name for c in schema].index(name)
    col, group = schema[pos], f["columns"]
    nulls = group[f"{pos}.null"][:count].astype(bool) if f"{pos}.null" in group else None
    if col.type != "string":
        return StoredColumn(col, group[str(pos)][:count], nulls)
    blob = read_bytes(group, str(pos), f"{pos}.tail")
    at = group[f"{pos}.offsets"][: count + 1]
    text = blob.decode("utf-8", "surrogatepass")  # one decode, then slices
    if len(text) != len(blob):  # not ASCII: character offset = byte offset - continuation bytes before it
        at = at - np.searchsorted(np.flatnonzero((np.frombuffer(blob, np.uint8) & 0xC0) == 0x80), at)
    bounds = at.tolist()
    return StoredColumn(col, [text[a:b] for a, b in pairwise(bounds)], nulls)
