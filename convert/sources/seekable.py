"""The zstd seekable format's frame index: where a shard task may start decompressing a .zst list.

A zstd stream cannot be entered in the middle, but a file in the seekable format (zstd's
contrib/seekable_format, written by `t2sz`, `zstd-seekable` and others) is a run of independent
frames followed by a skippable frame holding their sizes. With it, a shard task of a compressed
text list decompresses from the frame holding its first byte instead of from the file's start.
Any other .zst file (one frame, or frames without an index) is read from its start.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

SEEKABLE_MAGIC = 0x8F92EAB1
SKIPPABLE_MAGIC = 0x184D2A5E
_FOOTER = 9  # Number_Of_Frames u32, Seek_Table_Descriptor u8, Seekable_Magic_Number u32
_MAX_FRAMES = 1 << 24


def frame_start(raw: Any, size: int, target: int) -> tuple[int, int] | None:
    """(compressed offset, decompressed offset) of the frame holding decompressed byte `target`,
    from the file's seek table; None when there is none or it does not describe this file."""
    if size < _FOOTER + 8:
        return None
    raw.seek(size - _FOOTER)
    frames, descriptor, magic = struct.unpack("<IBI", raw.read(_FOOTER))
    entry = 12 if descriptor & 0x80 else 8  # with a checksum per frame
    table = frames * entry
    if magic != SEEKABLE_MAGIC or not 0 < frames <= _MAX_FRAMES or table + _FOOTER + 8 > size:
        return None
    raw.seek(size - _FOOTER - table - 8)
    block = raw.read(table + 8)
    head, length = struct.unpack_from("<II", block)
    if head != SKIPPABLE_MAGIC or length != table + _FOOTER or len(block) != table + 8:
        return None
    sizes = np.frombuffer(block, dtype="<u4", offset=8).reshape(frames, entry // 4)[:, :2].astype(np.int64)
    compressed, decompressed = np.cumsum(sizes[:, 0]), np.cumsum(sizes[:, 1])
    if int(compressed[-1]) != size - table - _FOOTER - 8:  # the frames must fill the file before the table
        return None
    i = int(np.searchsorted(decompressed, target, side="right"))
    if i >= frames:
        return None
    return (int(compressed[i - 1]), int(decompressed[i - 1])) if i else (0, 0)
