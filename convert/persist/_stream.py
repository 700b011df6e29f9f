"""Moving payload bytes: arrays stream out of their own memory and back into preallocated arrays.

Writes hand the compressor bounded memoryview slices of each array (no full copy); reads fill
np.empty destinations slice by slice. When the payload's size cannot be checked against the file
(compressed or unseekable input), large blocks are read into a buffer that grows as data actually
arrives, so a lying size field fails at end of stream instead of allocating up front.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Iterator

import numpy as np

from ._errors import PersistError
from ._format import PREAMBLE, BlockSpec, data_start, pack_preamble, parse_header, parse_preamble
from ._tree import Decoder

WRITE_CHUNK = 1 << 24  # bytes per write() of uncompressed data
COMPRESS_CHUNK = 1 << 20  # bytes handed to the compressor per call
READ_CHUNK = 1 << 22  # bytes per readinto() from an uncompressed source (no copy involved)
DECODE_CHUNK = 1 << 19  # bytes per readinto() from a decompressor (each is a transient copy)
GROW_START = 1 << 24  # unverifiable blocks up to this size are allocated at once
# Blocks of a compressed file are allocated at once, without growing, while their running total
# stays within this multiple of the compressed size: typical data compresses far less than 64x,
# so only freak ratios (all-zero arrays, crafted sizes) take the slower growing path.
RATIO_BUDGET = 64


def byte_view(arr: np.ndarray) -> memoryview:
    """Flat uint8 memoryview over a contiguous array's memory, in its memory order (no copy)."""
    return memoryview(arr.ravel(order="K").view(np.uint8))


