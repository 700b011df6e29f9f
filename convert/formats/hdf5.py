"""One HDF5 file per shard.

Layout (format_version 2):
- fixed raw pixels: "images" (N, H, W, C) uint8 in chunks of several images (`images_per_chunk`:
  ~1 MiB chunks when uncompressed, so a sequential read moves whole chunks and a random read is a
  small slice of one; one image per chunk when compressed, so a random read decompresses one image);
  optional gzip/lzf.
- encoded images and variable-size raw pixels: "data", every item's bytes concatenated (1-D uint8 in
  1 MiB chunks), "offsets" (N+1,) int64 (item i is data[offsets[i]:offsets[i+1]]); variable raw
  pixels add "shapes" (N, 3) int32.
- "labels" (N,) int64 with -1 for "no label"; "keys" (N,) variable-length UTF-8 strings.
- file attrs: format_version, name, encoding, layout, image_shape (empty when variable), count
  (written by close(): a file without it is incomplete), attrs_json (ShardInfo.attrs as JSON).
Version 1 shards (vlen "images") are refused with the fix (re-run the conversion).

Reads of uncompressed data skip HDF5's selection machinery: the byte offset of every chunk is read
once at open (`chunk_iter`, the same map kerchunk builds), and items are copied straight out of a
memory map of the file (or ranged reads of a file object). h5py costs ~60 µs per selection, and a
point selection of 256 images from one-image chunks took 450 ms; a slice of a map costs ~1 µs.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from typing import Any, BinaryIO, Sequence

import h5py
import numpy as np

from .base import LazyShardReader, Sample, ShardInfo, describe_data, normalize_indices, shard_layout

FORMAT_VERSION = 2
NO_LABEL = -1
_ROW_CHUNK = 256  # rows per chunk of the 1-D datasets (keys, labels, offsets)
_DATA_CHUNK = 2**20  # bytes per chunk of "data" and target bytes per chunk of fixed "images"
_WRITE_CACHE = 8 * 2**20  # writer chunk cache: partly filled chunks stay in memory between batches
_STR = h5py.string_dtype("utf-8")


def images_per_chunk(shape: tuple[int, ...], compressed: bool) -> int:
    """Images per chunk of a fixed-shape "images" dataset (a power of two, at most 256)."""
    if compressed:
        return 1
    per = max(1, _DATA_CHUNK // max(1, int(np.prod(shape))))
    return int(min(256, 1 << (per.bit_length() - 1)))


class HDF5Writer:
    """Writes one shard; each write_batch extends every dataset once and assigns the batch in one slice."""

    def __init__(self, path: str, info: ShardInfo) -> None:
        self.path = path
        self.info = info
        self.layout = shard_layout(info)
        self._count = 0
        self._nbytes = 0
        self._file: h5py.File | None = h5py.File(path, "w", rdcc_nbytes=_WRITE_CACHE)
        try:
            self._create(self._file)
        except BaseException:
            self.abort()
            raise

    def _create(self, f: h5py.File) -> None:
        info = self.info
        if self.layout == "fixed":
            shape = tuple(int(s) for s in info.image_shape or ())
            comp: dict[str, Any] = {}
            if info.compression == "gzip":
                comp = {"compression": "gzip", "compression_opts": info.compression_level}
            elif info.compression == "lzf":
                comp = {"compression": "lzf"}
            rows = images_per_chunk(shape, bool(comp))
            f.create_dataset("images", (0, *shape), np.uint8, maxshape=(None, *shape), chunks=(rows, *shape), **comp)
        else:
            f.create_dataset("data", (0,), np.uint8, maxshape=(None,), chunks=(_DATA_CHUNK,))
            f.create_dataset("offsets", (1,), np.int64, maxshape=(None,), chunks=(_ROW_CHUNK,))
            if self.layout == "variable":
                f.create_dataset("shapes", (0, 3), np.int32, maxshape=(None, 3), chunks=(_ROW_CHUNK, 3))
        f.create_dataset("labels", (0,), np.int64, maxshape=(None,), chunks=(_ROW_CHUNK,))
        f.create_dataset("keys", (0,), _STR, maxshape=(None,), chunks=(_ROW_CHUNK,))
        # Hold every dataset open for the writer's lifetime and flush explicitly at close: HDF5
        # allocates chunks when a dataset's cache is flushed, so handles whose lifetime depended on
        # Python's garbage collector made the file layout (and the shard's sha256) vary run to run.
        self._ds = {name: f[name] for name in f}
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["name"] = info.name
        f.attrs["encoding"] = info.encoding
        f.attrs["layout"] = self.layout
        f.attrs["image_shape"] = np.asarray(info.image_shape or (), dtype=np.int64)
        f.attrs["attrs_json"] = json.dumps(info.attrs)

    def write_batch(self, samples: Sequence[Sample]) -> None:
        """Append samples in order (one resize + one slice assignment per dataset)."""
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        if not samples:
            return
        lo, n = self._count, len(samples)
        hi = lo + n
        ds = self._ds
        if self.layout == "fixed":
            images = self._fixed(samples)
            ds["images"].resize(hi, axis=0)
            ds["images"][lo:hi] = images
        else:
            blob, sizes, shapes = self._flat(samples)
            start, self._nbytes = self._nbytes, self._nbytes + blob.size
            ds["data"].resize(self._nbytes, axis=0)
            if blob.size:
                ds["data"][start : self._nbytes] = blob
            ds["offsets"].resize(hi + 1, axis=0)
            ds["offsets"][lo + 1 : hi + 1] = start + np.cumsum(sizes)
            if shapes is not None:
                ds["shapes"].resize(hi, axis=0)
                ds["shapes"][lo:hi] = shapes
        ds["labels"].resize(hi, axis=0)
        ds["labels"][lo:hi] = np.array([NO_LABEL if s.label is None else s.label for s in samples], np.int64)
        ds["keys"].resize(hi, axis=0)
        ds["keys"][lo:hi] = np.array([s.key for s in samples], dtype=_STR)
        self._count = hi

    def _fixed(self, samples: Sequence[Sample]) -> np.ndarray:
        shape = tuple(self.info.image_shape or ())
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
        if self._file is None:
            return
        self._file.attrs["count"] = self._count
        self._file.flush()  # allocate everything now, in one deterministic order
        self._ds = {}
        self._file.close()
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


class _Chunks:
    """Byte ranges of one uncompressed chunked dataset, read from the file without HDF5.

    `starts[k]` is the file offset of chunk k (each chunk is `size` contiguous bytes of the dataset
    flattened in C order). Reads come from a memory map of a local file, or seek+read of a file
    object (one lock: file objects are not thread-safe).
    """

    def __init__(self, ds: h5py.Dataset, source: str | BinaryIO) -> None:
        self.size = int(np.prod(ds.chunks)) * ds.dtype.itemsize
        self.starts = np.zeros(-(-ds.size * ds.dtype.itemsize // self.size) if ds.size else 0, np.int64)
        rows = ds.chunks[0]

        def visit(info: Any) -> None:
            self.starts[info.chunk_offset[0] // rows] = info.byte_offset

        ds.id.chunk_iter(visit)
        self._map: mmap.mmap | None = None
        self._file: BinaryIO | None = None
        self._lock = threading.Lock()
        if isinstance(source, str):
            with open(source, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
        else:
            self._file = source

    @staticmethod
    def usable(ds: h5py.Dataset) -> bool:
        return ds.chunks is not None and ds.id.get_create_plist().get_nfilters() == 0 and hasattr(ds.id, "chunk_iter")

    def read(self, lo: int, hi: int) -> bytes | memoryview:
        """Bytes [lo, hi) of the flattened dataset (a view into the map when local)."""
        pieces = []
        while lo < hi:
            k, inner = divmod(lo, self.size)
            n = min(hi - lo, self.size - inner)
            pieces.append(self._range(int(self.starts[k]) + inner, n))
            lo += n
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def gather_rows(self, idx: np.ndarray, nbytes: int, out: np.ndarray) -> None:
        """out[j] = row idx[j] of a fixed-row dataset (rows of `nbytes`, whole rows per chunk):
        one copy per touched chunk (sequential batches move whole chunks, random ones a few rows)."""
        rows = self.size // nbytes
        chunk = idx // rows
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        for group in np.split(order, bounds):
            k = int(chunk[group[0]])
            n = min(rows, (int(self.starts.size) - k) * rows)
            if self._map is not None:
                block = np.frombuffer(self._map, np.uint8, count=n * nbytes, offset=int(self.starts[k])).reshape(n, nbytes)
            else:
                lo, hi = int(idx[group].min() % rows), int(idx[group].max() % rows) + 1
                data = np.frombuffer(self._range(int(self.starts[k]) + lo * nbytes, (hi - lo) * nbytes), np.uint8)
                block = np.empty((hi, nbytes), np.uint8)
                block[lo:] = data.reshape(hi - lo, nbytes)
            out[group] = block[idx[group] % rows]

    def _range(self, start: int, n: int) -> bytes | memoryview:
        if self._map is not None:
            return memoryview(self._map)[start : start + n]
        with self._lock:
            self._file.seek(start)  # type: ignore[union-attr]
            return self._file.read(n)  # type: ignore[union-attr]

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view: the map closes when it is collected
                pass
            self._map = None


class HDF5Reader(LazyShardReader[tuple[h5py.File, "_Chunks | None"]]):
    """Reads one shard from a path or a seekable binary file object (e.g. an fsspec file).

    Opens lazily and re-opens after fork (the process id is checked on each access); pickles as its
    source only. File objects cannot be re-opened, so pass a path when the reader crosses processes.
    """

    def _open(self) -> tuple[h5py.File, _Chunks | None]:
        # locking=False: shards are immutable, and HDF5 file locks fail on many network filesystems
        f = h5py.File(self._source, "r", locking=False)
        try:
            self._load_meta(f)
            ds = f["images" if self._layout == "fixed" else "data"]
            chunks = _Chunks(ds, self._source) if _Chunks.usable(ds) else None
        except BaseException:
            f.close()
            raise
        return f, chunks

    def _close(self, handle: tuple[h5py.File, _Chunks | None]) -> None:
        if handle[1] is not None:
            handle[1].close()
        handle[0].close()

    def _load_meta(self, f: h5py.File) -> None:
        a = f.attrs
        if "count" not in a:
            raise ValueError(f"{self._source!r}: incomplete HDF5 shard (writer did not close)")
        self._check_version(a["format_version"], FORMAT_VERSION)
        if int(a["format_version"]) < FORMAT_VERSION:
            raise ValueError(f"{self._source!r}: format_version {a['format_version']} shards are no longer read; "
                             "re-run the conversion into a new output to rewrite them")  # fmt: skip
        shape = tuple(int(s) for s in a["image_shape"])
        self._encoding = str(a["encoding"])
        self._layout = str(a["layout"])
        self._image_shape = shape if shape else None  # type: ignore[assignment]
        self._count = int(a["count"])
        self._attrs = json.loads(a["attrs_json"])
        labels = f["labels"][: self._count]
        self._labels = [None if v == NO_LABEL else int(v) for v in labels]
        self._keys = f["keys"].asstr()[: self._count].tolist()
        self._shapes = f["shapes"][: self._count] if self._layout == "variable" else None
        self._offsets = f["offsets"][: self._count + 1] if "offsets" in f else None

    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Samples at `indices` (any order, duplicates allowed); each distinct item is read once."""
        f, chunks = self._opened()
        idx = normalize_indices(indices, self._count)
        if idx.size == 0:
            return []
        if self._layout == "fixed":  # (h5py is used only when `chunks` is None: it shares a file object)
            images = self._fixed_rows(f, chunks, idx)
            return [self._row(int(i), images[j]) for j, i in enumerate(idx.tolist())]
        off = self._offsets
        assert off is not None
        read = chunks.read if chunks is not None else (lambda lo, hi: f["data"][lo:hi])
        return [self._row(i, self._image(read(int(off[i]), int(off[i + 1])), i)) for i in idx.tolist()]

    def _fixed_rows(self, f: h5py.File, chunks: _Chunks | None, idx: np.ndarray) -> np.ndarray:
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
