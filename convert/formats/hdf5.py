"""One HDF5 file per shard.

Layout (format_version 3):
- fixed raw pixels: "images" (N, H, W, C) uint8 in chunks of several images (`images_per_chunk`:
  ~1 MiB chunks when uncompressed, so a sequential read moves whole chunks and a random read is a
  small slice of one; one image per chunk when compressed, so a random read decompresses one image);
  optional gzip/lzf. A shard written without a fixed size (`image.resize: none`) whose images all
  have one shape uses this layout too: the writer decides at the first batch and falls back to the
  variable layout (copying what it wrote) at the first image of another shape.
- encoded images and variable-size raw pixels: every item's bytes concatenated, the whole 1 MiB
  chunks in "data" (1-D uint8) and the rest in "data_tail" (contiguous, exactly as long as it is:
  a last chunk stored whole cost up to 1 MiB per shard, 22 % of a JPEG shard); "offsets" (N+1,)
  int64 (item i is bytes offsets[i]:offsets[i+1] of data + data_tail); variable raw pixels add
  "shapes" (N, 3) int32.
- "labels" (N,) int64 with -1 for "no label"; "keys" (N,) variable-length UTF-8 strings.
- "columns": the stored columns (ShardInfo.columns), one dataset per column with a null mask where
  there are nulls (layout in `hdf5_columns`).
- file attrs: format_version, name, encoding, layout, image_shape (empty when variable), count
  (written by close(): a file without it is incomplete), attrs_json (ShardInfo.attrs as JSON),
  columns_json ([[name, type], ...]).
Version 1 shards (vlen "images") are refused with the fix (re-run the conversion); version 2 is read.

Reads of uncompressed data skip HDF5's selection machinery (`hdf5_chunks.Chunks`: the chunks' file
offsets are read once at open, items are copied out of a memory map or ranged reads).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Sequence

import h5py
import numpy as np

from ..specs import Column
from .base import LazyShardReader, Sample, ShardInfo, describe_data, normalize_indices, shard_layout
from .columns import StoredColumn, check_schema
from .hdf5_chunks import Chunks
from .hdf5_columns import Appender, ColumnWriter, read_column

FORMAT_VERSION = 3
NO_LABEL = -1
_ROW_CHUNK = 256  # rows per chunk of the 1-D datasets (keys, labels, offsets, columns)
_DATA_CHUNK = 2**20  # bytes per chunk of "data" and target bytes per chunk of fixed "images"
_WRITE_CACHE = 8 * 2**20  # writer chunk cache: partly filled chunks stay in memory between batches
_STR = h5py.string_dtype("utf-8")
_COPY_ROWS = 256  # rows per copy when a uniform shard turns variable


def images_per_chunk(shape: tuple[int, ...], compressed: bool) -> int:
    """Images per chunk of a fixed-shape "images" dataset (a power of two, at most 256)."""
    if compressed:
        return 1
    per = max(1, _DATA_CHUNK // max(1, int(np.prod(shape))))
    return int(min(256, 1 << (per.bit_length() - 1)))


def uniform_shape(samples: Sequence[Sample]) -> tuple[int, int, int] | None:
    """The one (H, W, C) of uint8 pixel samples, or None when they differ or are not pixels."""
    first = samples[0].data
    if not isinstance(first, np.ndarray) or first.ndim != 3 or first.dtype != np.uint8:
        return None
    shape = first.shape
    for s in samples:
        if not isinstance(s.data, np.ndarray) or s.data.shape != shape or s.data.dtype != np.uint8:
            return None
    return shape  # type: ignore[return-value]


class HDF5Writer:
    """Writes one shard; each write_batch extends every dataset once and assigns the batch in one slice."""

    def __init__(self, path: str, info: ShardInfo) -> None:
        check_schema(info.columns)
        self.path = path
        self.info = info
        self.layout = shard_layout(info)
        self._shape = tuple(info.image_shape) if info.image_shape else None
        self._decided = self.layout != "variable"  # variable: decided by the first batch (uniform -> fixed)
        self._adaptive = False  # fixed because the first batch was uniform: may still turn variable
        self._count = 0
        self._data: Appender | None = None  # the flat layout's bytes, in whole chunks (+ "data_tail")
        self._ds: dict[str, h5py.Dataset] = {}
        self._file: h5py.File | None = h5py.File(path, "w", rdcc_nbytes=_WRITE_CACHE)
        try:
            self._create(self._file)
        except BaseException:
            self.abort()
            raise

    def _create(self, f: h5py.File) -> None:
        info = self.info
        if self._decided:
            self._create_images(f)
        f.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(_ROW_CHUNK,))
        f.create_dataset("keys", (0,), _STR, maxshape=(None,), chunks=(_ROW_CHUNK,))
        self._cols = ColumnWriter(f, info.columns)
        # Hold every dataset open for the writer's lifetime and flush explicitly at close: HDF5
        # allocates chunks when a dataset's cache is flushed, so handles whose lifetime depended on
        # Python's garbage collector made the file layout (and the shard's sha256) vary run to run.
        self._ds.update({"labels": f["labels"], "keys": f["keys"]})
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["name"] = info.name
        f.attrs["encoding"] = info.encoding
        f.attrs["attrs_json"] = json.dumps(info.attrs)
        f.attrs["columns_json"] = json.dumps([[c.name, c.type] for c in info.columns])

    def _create_images(self, f: h5py.File) -> None:
        if self.layout == "fixed":
            shape = tuple(int(s) for s in self._shape or ())
            comp: dict[str, Any] = {}
            if self.info.compression == "gzip":
                comp = {"compression": "gzip", "compression_opts": self.info.compression_level}
            elif self.info.compression == "lzf":
                comp = {"compression": "lzf"}
            rows = images_per_chunk(shape, bool(comp))
            f.create_dataset("images", (0, *shape), np.uint8, maxshape=(None, *shape), chunks=(rows, *shape), **comp)
            names = ["images"]
        else:
            f.create_dataset("data", (0,), np.uint8, maxshape=(None,), chunks=(_DATA_CHUNK,))
            f.create_dataset("offsets", (1,), np.int64, maxshape=(None,), chunks=(_ROW_CHUNK,))
            names = ["data", "offsets"]
            self._data = Appender(f["data"], _DATA_CHUNK)
            if self.layout == "variable":
                f.create_dataset("shapes", (0, 3), np.int32, maxshape=(None, 3), chunks=(_ROW_CHUNK, 3))
                names.append("shapes")
        self._ds.update({name: f[name] for name in names})

    def write_batch(self, samples: Sequence[Sample]) -> None:
        """Append samples in order (one resize + one slice assignment per dataset)."""
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        if not samples:
            return
        self._choose_layout(samples)
        lo, n = self._count, len(samples)
        hi = lo + n
        ds = self._ds
        if self.layout == "fixed":
            images = self._fixed(samples)
            ds["images"].resize(hi, axis=0)
            ds["images"][lo:hi] = images
        else:
            self._append_flat(lo, *self._flat(samples))
        ds["labels"].resize(hi, axis=0)
        ds["labels"][lo:hi] = np.array([NO_LABEL if s.label is None else s.label for s in samples], np.int64)
        ds["keys"].resize(hi, axis=0)
        ds["keys"][lo:hi] = np.array([s.key for s in samples], dtype=_STR)
        self._cols.write(lo, samples)
        self._count = hi

    def _choose_layout(self, samples: Sequence[Sample]) -> None:
        """Variable raw pixels: the first batch decides (one shape -> fixed); a later image of
        another shape turns an adaptive fixed shard variable (what was written is copied)."""
        if not self._decided:
            shape = uniform_shape(samples)
            self._decided = True
            if shape is not None:
                self.layout, self._shape, self._adaptive = "fixed", shape, True
            assert self._file is not None
            self._create_images(self._file)
        elif self._adaptive and uniform_shape(samples) != self._shape:
            self._to_variable()

    def _to_variable(self) -> None:
        f = self._file
        assert f is not None
        old, n, shape = self._ds.pop("images"), self._count, self._shape
        self.layout, self._shape, self._adaptive = "variable", None, False
        self._create_images(f)
        for lo in range(0, n, _COPY_ROWS):
            block = old[lo : min(n, lo + _COPY_ROWS)]
            k = block.shape[0]
            sizes = np.full(k, block[0].size, np.int64)
            self._append_flat(lo, block.reshape(-1), sizes, np.tile(np.asarray(shape, np.int32), (k, 1)))
        del old
        del f["images"]

    def _append_flat(self, lo: int, blob: np.ndarray, sizes: np.ndarray, shapes: np.ndarray | None) -> None:
        """Rows lo.. of the flat layout: their bytes, offsets and (variable raw pixels) shapes."""
        ds, hi = self._ds, lo + sizes.size
        assert self._data is not None
        start = self._data.add(np.ascontiguousarray(blob))
        ds["offsets"].resize(hi + 1, axis=0)
        ds["offsets"][lo + 1 : hi + 1] = start + np.cumsum(sizes)
        if shapes is not None:
            ds["shapes"].resize(hi, axis=0)
            ds["shapes"][lo:hi] = shapes

    def _fixed(self, samples: Sequence[Sample]) -> np.ndarray:
        shape = tuple(self._shape or ())
        for s in samples:
            if not isinstance(s.data, np.ndarray) or s.data.shape != shape or s.data.dtype != np.uint8:
                raise ValueError(f"{s.key!r}: expected uint8 pixels of shape {shape}, got {describe_data(s.data)}")
        return np.stack([s.data for s in samples])

    def _flat(self, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(every item's bytes concatenated, per-item sizes, shapes for variable raw pixels)."""
        parts: list[Any] = []
        shapes = np.zeros((len(samples), 3), np.int32) if self.layout == "variable" else None
        for i, s in enumerate(samples):
            if shapes is None:
                if not isinstance(s.data, (bytes, bytearray, memoryview)):
                    raise ValueError(f"{s.key!r}: expected encoded bytes, got {describe_data(s.data)}")
                parts.append(np.frombuffer(s.data, np.uint8))
            else:
                if not isinstance(s.data, np.ndarray) or s.data.ndim != 3 or s.data.dtype != np.uint8:
                    raise ValueError(f"{s.key!r}: expected uint8 pixels (H, W, C), got {describe_data(s.data)}")
                parts.append(np.ascontiguousarray(s.data).reshape(-1))
                shapes[i] = s.data.shape
        sizes = np.array([p.size for p in parts], np.int64)
        return np.concatenate(parts), sizes, shapes

    def close(self) -> None:
        """Record the count and close; the file is a complete shard afterwards. Idempotent."""
        f = self._file
        if f is None:
            return
        if not self._decided:  # no samples at all
            self._decided = True
            self._create_images(f)
        if self._data is not None:
            self._data.finish(f, "data_tail")
        self._cols.finish()
        f.attrs["layout"] = self.layout
        f.attrs["image_shape"] = np.asarray(self._shape or (), dtype=np.int64)
        f.attrs["count"] = self._count
        f.flush()  # allocate everything now, in one deterministic order
        self._ds = {}
        f.close()
        self._file = None

    def abort(self) -> None:
        """Close without completing and delete the file."""
        self._ds = {}
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        if os.path.exists(self.path):
            os.remove(self.path)

    def __enter__(self) -> "HDF5Writer":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.abort() if exc_type is not None else self.close()