def _array_chunks(arr: np.ndarray) -> Iterator[memoryview]:
    if arr.nbytes == 0:
        return
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        yield byte_view(arr)
        return
    # Strided views have no single buffer: numpy's buffered iterator copies bounded C-order pieces.
    size = max(COMPRESS_CHUNK // arr.itemsize, 1)
    for piece in np.nditer(arr, flags=["external_loop", "buffered", "zerosize_ok"], buffersize=size, order="C"):
        yield byte_view(piece)


class _Sink:
    """Writes bytes to fh, through a compressor if there is one."""

    def __init__(self, fh: BinaryIO, compressor: Any) -> None:
        self._fh, self._c = fh, compressor

    def _put(self, data: Any) -> None:
        view = memoryview(data)
        while len(view):  # raw (unbuffered) files may write only part of what they are given
            written = self._fh.write(view)
            view = view[len(view) if written is None else written :]

    def write(self, data: Any) -> None:
        view = memoryview(data)
        step = WRITE_CHUNK if self._c is None else COMPRESS_CHUNK
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            out = piece if self._c is None else self._c.compress(piece)
            if out:
                self._put(out)

    def finish(self) -> None:
        if self._c is not None:
            self._put(self._c.flush())


def write_payload(
    fh: BinaryIO, compressor: Any, header: bytes, arrays: list[np.ndarray], specs: list[BlockSpec]
) -> None:
    """Write preamble, header and every array body (ALIGN-padded) to fh."""
    sink = _Sink(fh, compressor)
    head = pack_preamble(header)
    sink.write(head)
    pos = start = len(head)
    for arr, spec in zip(arrays, specs):
        sink.write(bytes(start + spec.offset - pos))
        for chunk in _array_chunks(arr):
            sink.write(chunk)
        pos = start + spec.offset + spec.nbytes
    sink.finish()


class _Source:
    """Exact-size reads from a stream; EOF before the expected end raises PersistError."""

    def __init__(self, stream: Any, verified: bool, chunk: int, budget: int = 0) -> None:
        self._stream, self.verified, self._chunk, self._budget = stream, verified, chunk, budget
        self._readinto = getattr(stream, "readinto", None) or self._readinto_via_read

    def _readinto_via_read(self, view: memoryview) -> int:
        data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def fill(self, view: memoryview) -> None:
        pos, end = 0, len(view)
        while pos < end:
            got = self._readinto(view[pos : pos + self._chunk])
            if not got:
                raise PersistError("file is truncated: it ends before the data its header describes")
            pos += got

    def read_bytes(self, n: int) -> bytearray:
        """n bytes, read in bounded pieces so a lying length fails at EOF, not at allocation."""
        out = bytearray()
        while len(out) < n:
            piece = bytearray(min(n - len(out), self._chunk))
            self.fill(memoryview(piece))
            out += piece
        return out

    def skip_padding(self, n: int) -> None:
        if self.read_bytes(n).count(0) != n:
            raise PersistError("corrupt file: non-zero padding between blocks")

    def read_array(self, spec: BlockSpec) -> np.ndarray:
        if spec.nbytes == 0:
            return np.empty(spec.shape, spec.dtype, order=spec.order)
        direct = self.verified or spec.nbytes <= GROW_START or spec.nbytes <= self._budget
        if not direct:
            flat = self._read_growing(spec.nbytes)
            return flat.view(spec.dtype).reshape(spec.shape, order=spec.order)
        if not self.verified and spec.nbytes > GROW_START:
            self._budget -= spec.nbytes
        arr = np.empty(spec.shape, spec.dtype, order=spec.order)
        self.fill(byte_view(arr))
        return arr

    def _read_growing(self, n: int) -> np.ndarray:
        buf, filled, cap = np.empty(GROW_START, np.uint8), 0, GROW_START
        while True:
            view = memoryview(buf)[filled:cap]
            self.fill(view)
            del view  # no buffer exports may be alive when resize() reallocates
            if cap == n:
                return buf
            filled, cap = cap, min(n, cap * 2)
            # realloc: large blocks are mremap-ed in place on Linux, so peak stays ~n, not 1.5n
            buf.resize(cap, refcheck=False)

    def expect_eof(self) -> None:
        if self._stream.read(1):
            raise PersistError("unexpected data after the end of the payload")


def _map_blocks(path: str, mode: str, start: int, specs: list[BlockSpec]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for s in specs:
        if s.nbytes == 0:  # mmap cannot map zero bytes
            out.append(np.empty(s.shape, s.dtype, order=s.order))
        else:
            out.append(np.memmap(path, s.dtype, mode, offset=start + s.offset, shape=s.shape, order=s.order))
    return out


def read_payload(
    stream: Any, remaining: int | None, mmap: tuple[str, str] | None = None, compressed_size: int | None = None
) -> Any:
    """Read and rebuild one object.

    remaining: bytes left in an uncompressed seekable file (None if unknown); mmap: (path, mode)
    to map array blocks instead of reading them; compressed_size: set when stream is a
    decompressor (0 if the compressed size is unknown).
    """
    if compressed_size is None:
        src = _Source(stream, remaining is not None, READ_CHUNK)
    else:
        src = _Source(stream, False, DECODE_CHUNK, compressed_size * RATIO_BUDGET)
    header_len, crc = parse_preamble(bytes(src.read_bytes(PREAMBLE.size)))
    if remaining is not None and PREAMBLE.size + header_len > remaining:
        raise PersistError("header length field exceeds the file size")
    root, specs, data_size = parse_header(src.read_bytes(header_len), crc)
    start = data_start(header_len)
    if remaining is not None and start + data_size != remaining:
        raise PersistError(f"file holds {remaining} bytes but its header describes {start + data_size}")
    if mmap is not None:
        return Decoder(_map_blocks(mmap[0], mmap[1], start, specs)).decode_root(root)
    src.skip_padding(start - PREAMBLE.size - header_len)
    blocks, pos = [], start
    for spec in specs:
        src.skip_padding(start + spec.offset - pos)
        blocks.append(src.read_array(spec))
        pos = start + spec.offset + spec.nbytes
    src.expect_eof()
    return Decoder(blocks).decode_root(root)
