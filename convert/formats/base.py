"""Writer/reader interface per output format, and a registry that imports backends lazily.

A writer writes ONE shard to a LOCAL path (the commit stage moves/uploads it); it receives
samples in batches and never sees the network. A reader opens one committed shard (a local path,
or for formats that support it a seekable binary file object) and returns samples by index.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class Sample:
    """One converted image on its way into a shard.

    `data` is a uint8 array (H, W, C) when the shard stores raw pixels, or the encoded image bytes
    when it stores an encoding ("original", "jpeg", "png", "webp").
    """

    key: str
    label: int | None
    data: np.ndarray | bytes


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """What a writer needs to know up front, recorded inside the shard as attributes."""

    name: str
    encoding: str  # "raw" or an encoding name
    image_shape: tuple[int, int, int] | None  # fixed (H, W, C) for raw pixels; None = variable
    expected_count: int  # items in the spec (an upper bound on samples)
    attrs: dict[str, Any]  # JSON-able: shard config etc. (never secrets)
    compression: str = "none"  # "none" | "gzip" | "lzf" (HDF5)
    compression_level: int = 4


class ShardWriter(Protocol):
    def write_batch(self, samples: Sequence[Sample]) -> None: ...
    def close(self) -> None: ...  # flush and close; the file is complete after this
    def abort(self) -> None: ...  # close and delete what was written


class ShardReader(Protocol):
    encoding: str
    image_shape: tuple[int, int, int] | None

    def __len__(self) -> int: ...
    def get(self, i: int) -> dict[str, Any]: ...  # {"image": ndarray|bytes, "label": int|None, "key": str}
    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]: ...
    def attrs(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class FormatSpec:
    name: str
    extension: str  # ".h5", ".lmdb"
    module: str  # imported lazily
    writer: str  # attribute names in that module
    reader: str
    needs_local_file: bool  # reader must have a local path (LMDB) vs any seekable file (HDF5)


FORMATS: dict[str, FormatSpec] = {
    "hdf5": FormatSpec("hdf5", ".h5", "convert.formats.hdf5", "HDF5Writer", "HDF5Reader", False),
    "lmdb": FormatSpec("lmdb", ".lmdb", "convert.formats.lmdb", "LMDBWriter", "LMDBReader", True),
}


def get_format(name: str) -> FormatSpec:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; expected one of {sorted(FORMATS)}") from None


def _attr(spec: FormatSpec, attr: str) -> Any:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:  # optional backend missing: say what to install
        raise ImportError(f"format {spec.name!r} needs {exc.name!r}: pip install {exc.name}") from exc
    return getattr(module, attr)


def open_writer(format_name: str, path: str, info: ShardInfo) -> ShardWriter:
    """Create a writer for one shard at a local `path`."""
    spec = get_format(format_name)
    return _attr(spec, spec.writer)(path, info)


def open_reader(format_name: str, source: str | BinaryIO) -> ShardReader:
    """Open one committed shard for reading (local path, or a seekable file object for HDF5)."""
    spec = get_format(format_name)
    return _attr(spec, spec.reader)(source)
