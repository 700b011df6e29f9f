"""On-disk layout of a persisted object (the payload, before any compression).

    preamble   MAGIC(8) | version u16 | flags u16 | crc32(header) u32 | len(header) u64   (little endian)
    header     UTF-8 JSON: {"root": <tagged node tree>, "blocks": [<block spec>...], "data_size": int}
    padding    zeros up to the next multiple of ALIGN
    blocks     raw array bodies, each starting at a multiple of ALIGN (offsets relative to the
               data section), so an uncompressed file can be memory-mapped with aligned arrays.

Everything read from a header is validated here before anything is allocated from it.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import PersistError

MAGIC = b"\x89CVP\r\n\x1a\n"  # PNG-style: high bit and line endings catch text-mode mangling
VERSION = 1
PREAMBLE = struct.Struct("<8sHHIQ")
ALIGN = 64
MAX_HEADER_BYTES = 1 << 30
MAX_NDIM = 32
MAX_ARRAY_BYTES = 1 << 62  # well below numpy's intp overflow limit

# dtype.str forms we accept: byte order, kind (bool, ints, floats, complex, bytes, unicode,
# datetime, timedelta), item size, optional datetime unit. Never "O" (object) or "V" (void).
_DTYPE_RE = re.compile(r"[<>|][biufcSUMm]\d{1,6}(\[\d{0,6}[A-Za-z]{1,2}\])?")
_ALLOWED_KINDS = frozenset("biufcSUMm")


@dataclass(frozen=True, slots=True)
class BlockSpec:
    """Where one array body lives in the data section and how to interpret it."""

    dtype: np.dtype
    shape: tuple[int, ...]
    order: str  # "C" or "F": memory order of the stored bytes
    offset: int  # relative to the start of the data section
    nbytes: int


def align(n: int) -> int:
    """Round n up to a multiple of ALIGN."""
    return -(-n // ALIGN) * ALIGN


def data_start(header_len: int) -> int:
    """Offset of the data section in the payload for a header of header_len bytes."""
    return align(PREAMBLE.size + header_len)


def check_dtype(text: Any) -> np.dtype:
    """Parse a dtype string from a header, refusing anything but fixed-width plain dtypes."""
    if not isinstance(text, str) or not _DTYPE_RE.fullmatch(text):
        raise PersistError(f"dtype {text!r} is not allowed")
    try:
        dtype = np.dtype(text)
    except TypeError as exc:
        raise PersistError(f"invalid dtype {text!r}") from exc
    if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject or dtype.fields or dtype.str != text:
        raise PersistError(f"dtype {text!r} is not allowed")
    return dtype


def array_order(arr: np.ndarray) -> str:
    """Memory order to store arr in: F for Fortran-contiguous (non-C) arrays, else C."""
    return "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"


def layout(arrays: list[np.ndarray]) -> list[BlockSpec]:
    """Assign ALIGN-ed offsets in the data section to each array body."""
    specs, pos = [], 0
    for arr in arrays:
        pos = align(pos)
        specs.append(BlockSpec(arr.dtype, arr.shape, array_order(arr), pos, arr.nbytes))
        pos += arr.nbytes
    return specs


def encode_header(root: Any, specs: list[BlockSpec]) -> bytes:
    """Serialise the node tree and block table (JSON, no NaN literals)."""
    blocks = [
        {"dtype": s.dtype.str, "shape": list(s.shape), "order": s.order, "offset": s.offset, "nbytes": s.nbytes}
        for s in specs
    ]
    end = specs[-1].offset + specs[-1].nbytes if specs else 0
    doc = {"root": root, "blocks": blocks, "data_size": end}
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def pack_preamble(header: bytes) -> bytes:
    """Preamble for a header, followed by the zero padding up to the data section."""
    pre = PREAMBLE.pack(MAGIC, VERSION, 0, zlib.crc32(header), len(header))
    return pre + header + bytes(data_start(len(header)) - len(pre) - len(header))


def parse_preamble(raw: bytes) -> tuple[int, int]:
    """Validate the preamble; return (header length, header crc32)."""
    magic, version, flags, crc, header_len = PREAMBLE.unpack(raw)
    if magic != MAGIC:
        raise PersistError("not a convert.persist file (bad magic number)")
    if version != VERSION or flags != 0:
        raise PersistError(
            f"unsupported format version {version} (flags {flags}); this convert reads version {VERSION}"
        )
    if header_len > MAX_HEADER_BYTES:
        raise PersistError(f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES} limit")
    return header_len, crc


def _reject_constant(name: str) -> Any:
    raise PersistError(f"header contains the non-JSON constant {name}")


def parse_header(raw: bytes | bytearray, crc: int) -> tuple[Any, list[BlockSpec], int]:
    """Check the header's crc and structure; return (root node, block specs, data section size)."""
    if zlib.crc32(raw) != crc:
        raise PersistError("header checksum mismatch (corrupt file)")
    try:
        doc = json.loads(raw.decode("utf-8", "surrogatepass"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PersistError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or set(doc) != {"root", "blocks", "data_size"}:
        raise PersistError("header has the wrong top-level structure")
    if not isinstance(doc["blocks"], list):
        raise PersistError("header block table is not a list")
    specs, pos = [], 0
    for entry in doc["blocks"]:
        spec = _parse_block(entry, align(pos))
        specs.append(spec)
        pos = spec.offset + spec.nbytes
    if doc["data_size"] != pos or type(doc["data_size"]) is not int:
        raise PersistError("header data_size does not match its block table")
    return doc["root"], specs, pos


def _parse_block(entry: Any, expected_offset: int) -> BlockSpec:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "order", "offset", "nbytes"}:
        raise PersistError("malformed block entry in header")
    dtype = check_dtype(entry["dtype"])
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise PersistError(f"invalid array shape {shape!r}")
    count, span = 1, 1
    for dim in shape:
        if type(dim) is not int or dim < 0 or dim > MAX_ARRAY_BYTES:
            raise PersistError(f"invalid array shape {shape!r}")
        count, span = count * dim, span * max(dim, 1)
    if dtype.itemsize == 0 or span * dtype.itemsize > MAX_ARRAY_BYTES:
        raise PersistError(f"array of shape {shape!r} and dtype {dtype.str} is too large")
    if entry["order"] not in ("C", "F"):
        raise PersistError(f"invalid array order {entry['order']!r}")
    if entry["offset"] != expected_offset or type(entry["offset"]) is not int:
        raise PersistError("block offsets in header are inconsistent")
    if entry["nbytes"] != count * dtype.itemsize or type(entry["nbytes"]) is not int:
        raise PersistError("block size in header does not match its shape and dtype")
    return BlockSpec(dtype, tuple(shape), entry["order"], expected_offset, entry["nbytes"])
