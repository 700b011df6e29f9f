"""Writer/reader interface per output format, and a registry that imports backends lazily.

A writer writes ONE shard to a LOCAL path (the store then publishes it); it receives samples in
batches and never sees the network. A reader opens one committed shard (a local path, or for
formats that support it a seekable binary file object) and returns samples by index.

A format owns its options and files: its config section (`output.<format>.*`, validated by the
pydantic model its `FormatSpec.options` names), the sidecar files its writer may leave beside the
shard (a `sidecars` class attribute on the writer, e.g. LMDB's "-lock"), and its shape on disk
(`FormatSpec.directory`: one file, or a directory the store publishes whole). The CLI and config
read the format names from FORMATS. Adding a format = one module + one FORMATS entry.
"""

from __future__ import annotations

import importlib
import os
import threading
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Generic, Literal, Protocol, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..specs import Column
from .columns import StoredColumn


@dataclass(frozen=True, slots=True)
class Sample:
    """One converted image on its way into a shard.

    `data` is a uint8 array (H, W, C) when the shard stores raw pixels, or the encoded image bytes
    when it stores an encoding ("original", "jpeg", "png", "webp").
    """

    key: str
    label: int | None
    data: np.ndarray | bytes
    columns: tuple[Any, ...] = ()  # values of ShardInfo.columns, in order (None = null)


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
    # The shard's kept columns (caption, list columns, the source-bytes digest), stored columnar
    # per shard beside the images; Sample.columns holds each sample's values in this order.
    columns: tuple[Column, ...] = ()
    # The format's whole validated section (`output.<format>.*`), decided on the client.
    options: dict[str, Any] = field(default_factory=dict)


def shard_layout(info: ShardInfo) -> str:
    """ "encoded" (bytes per item), "fixed" (one H, W, C for the shard) or "variable" (raw, any shape)."""
    if info.encoding != "raw":
        return "encoded"
    return "fixed" if info.image_shape is not None else "variable"


def describe_data(data: Any) -> str:
    """Short description of a sample's data for error messages."""
    if isinstance(data, np.ndarray):
        return f"array {data.dtype} {data.shape}"
    return type(data).__name__


class ShardWriter(Protocol):
    def write_batch(self, samples: Sequence[Sample]) -> None: ...
    def close(self) -> None: ...  # flush and close; the file is complete after this
    def abort(self) -> None: ...  # close and delete what was written


class ShardReader(Protocol):
    encoding: str
    image_shape: tuple[int, int, int] | None
    columns: tuple[Column, ...]  # the stored columns this reader returns (its selection)
    reads: Counter[str]  # what it read: "image" items, "column:<name>" whole columns

    def __len__(self) -> int: ...
    # {"image": ndarray|bytes, "label": int|None, "key": str, <column>: value or None, ...}
    def get(self, i: int) -> dict[str, Any]: ...
    def column(self, name: str) -> Any: ...  # list[str | None] | np.ndarray, without image bytes
    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]: ...
    def attrs(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: Any) -> None: ...


H = TypeVar("H")  # a reader's open handle (h5py.File, LMDB environment, ...)
R = TypeVar("R", bound="LazyShardReader[Any]")


