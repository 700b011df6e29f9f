"""One HDF5 file per shard.

Layout (format_version 1):
- "images": fixed raw pixels -> (N, H, W, C) uint8, chunks (1, H, W, C) (one chunk per image, so a
  random read touches one chunk), optional gzip/lzf; variable raw pixels -> vlen uint8 (flattened)
  plus "shapes" (N, 3) int32; encoded images -> vlen uint8 holding the encoded bytes.
- "labels" (N,) int64 with -1 for "no label"; "keys" (N,) variable-length UTF-8 strings.
- file attrs: format_version, name, encoding, layout, image_shape (empty when variable), count
  (written by close(): a file without it is incomplete), attrs_json (ShardInfo.attrs as JSON).

Compression applies to fixed raw images only: on vlen datasets HDF5 filters compress the heap
references, not the data. h5py reads/writes vlen data through transient NumPy object arrays; those
only live in memory (the file holds plain uint8 sequences, never pickles).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import h5py
import numpy as np

from .base import LazyShardReader, Sample, ShardInfo, describe_data, normalize_indices, shard_layout

FORMAT_VERSION = 1
NO_LABEL = -1
_ROW_CHUNK = 256  # rows per chunk of the 1-D datasets (keys, labels, vlen references)
_BYTES = h5py.vlen_dtype(np.uint8)
_STR = h5py.string_dtype("utf-8")


class HDF5Writer:
    """Writes one shard; each write_batch extends every dataset once and assigns the batch in one slice."""

    def __init__(self, path: str, info: ShardInfo) -> None:
        self.path = path
        self.info = info
        self.layout = shard_layout(info)
        self._count = 0
        self._file: h5py.File | None = h5py.File(path, "w")
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
            f.create_dataset("images", (0, *shape), np.uint8, maxshape=(None, *shape), chunks=(1, *shape), **comp)
        else:
            f.create_dataset("images", (0,), _BYTES, maxshape=(None,), chunks=(_ROW_CHUNK,))
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
        images, shapes = self._images(samples)
        ds = self._ds
        for dataset in ds.values():
            dataset.resize(hi, axis=0)
        if self.layout == "fixed":
            ds["images"][lo:hi] = images
        else:  # write_direct: Dataset.__setitem__ mangles batches whose vlen rows are all one length
            ds["images"].write_direct(images, dest_sel=np.s_[lo:hi])
        if shapes is not None:
            ds["shapes"][lo:hi] = shapes
        ds["labels"][lo:hi] = np.array([NO_LABEL if s.label is None else s.label for s in samples], np.int64)
        ds["keys"][lo:hi] = np.array([s.key for s in samples], dtype=_STR)
        self._count = hi

    def _images(self, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray | None]:
        if self.layout == "fixed":
            shape = tuple(self.info.image_shape or ())
            for s in samples:
                if not isinstance(s.data, np.ndarray) or s.data.shape != shape or s.data.dtype != np.uint8:
                    raise ValueError(f"{s.key!r}: expected uint8 pixels of shape {shape}, got {describe_data(s.data)}")
            return np.stack([s.data for s in samples]), None
        flat = np.empty(len(samples), dtype=_BYTES)  # object array: h5py's vlen write API (in memory only)
        if self.layout == "encoded":
            for i, s in enumerate(samples):
                if not isinstance(s.data, (bytes, bytearray, memoryview)):
                    raise ValueError(f"{s.key!r}: expected encoded bytes, got {describe_data(s.data)}")
                flat[i] = np.frombuffer(s.data, np.uint8)
            return flat, None
        shapes = np.zeros((len(samples), 3), np.int32)
        for i, s in enumerate(samples):
            if not isinstance(s.data, np.ndarray) or s.data.ndim != 3 or s.data.dtype != np.uint8:
                raise ValueError(f"{s.key!r}: expected uint8 pixels (H, W, C), got {describe_data(s.data)}")
            flat[i] = np.ascontiguousarray(s.data).reshape(-1)
            shapes[i] = s.data.shape
        return flat, shapes

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


class HDF5Reader(LazyShardReader[h5py.File]):
    """Reads one shard from a path or a seekable binary file object (e.g. an fsspec file).

    Opens lazily and re-opens after fork (the process id is checked on each access); pickles as its
    source only. File objects cannot be re-opened, so pass a path when the reader crosses processes.
    """

    def _open(self) -> h5py.File:
        # locking=False: shards are immutable, and HDF5 file locks fail on many network filesystems
        f = h5py.File(self._source, "r", locking=False)
        try:
            self._load_meta(f)
        except BaseException:
            f.close()
            raise
        return f

    def _close(self, handle: h5py.File) -> None:
        handle.close()

    def _load_meta(self, f: h5py.File) -> None:
        a = f.attrs
        if "count" not in a:
            raise ValueError(f"{self._source!r}: incomplete HDF5 shard (writer did not close)")
        self._check_version(a["format_version"], FORMAT_VERSION)
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

    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Samples at `indices` (any order, duplicates allowed) with one dataset read."""
        ds = self._opened()["images"]
        idx = normalize_indices(indices, self._count)
        if idx.size == 0:
            return []
        uniq, inverse = np.unique(idx, return_inverse=True)
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if hi - lo <= 2 * uniq.size:  # dense: one contiguous read beats a point selection
            rows = ds[lo:hi][uniq - lo]
        else:
            rows = ds[uniq]
        return [self._sample(int(i), rows[j]) for i, j in zip(idx, inverse.reshape(-1))]

    def _sample(self, i: int, row: Any) -> dict[str, Any]:
        if self._layout == "fixed":
            image: Any = row.copy()  # its own buffer (duplicates must not alias)
        elif self._layout == "variable":
            image = np.array(row, np.uint8).reshape(tuple(self._shapes[i]))  # type: ignore[index]
        else:
            image = np.asarray(row, np.uint8).tobytes()
        return self._row(i, image)
