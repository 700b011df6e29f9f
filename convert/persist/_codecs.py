"""Compression codecs: names, file extensions, magic numbers, streaming compressors, bounded readers.

Every codec writes a standard single stream that the usual command-line tool can decompress
(gzip -d, bzip2 -d, xz -d, zstd -d, lz4 -d; "zlib" is a raw zlib stream like joblib's .z files).
zstandard and lz4 are imported only when used.
"""

from __future__ import annotations

import bz2
import importlib
import lzma
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from ._errors import PersistError
from ._format import MAGIC

IN_CHUNK = 1 << 17  # compressed bytes pulled from the source per step


def _optional(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this compression needs the {package!r} package: pip install {package}") from exc


class _Lz4Compressor:
    """lz4.frame's compressor needs begin() before the first chunk; give it compress/flush."""

    def __init__(self, level: int) -> None:
        frame = _optional("lz4.frame", "lz4")
        self._c = frame.LZ4FrameCompressor(compression_level=level, content_checksum=True)
        self._started = False

    def compress(self, data: Any) -> bytes:
        head = b"" if self._started else self._c.begin()
        self._started = True
        return head + self._c.compress(data)

    def flush(self) -> bytes:
        head = b"" if self._started else self._c.begin()
        self._started = True
        return head + self._c.flush()


class _BoundedReader:
    """readinto() over a stdlib-style decompressor, never producing more than the caller asked.

    Hand-written because the stdlib file wrappers (GzipFile, BZ2File, ...) accept concatenated
    streams and trailing garbage, and zlib has no file wrapper at all; this one reads exactly one
    stream, bounds every output by max_length, and reports truncation as PersistError.
    """

    def __init__(self, raw: BinaryIO, decomp: Any) -> None:
        self._raw, self._d, self._done, self._raw_eof = raw, decomp, False, False
        self._zlib_style = hasattr(decomp, "unconsumed_tail")

    def _input(self) -> bytes:
        if self._zlib_style:
            data = self._d.unconsumed_tail or self._raw.read(IN_CHUNK)
        elif self._d.needs_input:
            data = self._raw.read(IN_CHUNK)
        else:
            return b""  # the decompressor still holds input; ask it for more output first
        self._raw_eof = not data
        return data

    def readinto(self, buf: memoryview) -> int:
        want, stalls = len(buf), 0
        while want and not self._done:
            data = self._input()
            try:
                out = self._d.decompress(data, want)
            except Exception as exc:  # zlib.error, OSError (bz2), LZMAError, RuntimeError (lz4)
                raise PersistError(f"corrupt compressed stream: {exc}") from exc
            if self._d.eof:
                self._done = True
                if self._d.unused_data or self._raw.read(1):
                    raise PersistError("unexpected data after the end of the compressed stream")
            if out:
                buf[: len(out)] = out
                return len(out)
            if data or self._done:
                continue
            stalls += 1
            starving = self._zlib_style or self._d.needs_input
            if (starving and self._raw_eof) or stalls > 2:
                raise PersistError("compressed stream is truncated")
        return 0

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(memoryview(buf))
        return bytes(buf[:got])


class _ZstdFrameEnd:
    """Pass-through source that follows zstd frame and block headers to see where the frame ends.

    Hand-written because zstandard's stream_reader returns a clean EOF when a frame is cut short
    (e.g. its checksum is missing); tracking the RFC 8878 block layout lets us report that.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw, self._head, self._need, self._skip = raw, b"", 5, 0
        self._checksum = self._last = self.trailing = False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        pos = 0
        while pos < len(data):
            if self._skip:
                step = min(self._skip, len(data) - pos)
                self._skip, pos = self._skip - step, pos + step
            elif self._last:
                self.trailing = True
                break
            else:
                take = self._need - len(self._head)
                self._head, pos = self._head + data[pos : pos + take], pos + take
                if len(self._head) == self._need:
                    self._parse()
        return data

    def _parse(self) -> None:
        head, self._head = self._head, b""
        if self._need == 5:  # magic + frame header descriptor
            fhd = head[4]
            single, fcs_flag = fhd >> 5 & 1, fhd >> 6
            self._checksum = bool(fhd & 4)
            self._skip = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + ((single, 2, 4, 8)[fcs_flag])
            self._need = 3
            return
        value = int.from_bytes(head, "little")  # block header: last, type, size
        self._skip = 1 if (value >> 1) & 3 == 1 else value >> 3
        if value & 1:
            self._last = True
            self._skip += 4 if self._checksum else 0

    @property
    def complete(self) -> bool:
        return self._last and not self._skip


class _ZstdReader:
    def __init__(self, raw: BinaryIO) -> None:
        zstd = _optional("zstandard", "zstandard")
        self._frame, self._error = _ZstdFrameEnd(raw), zstd.ZstdError
        self._reader = zstd.ZstdDecompressor().stream_reader(self._frame, read_size=IN_CHUNK, closefd=False)

    def readinto(self, buf: memoryview) -> int:
        try:
            got = self._reader.readinto(buf)
        except self._error as exc:
            raise PersistError(f"corrupt compressed stream: {exc}") from exc
        if not got and len(buf):
            self._frame.read(1)  # anything after the frame shows up as trailing
            if not self._frame.complete:
                raise PersistError("compressed stream is truncated")
            if self._frame.trailing:
                raise PersistError("unexpected data after the end of the compressed stream")
        return got

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(memoryview(buf))
        return bytes(buf[:got])


def _zstd_compressor(level: int) -> Any:
    zstd = _optional("zstandard", "zstandard")
    return zstd.ZstdCompressor(level=level, write_checksum=True).compressobj()


def _lz4_reader(raw: BinaryIO) -> _BoundedReader:
    return _BoundedReader(raw, _optional("lz4.frame", "lz4").LZ4FrameDecompressor())


@dataclass(frozen=True, slots=True)
class Codec:
    """One compression method."""

    name: str
    extension: str | None
    default_level: int
    levels: range
    compressor: Callable[[int], Any] | None  # level -> object with compress(data)/flush()
    reader: Callable[[BinaryIO], Any] | None  # compressed source -> object with readinto()


CODECS: dict[str, Codec] = {
    c.name: c
    for c in [
        Codec("none", None, 0, range(0, 1), None, None),
        Codec("zlib", ".z", 3, range(0, 10), zlib.compressobj, lambda raw: _BoundedReader(raw, zlib.decompressobj())),
        Codec(
            "gzip",
            ".gz",
            3,
            range(0, 10),
            lambda lvl: zlib.compressobj(lvl, zlib.DEFLATED, 31),
            lambda raw: _BoundedReader(raw, zlib.decompressobj(31)),
        ),
        Codec(
            "bz2", ".bz2", 3, range(1, 10), bz2.BZ2Compressor, lambda raw: _BoundedReader(raw, bz2.BZ2Decompressor())
        ),
        Codec(
            "lzma",
            ".lzma",
            3,
            range(0, 10),
            lambda lvl: lzma.LZMACompressor(format=lzma.FORMAT_ALONE, preset=lvl),
            lambda raw: _BoundedReader(raw, lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)),
        ),
        Codec(
            "xz",
            ".xz",
            3,
            range(0, 10),
            lambda lvl: lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=lvl),
            lambda raw: _BoundedReader(raw, lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
        ),
        Codec("zstd", ".zst", 3, range(-7, 23), _zstd_compressor, _ZstdReader),
        Codec("lz4", ".lz4", 0, range(0, 17), _Lz4Compressor, _lz4_reader),
    ]
}

_MAGICS = [  # (prefix, codec name); order matters only in that exact magics precede zlib's check
    (MAGIC, "none"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"]\x00\x00", "lzma"),
]


def detect(head: bytes) -> Codec:
    """Codec of a file from its first bytes, whatever the file is called."""
    for prefix, name in _MAGICS:
        if head.startswith(prefix):
            return CODECS[name]
    if len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0:
        return CODECS["zlib"]
    if head[:1] == b"\x80" or head[:1] in (b"(", b"c", b"}", b"]"):
        raise PersistError("refusing to load: this looks like a pickle, which is never unpickled")
    raise PersistError(f"not a convert.persist file (unrecognised magic {head[:8]!r})")


def resolve(compress: Any, name: str | None) -> tuple[Codec, int]:
    """Turn dump()'s compress argument (and the target's name) into a codec and level."""
    if compress is None:
        lowered = (name or "").lower()
        for codec in CODECS.values():
            if codec.extension and lowered.endswith(codec.extension):
                return codec, codec.default_level
        return CODECS["none"], 0
    if isinstance(compress, bool):
        return (CODECS["zlib"], 3) if compress else (CODECS["none"], 0)
    if isinstance(compress, int):
        if compress == 0:
            return CODECS["none"], 0
        compress = ("zlib", compress)
    if isinstance(compress, str):
        compress = (compress,)
    if not isinstance(compress, (tuple, list)) or len(compress) not in (1, 2):
        raise ValueError(
            f"compress must be None, a bool, an int level, a codec name or (name, level); got {compress!r}"
        )
    codec = CODECS.get(str(compress[0]).lower())
    if codec is None:
        raise ValueError(f"unknown compression {compress[0]!r}; choose from {sorted(CODECS)}")
    level = compress[1] if len(compress) == 2 else codec.default_level
    if isinstance(level, bool) or not isinstance(level, int) or level not in codec.levels:
        raise ValueError(
            f"{codec.name} level must be an int in [{codec.levels.start}, {codec.levels.stop - 1}], got {level!r}"
        )
    return codec, level