class LazyShardReader(ABC, Generic[H]):
    """The part of a ShardReader every backend shares: open lazily, once per process.

    The handle is opened (and the metadata loaded) on first access by `_open()`, and again after a
    fork: the process id is checked on each access, and the child never uses the parent's handle.
    Threads sharing a reader open it once. The reader pickles as its source only.

    `columns` selects the stored columns this reader returns (None = all, () = none): the
    others are never read. A column is read whole, once, on first use (`_read_columns`), and
    never touches image bytes; `reads` counts what was read ("image" items, "column:<name>").

    `_open()` sets the metadata below; `get_batch`, `_read_columns` and `_close()` are the backend's.
    """

    _encoding: str
    _layout: str  # "fixed" | "variable" | "encoded"
    _image_shape: tuple[int, int, int] | None
    _count: int
    _attrs: dict[str, Any]
    _labels: list[int | None]
    _keys: list[str]
    _schema: tuple[Column, ...] = ()  # every column the shard stores, in order (set by _open)

    def __init__(self, source: str | os.PathLike[str] | BinaryIO, columns: Sequence[str] | None = None) -> None:
        self._source = os.fspath(source) if isinstance(source, os.PathLike) else source
        self._select = None if columns is None else tuple(columns)
        self._handle: H | None = None
        self._pid = -1
        self._open_lock, self._lock_pid = threading.Lock(), os.getpid()
        self._loaded: dict[str, StoredColumn] = {}
        self._cells: list[tuple[str, list[Any], list[bool] | None]] | None = None
        self.reads: Counter[str] = Counter()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._source, self._select))

    @abstractmethod
    def _open(self) -> H:
        """Open the shard and load its metadata; on failure close what was opened and raise."""

    @abstractmethod
    def _close(self, handle: H) -> None:
        """Close a handle this process opened."""

    def _opened(self) -> H:
        """The handle for this process, opened on first use."""
        pid = os.getpid()
        if self._handle is not None and self._pid == pid:
            return self._handle
        if self._lock_pid != pid:  # forked: another thread may have held the lock at fork time
            self._open_lock, self._lock_pid = threading.Lock(), pid
        with self._open_lock:
            if self._handle is None or self._pid != pid:
                self._handle, self._pid = self._open(), pid
        return self._handle  # type: ignore[return-value]

    @property
    def encoding(self) -> str:
        self._opened()
        return self._encoding

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        self._opened()
        return self._image_shape

    def __len__(self) -> int:
        self._opened()
        return self._count

    def attrs(self) -> dict[str, Any]:
        """ShardInfo.attrs as written."""
        self._opened()
        return dict(self._attrs)

    @property
    def columns(self) -> tuple[Column, ...]:
        """The stored columns this reader returns: the shard's, in the selection's order if any."""
        self._opened()
        if self._select is None:
            return self._schema
        by_name = {c.name: c for c in self._schema}
        return tuple(by_name[n] for n in self._select if n in by_name)

    def column(self, name: str) -> Any:
        """The whole column: list[str | None] for strings, a NumPy array for numbers (a masked
        array when the shard holds nulls). Reads no image bytes; KeyError for another name."""
        return self._stored(name).whole()

    def _stored(self, name: str) -> StoredColumn:
        found = self._loaded.get(name)
        if found is not None:
            return found
        wanted = {c.name for c in self.columns}
        if name not in wanted:
            raise KeyError(f"{self._source!r} has no column {name!r} (columns: {sorted(wanted)})")
        handle = self._opened()
        with self._open_lock:
            if name not in self._loaded:
                for col in self._read_columns(handle, name):
                    self._loaded[col.column.name] = col.check(self._count, repr(self._source))
                    self.reads[f"column:{col.column.name}"] += 1
        return self._loaded[name]

    def _read_columns(self, handle: H, name: str) -> list[StoredColumn]:
        """Read column `name` whole (a backend that stores columns in one block returns every
        selected column it had to read); called once per column, under `_open_lock`. A format
        that stores no columns keeps `_schema` empty and never gets here."""
        raise KeyError(name)

    def get(self, i: int) -> dict[str, Any]:
        return self.get_batch([i])[0]

    @abstractmethod
    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]: ...

    def _row(self, i: int, image: np.ndarray | bytes) -> dict[str, Any]:
        row = {"image": image, "label": self._labels[i], "key": self._keys[i]}
        cells = self._cells
        if cells is None:  # the selected columns as Python lists, once per reader
            cells = self._cells = [(c.name, *self._stored(c.name).cells()) for c in self.columns]
        for name, values, nulls in cells:
            row[name] = None if nulls is not None and nulls[i] else values[i]
        return row

    def _check_version(self, version: Any, supported: int) -> None:
        if int(version) > supported:
            raise ValueError(f"{self._source!r}: format_version {version} is newer than this reader")

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._close(self._handle)
        self._handle = None

    def __enter__(self: R) -> R:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def normalize_indices(indices: Sequence[int], count: int) -> np.ndarray:
    """`indices` as a flat int64 array with negatives counted from the end; IndexError when out of range."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    idx = np.where(idx < 0, idx + count, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= count):
        raise IndexError(f"index out of range for a shard of {count} images: {list(indices)[:10]}")
    return idx


class FormatOptions(BaseModel):
    """A format's own config section (`output.<format>`); no options by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compression: str = "none"  # every format reports these two: they are part of wave-1 fingerprints
    compression_level: int = 4


class HDF5Options(FormatOptions):
    compression: Literal["none", "gzip", "lzf"] = "none"
    compression_level: int = Field(4, ge=0, le=9)


class LMDBOptions(FormatOptions):
    compression: Literal["none"] = "none"


@dataclass(frozen=True)
class FormatSpec:
    name: str
    extension: str  # ".h5", ".lmdb"
    module: str  # imported lazily
    writer: str  # attribute names in that module
    reader: str
    needs_local_file: bool  # reader must have a local path (LMDB) vs any seekable file (HDF5)
    options: type[FormatOptions] = FormatOptions  # validates `output.<name>.*`
    directory: bool = False  # the shard is a directory (e.g. a Zarr group), published whole

    @property
    def sidecars(self) -> tuple[str, ...]:
        """Suffixes of files the writer may leave beside the shard (removed after publishing)."""
        return tuple(getattr(_attr(self, self.writer), "sidecars", ()))

    def validate_options(self, section: dict[str, Any]) -> dict[str, Any]:
        """The section validated by this format (defaults filled); ValueError naming the key."""
        from pydantic import ValidationError

        try:
            return self.options.model_validate(section).model_dump()
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            allowed = ", ".join(self.options.model_fields)
            raise ValueError(f"output.{self.name}.{key}: {err['msg']} (options of {self.name}: {allowed})") from None


FORMATS: dict[str, FormatSpec] = {
    "hdf5": FormatSpec("hdf5", ".h5", "convert.formats.hdf5", "HDF5Writer", "HDF5Reader", False, HDF5Options),
    "lmdb": FormatSpec("lmdb", ".lmdb", "convert.formats.lmdb", "LMDBWriter", "LMDBReader", True, LMDBOptions),
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


def open_reader(format_name: str, source: str | BinaryIO, columns: Sequence[str] | None = None) -> ShardReader:
    """Open one committed shard for reading (local path, or a seekable file object for HDF5);
    `columns`: the stored columns to return (None = all, () = none; others are never read)."""
    spec = get_format(format_name)
    return _attr(spec, spec.reader)(source, columns)