_Handle = tuple[h5py.File, "Chunks | None"]


class HDF5Reader(LazyShardReader[_Handle]):
    """Reads one shard from a path or a seekable binary file object (e.g. an fsspec file).

    Opens lazily and re-opens after fork (the process id is checked on each access); pickles as its
    source only. File objects cannot be re-opened, so pass a path when the reader crosses processes.
    """

    _offsets: np.ndarray | None  # flat layout: item byte offsets (N+1), read with the first item
    _shapes: np.ndarray | None  # variable raw pixels: (N, 3)

    def _open(self) -> _Handle:
        # locking=False: shards are immutable, and HDF5 file locks fail on many network filesystems
        f = h5py.File(self._source, "r", locking=False)
        try:
            self._load_meta(f)
            ds = f["images" if self._layout == "fixed" else "data"]
            tail = f.get("data_tail") if self._layout != "fixed" else None
            chunks = Chunks(ds, self._source, tail) if Chunks.usable(ds, tail) else None
        except BaseException:
            f.close()
            raise
        return f, chunks

    def _close(self, handle: _Handle) -> None:
        if handle[1] is not None:
            handle[1].close()
        handle[0].close()

    def _load_meta(self, f: h5py.File) -> None:
        a = f.attrs
        if "count" not in a:
            raise ValueError(f"{self._source!r}: incomplete HDF5 shard (writer did not close)")
        self._check_version(a["format_version"], FORMAT_VERSION)
        if int(a["format_version"]) < 2:
            raise ValueError(
                f"{self._source!r}: format_version {a['format_version']} shards are no longer read; "
                "re-run the conversion into a new output to rewrite them"
            )
        shape = tuple(int(s) for s in a["image_shape"])
        self._encoding = str(a["encoding"])
        self._layout = str(a["layout"])
        self._image_shape = shape if shape else None  # type: ignore[assignment]
        self._count = int(a["count"])
        self._attrs = json.loads(a["attrs_json"])
        self._labels, self._keys = None, None  # type: ignore[assignment]
        self._schema = tuple(Column(str(n), str(t)) for n, t in json.loads(a.get("columns_json", "[]")))

    def _read_columns(self, handle: _Handle, name: str) -> list[StoredColumn]:
        f, chunks = handle
        # a file object is shared with the chunk reads: h5py reads on it under the same lock
        with chunks.lock if chunks is not None else contextlib.nullcontext():
            return [read_column(f, self._schema, name, self._count)]

    def _rows(self, f: h5py.File) -> None:
        """Labels, keys, item offsets and shapes, read on the first item read (a column read
        needs none of them)."""
        if self._keys is None:
            self._shapes = f["shapes"][: self._count] if self._layout == "variable" else None
            self._offsets = f["offsets"][: self._count + 1] if self._layout != "fixed" else None
            labels = f["labels"][: self._count]
            self._labels = [None if v == NO_LABEL else int(v) for v in labels.tolist()]
            self._keys = f["keys"].asstr()[: self._count].tolist()

    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Samples at `indices` (any order, duplicates allowed); each distinct item is read once."""
        f, chunks = self._opened()
        idx = normalize_indices(indices, self._count)
        if idx.size == 0:
            return []
        self.reads["image"] += idx.size
        with chunks.lock if chunks is not None else contextlib.nullcontext():
            self._rows(f)
        if self._layout == "fixed":  # (h5py is used only when `chunks` is None: it shares a file object)
            images = self._fixed_rows(f, chunks, idx)
            return [self._row(int(i), images[j]) for j, i in enumerate(idx.tolist())]
        off = self._offsets
        assert off is not None
        read = chunks.read if chunks is not None else _h5py_reader(f)
        return [self._row(i, self._image(read(int(off[i]), int(off[i + 1])), i)) for i in idx.tolist()]

    def _fixed_rows(self, f: h5py.File, chunks: Chunks | None, idx: np.ndarray) -> np.ndarray:
        """(len(idx), H, W, C) pixels; distinct rows for duplicate indices."""
        shape = self._image_shape
        assert shape is not None
        out = np.empty((idx.size, *shape), np.uint8)
        if chunks is not None:
            chunks.gather_rows(idx, int(np.prod(shape)), out.reshape(idx.size, -1))
            return out
        # compressed: read each touched chunk once (sorted, chunk-aligned), scatter to the positions
        ds = f["images"]
        rows = ds.chunks[0]
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        bounds = np.flatnonzero(np.diff(sorted_idx // rows)) + 1
        for group in np.split(np.arange(idx.size), bounds):
            first = int(sorted_idx[group[0]]) // rows * rows
            block = ds[first : min(first + rows, self._count)]
            out[order[group]] = block[sorted_idx[group] - first]
        return out

    def _image(self, data: Any, i: int) -> np.ndarray | bytes:
        if self._layout == "variable":
            return np.frombuffer(data, np.uint8).reshape(tuple(self._shapes[i])).copy()  # type: ignore[index]
        return bytes(data)


def _h5py_reader(f: h5py.File) -> Any:
    """read(lo, hi) of the flat layout through h5py (data, then data_tail), for filtered files."""
    data, tail = f["data"], f.get("data_tail")
    limit = data.shape[0]

    def read(lo: int, hi: int) -> bytes:
        head = data[lo : min(hi, limit)].tobytes() if lo < limit else b""
        rest = tail[max(lo, limit) - limit : hi - limit].tobytes() if hi > limit and tail is not None else b""
        return head + rest

    return read
