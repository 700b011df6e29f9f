"""One single-file LMDB environment per shard.

Layout (format_version 3):
- b"%08d" % b -> block b: the values of consecutive items concatenated, in input order. An item's
  value is its raw pixels (the uint8 buffer; shapes in the metadata) or its encoded image bytes. A
  block is closed once it holds >= 1 MiB, so blocks depend only on the items (deterministic bytes).
  Plain bytes only, never pickles.
- b"__columns__" -> the shard's stored columns as one columnar block (convert.persist, which never
  unpickles): {"values": [list[str] | array per column], "nulls": [bool array or None per column]}.
- b"__meta__" -> JSON: format_version, name, encoding, layout, image_shape, count, attrs, labels,
  keys, columns ([[name, type], ...]), block_starts (first item of each block), offsets (count+1
  byte offsets of the items in the concatenation of all blocks; null for fixed raw pixels, whose
  offsets are i * item bytes), shapes ((H, W, C) per item, variable raw pixels only). A shard
  written without a fixed size whose images all have one shape is stored as fixed. Written by
  close(); a file without it is incomplete. It sorts after every block key.
Version 1 shards (one key per item) are refused with the fix (re-run the conversion); version 2
(variable pixels behind a 12-byte (H, W, C) header) is read.

Why blocks: LMDB stores a value larger than a page in whole 4 KiB overflow pages, and small values
in half-empty leaf pages; one value per item cost 34 % (64x64x3 raw: 12 KiB in 16 KiB) to 58 %
(JPEG) over the payload. 1 MiB blocks waste < 4 KiB each (< 0.5 %). A read is a zero-copy view of
the block in the memory map, sliced.

The writer sizes map_size from the shard (expected_count x per-item estimate + margin) and doubles
it on MapFullError, retrying the transaction. map_size only reserves address space: without
writemap the file grows with the pages actually used.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
from typing import Any, Sequence

import lmdb
import numpy as np

from .. import persist
from ..specs import Column
from .base import LazyShardReader, Sample, ShardInfo, describe_data, normalize_indices, shard_layout
from .columns import StoredColumn, batch_values, check_schema

FORMAT_VERSION = 3
BLOCK_BYTES = 2**20  # a block is closed once it holds at least this many bytes
META_KEY = b"__meta__"
COLUMNS_KEY = b"__columns__"
_HEADER = struct.Struct("<3I")  # (H, W, C) before variable-size raw pixels (format_version 2)
_PAGE = 4096
_UNKNOWN_ITEM_BYTES = 64 * 1024  # per-item guess before the first batch shows real sizes
_MAX_MAP = 1 << 40


def _check_not_v1(source: Any, version: Any) -> None:
    if int(version) < 2:
        raise ValueError(
            f"{source!r}: format_version {version} shards are no longer read; "
            "re-run the conversion into a new output to rewrite them"
        )


def _key(i: int) -> bytes:
    return b"%08d" % i


def _map_size(count: int, item_bytes: int) -> int:
    """Items rounded up to whole pages (+1 page of tree/meta overhead each) plus 1 MiB margin."""
    pages = -(-(item_bytes + 64) // _PAGE) + 1
    return max(count, 1) * pages * _PAGE + (1 << 20)


class LMDBWriter:
    """Writes one shard: items are packed into blocks; one write transaction per full block."""

    sidecars = ("-lock",)  # LMDB's lock file, should an environment ever be opened with locking

    def __init__(self, path: str, info: ShardInfo) -> None:
        check_schema(info.columns)
        self.path = path
        self.info = info
        self.layout = shard_layout(info)
        self.grow_count = 0  # how often MapFullError made the map grow
        self._labels: list[int | None] = []
        self._keys: list[str] = []
        self._shapes: list[tuple[int, ...]] = []  # variable raw pixels: each item's (H, W, C)
        self._values: list[list[Any]] = [[] for _ in info.columns]  # per column: the batches' values
        self._nulls: list[list[np.ndarray]] = [[] for _ in info.columns]
        self._offsets: list[int] = [0]  # byte offset of every item in the concatenated blocks
        self._block_starts: list[int] = []
        self._pending: list[bytes | memoryview] = []  # values of the block being filled
        self._pending_bytes = 0
        item = int(np.prod(info.image_shape)) if self.layout == "fixed" else _UNKNOWN_ITEM_BYTES
        _remove(path)  # like open(path, "w"): never append to a stale file
        # lock=False: this process is the only writer and no reader exists until close();
        # it also means no "-lock" file. sync at close() instead of per transaction.
        # meminit=True: zero unused page bytes, so a shard's bytes (and sha256) are deterministic
        # and never carry stale process memory into the file.
        self._env: lmdb.Environment | None = lmdb.open(
            path,
            subdir=False,
            map_size=_map_size(info.expected_count, item),
            lock=False,
            sync=False,
            metasync=False,
            meminit=True,
            readahead=False,
            max_dbs=0,
        )
        self._sized_from_data = self.layout == "fixed"

    @property
    def map_size(self) -> int:
        return int(self._env.info()["map_size"]) if self._env is not None else 0

    def write_batch(self, samples: Sequence[Sample]) -> None:
        """Append samples in input order; every block that fills up is committed."""
        if self._env is None:
            raise ValueError(f"{self.path}: writer is closed")
        if not samples:
            return
        values = [self._value(s) for s in samples]
        if not self._sized_from_data:  # first batch of variable-size values: size the map from data
            mean = sum(len(v) for v in values) // len(values)
            want = _map_size(self.info.expected_count, mean)
            if want > self.map_size:
                self._env.set_mapsize(want)
            self._sized_from_data = True
        for i, value in enumerate(values, start=len(self._keys)):
            if not self._pending:
                self._block_starts.append(i)
            self._pending.append(bytes(value))
            self._pending_bytes += len(value)
            self._offsets.append(self._offsets[-1] + len(value))
            if self._pending_bytes >= BLOCK_BYTES:
                self._flush_block()
        self._labels.extend(s.label for s in samples)
        self._keys.extend(s.key for s in samples)
        if self.layout == "variable":
            self._shapes.extend(tuple(s.data.shape) for s in samples)  # type: ignore[union-attr]
        for j, (values, nulls) in enumerate(batch_values(self.info.columns, samples)):
            self._values[j].append(values)
            self._nulls[j].append(nulls)

    def _flush_block(self) -> None:
        if not self._pending:
            return
        if len(self._block_starts) > 10**8:  # pragma: no cover - 100 TB
            raise ValueError("an LMDB shard holds at most 10**8 blocks (8-digit keys)")
        block = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._commit([(_key(len(self._block_starts) - 1), block)], append=True)

    def _value(self, s: Sample) -> bytes | memoryview:
        data = s.data
        if self.layout == "encoded":
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{s.key!r}: expected encoded bytes, got {type(data).__name__}")
            return data
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 3:
            raise ValueError(f"{s.key!r}: expected uint8 pixels (H, W, C), got {describe_data(data)}")
        if self.layout == "fixed":
            if data.shape != tuple(self.info.image_shape or ()):
                raise ValueError(f"{s.key!r}: expected shape {self.info.image_shape}, got {data.shape}")
        return memoryview(np.ascontiguousarray(data).reshape(-1))

    def _commit(self, items: list[tuple[bytes, Any]], append: bool) -> None:
        env = self._env
        assert env is not None
        while True:
            try:
                with env.begin(write=True) as txn:  # aborted on any exception
                    for key, value in items:
                        txn.put(key, value, append=append)
                return
            except lmdb.MapFullError:
                size = self.map_size * 2
                if size > _MAX_MAP:
                    raise
                env.set_mapsize(size)
                self.grow_count += 1

    def close(self) -> None:
        """Write the metadata, sync, close; the file is a complete single-file shard. Idempotent."""
        if self._env is None:
            return
        self._flush_block()
        layout, shape = self.layout, list(self.info.image_shape) if self.info.image_shape else None
        if layout == "variable" and self._shapes and len(set(self._shapes)) == 1:
            layout, shape = "fixed", list(self._shapes[0])  # one shape: the fixed layout, no per-item table
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.info.name,
            "encoding": self.info.encoding,
            "layout": layout,
            "image_shape": shape,
            "count": len(self._keys),
            "attrs": self.info.attrs,
            "labels": self._labels,
            "keys": self._keys,
            "columns": [[c.name, c.type] for c in self.info.columns],
            "block_starts": self._block_starts,
            "offsets": None if layout == "fixed" else self._offsets,
            "shapes": [list(s) for s in self._shapes] if layout == "variable" else None,
        }
        items = [(META_KEY, json.dumps(meta, ensure_ascii=False).encode())]
        if self.info.columns:
            items.insert(0, (COLUMNS_KEY, self._column_block()))
        self._commit(items, append=False)
        self._env.sync(True)
        self._env.close()
        self._env = None
        _remove(self.path + "-lock")

    def _column_block(self) -> bytes:
        """Every column of the shard as one persist blob: values (nulls filled) and null masks."""
        values: list[Any] = []
        nulls: list[Any] = []
        for col, parts, masks in zip(self.info.columns, self._values, self._nulls):
            if col.type == "string":
                values.append([v for part in parts for v in part])
            else:
                values.append(np.concatenate(parts) if parts else np.zeros(0, dtype=col.type))
            mask = np.concatenate(masks) if masks else np.zeros(0, np.bool_)
            nulls.append(mask if mask.any() else None)
        buf = io.BytesIO()
        persist.dump({"values": values, "nulls": nulls}, buf, compress=False)
        return buf.getvalue()

    def abort(self) -> None:
        """Close without completing and delete the file."""
        if self._env is not None:
            try:
                self._env.close()
            finally:
                self._env = None
        _remove(self.path)
        _remove(self.path + "-lock")

    def __enter__(self) -> "LMDBWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.abort() if exc_type is not None else self.close()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# py-lmdb refuses to open one file twice in a process, so readers of the same shard share one
# read-only environment (reference counted). A forked child inherits the parent's environments:
# they are closed in the child (never used there) and re-opened on demand.
_envs_lock = threading.Lock()
_envs: dict[tuple[int, int], list[Any]] = {}  # (st_dev, st_ino) -> [Environment, refcount]


def _after_fork_in_child() -> None:
    global _envs_lock
    _envs_lock = threading.Lock()  # another thread may have held it at fork time
    for env, _ in _envs.values():
        env.close()  # the child's copy of the handle only; the parent's stays open
    _envs.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _acquire(path: str) -> tuple[tuple[int, int], lmdb.Environment]:
    st = os.stat(path)  # FileNotFoundError for a missing shard
    key = (st.st_dev, st.st_ino)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            # lock=False + readonly: no lock file, no reader table (the shard is immutable);
            # readahead=False suits random access by training loaders
            env = lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False, max_dbs=0)
            entry = _envs[key] = [env, 0]
        entry[1] += 1
        return key, entry[0]


def _release(key: tuple[int, int]) -> None:
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _envs[key]
            entry[0].close()


_Handle = tuple[tuple[int, int], lmdb.Environment]  # (_envs key, shared environment)


class LMDBReader(LazyShardReader[_Handle]):
    """Reads one shard from a local path. Opens lazily, re-opens after fork; pickles as its path."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str] | None = None) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError("LMDB shards are read from a local path (copy remote shards first)")
        super().__init__(os.fspath(path), columns)

    def _open(self) -> _Handle:
        key, env = _acquire(self._source)
        try:
            with env.begin() as txn:
                raw = txn.get(META_KEY)
            if raw is None:
                raise ValueError(f"{self._source!r}: incomplete LMDB shard (no {META_KEY!r})")
            self._load_meta(json.loads(raw))
        except BaseException:
            _release(key)
            raise
        return key, env

    def _close(self, handle: _Handle) -> None:
        _release(handle[0])

    def _load_meta(self, meta: dict[str, Any]) -> None:
        self._check_version(meta["format_version"], FORMAT_VERSION)
        _check_not_v1(self._source, meta["format_version"])
        self._encoding = str(meta["encoding"])
        self._layout = str(meta["layout"])
        self._image_shape = tuple(meta["image_shape"]) if meta["image_shape"] else None  # type: ignore[assignment]
        self._count = int(meta["count"])
        self._attrs = meta["attrs"]
        self._labels = meta["labels"]
        self._keys = meta["keys"]
        self._version = int(meta["format_version"])
        self._schema = tuple(Column(str(n), str(t)) for n, t in meta.get("columns") or [])
        self._shapes = meta.get("shapes")
        self._block_starts = np.asarray(meta["block_starts"], np.int64)
        if meta["offsets"] is None:  # fixed raw pixels
            self._offsets = np.arange(self._count + 1, dtype=np.int64) * int(np.prod(self._image_shape))
        else:
            self._offsets = np.asarray(meta["offsets"], np.int64)

    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Samples at `indices` (any order, duplicates allowed) in one read transaction."""
        env = self._opened()[1]
        idx = normalize_indices(indices, self._count)
        self.reads["image"] += idx.size
        out = []
        with env.begin(buffers=True) as txn:  # values are views into the map: copy before the txn ends
            blocks = np.searchsorted(self._block_starts, idx, side="right") - 1
            views: dict[int, memoryview] = {}
            for i, b in zip(idx.tolist(), blocks.tolist()):
                view = views.get(b)
                if view is None:
                    view = views[b] = self._get(txn, _key(b), i)
                base = int(self._offsets[self._block_starts[b]])
                out.append(
                    self._row(i, self._image(view[int(self._offsets[i]) - base : int(self._offsets[i + 1]) - base], i))
                )
        return out

    def _read_columns(self, handle: _Handle, name: str) -> list[StoredColumn]:
        """Every selected column, from the shard's one columnar block (one read)."""
        with handle[1].begin() as txn:
            raw = txn.get(COLUMNS_KEY)
        if raw is None:
            raise KeyError(f"{self._source!r}: no {COLUMNS_KEY!r} block (corrupt shard)")
        try:
            block = persist.load(io.BytesIO(raw))
            pairs = list(zip(block["values"], block["nulls"], strict=True))
        except (persist.PersistError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self._source!r}: unreadable column block ({exc}); rerun the conversion") from None
        wanted = {c.name for c in self.columns}
        return [
            StoredColumn(c, values, nulls)
            for c, (values, nulls) in zip(self._schema, pairs)
            if c.name in wanted and c.name not in self._loaded
        ]

    def _get(self, txn: lmdb.Transaction, key: bytes, i: int) -> memoryview:
        buf = txn.get(key)
        if buf is None:
            raise KeyError(f"{self._source!r}: item {i} missing (corrupt shard)")
        return buf

    def _image(self, buf: memoryview, i: int) -> np.ndarray | bytes:
        if self._layout == "encoded":
            return bytes(buf)
        if self._layout == "fixed":
            return np.frombuffer(buf, np.uint8).reshape(self._image_shape).copy()  # type: ignore[arg-type]
        if self._version >= 3:
            return np.frombuffer(buf, np.uint8).reshape(self._shapes[i]).copy()  # type: ignore[index]
        shape = _HEADER.unpack_from(buf)
        return np.frombuffer(buf, np.uint8, offset=_HEADER.size).reshape(shape).copy()
