"""Byte ranges of an uncompressed HDF5 dataset read straight from the file, without HDF5.

The file offset of every chunk is read once at open (`chunk_iter`, the same map kerchunk builds);
items are then copied out of a memory map of the file (or ranged reads of a file object). h5py
costs ~60 us per selection, and a point selection of 256 images from one-image chunks took 450 ms;
a slice of a map costs ~1 us. A contiguous "tail" dataset continues the chunked one (the HDF5
writer stores the last, partly filled chunk's bytes there, trimmed to their length).
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any, BinaryIO

import h5py
import numpy as np


class Chunks:
    """Byte ranges of one uncompressed chunked dataset (+ an optional contiguous tail dataset).

    `starts[k]` is the file offset of chunk k (each chunk is `size` contiguous bytes of the dataset
    flattened in C order). Reads come from a memory map of a local file, or seek+read of a file
    object under `lock` (file objects are not thread-safe: h5py reads on the same object take it too).
    """

    def __init__(self, ds: h5py.Dataset, source: str | BinaryIO, tail: h5py.Dataset | None = None) -> None:
        self.size = int(np.prod(ds.chunks)) * ds.dtype.itemsize
        self.limit = ds.size * ds.dtype.itemsize  # bytes held by the chunked dataset
        self.starts = np.zeros(-(-self.limit // self.size) if ds.size else 0, np.int64)
        rows = ds.chunks[0]

        def visit(info: Any) -> None:
            self.starts[info.chunk_offset[0] // rows] = info.byte_offset

        ds.id.chunk_iter(visit)
        offset = tail.id.get_offset() if tail is not None and tail.size else None
        self.tail = (int(offset), int(tail.size)) if offset is not None and tail is not None else (0, 0)
        self._map: mmap.mmap | None = None
        self._file: BinaryIO | None = None
        self.lock = threading.Lock()
        if isinstance(source, str):
            with open(source, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
        else:
            self._file = source

    @staticmethod
    def usable(ds: h5py.Dataset, tail: h5py.Dataset | None = None) -> bool:
        plain = tail is None or not tail.size or tail.id.get_offset() is not None
        return (
            plain
            and ds.chunks is not None
            and ds.id.get_create_plist().get_nfilters() == 0
            and hasattr(ds.id, "chunk_iter")
        )

    def read(self, lo: int, hi: int) -> bytes | memoryview:
        """Bytes [lo, hi) of the flattened dataset and its tail (a view into the map when local)."""
        pieces = []
        while lo < hi:
            if lo >= self.limit:  # the tail, contiguous
                pieces.append(self._range(self.tail[0] + lo - self.limit, hi - lo))
                break
            k, inner = divmod(lo, self.size)
            n = min(hi - lo, self.size - inner, self.limit - lo)
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
                block = np.frombuffer(self._map, np.uint8, count=n * nbytes, offset=int(self.starts[k])).reshape(
                    n, nbytes
                )
            else:
                lo, hi = int(idx[group].min() % rows), int(idx[group].max() % rows) + 1
                data = np.frombuffer(self._range(int(self.starts[k]) + lo * nbytes, (hi - lo) * nbytes), np.uint8)
                block = np.empty((hi, nbytes), np.uint8)
                block[lo:] = data.reshape(hi - lo, nbytes)
            out[group] = block[idx[group] % rows]

    def _range(self, start: int, n: int) -> bytes | memoryview:
        if self._map is not None:
            return memoryview(self._map)[start : start + n]
        with self.lock:
            self._file.seek(start)  # type: ignore[union-attr]
            return self._file.read(n)  # type: ignore[union-attr]

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view: the map closes when it is collected
                pass
            self._map = None
