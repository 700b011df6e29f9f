"""Training reader over a converted dataset: `open_dataset(uri)` -> random access and iteration.

Index i is the i-th successfully converted item in input order. Only the manifest is trusted.
Items are {"image": HxWxC uint8, "label": int, "key": str, <column>: value, ...}; `label` is -1
(NO_LABEL) for an unlabelled item, so batches collate (a DataLoader's default collate refuses
None). The stored columns (caption, list columns, the source digest `sha256`; schema in
`ds.schema`) come as str / int / float / bool, a null as None; `columns=[...]` reads only those.
`ds.column(name)` / `ds.columns()` return whole columns, one read per shard, without image bytes.
Shard handles open lazily and per process (a fork or spawn in a DataLoader worker re-opens them),
so a `Dataset` pickles as just its URI, options and manifest. At most `max_open_shards` shard
readers are open per process (least recently used ones are closed).
Remote HDF5 shards are read through fsspec with a bounded block cache (random access without
downloading whole files); with `download=True`, or for LMDB (which must not live on a network
filesystem), shards are copied into a local cache (convert.shardcache: verified against the
manifest's sha256, shared between processes, bounded by `cache_limit`). `storage_options` may use
${VAR}. `__getitems__` lets a torch DataLoader fetch a whole batch with one `get_batch`.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from .decoders import decode_stored
from .fetch import prefetch
from .formats.base import ShardReader, get_format, open_reader
from .ledger import read_ledger
from .manifest import ManifestError, check_opened, read_manifest
from .parts import PartLayout, check_current, load_parts
from .records import check_regular, read_ledger_columns
from .views import view
from .shardcache import ShardCache
from .specs import COLUMN_TYPES, Column
from .store import Store, is_local, open_store

NO_LABEL = -1  # the label of an unlabelled item
ITER_CHUNK = 256  # items per batched read during iteration
REMOTE_BLOCK = 2**20  # fsspec block size for remote HDF5 random access
REMOTE_BLOCKS = 8  # blocks cached per open remote shard (bounded: max_open_shards x 8 MiB)
MAX_OPEN_SHARDS = 32
T = TypeVar("T")


def default_cache_dir() -> Path:
    return Path(os.environ.get("CONVERT_CACHE_DIR", Path.home() / ".cache" / "convert"))


class Dataset:
    """Map-style dataset of {"image": HxWxC uint8 (or bytes when decode=False), "label": int, "key": str}."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        decode: bool = True,
        download: bool = False,
        cache_limit: int | str | None = None,
        max_open_shards: int = MAX_OPEN_SHARDS,
        columns: Sequence[str] | None = None,
    ) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.decode = decode
        self.download = download
        self.max_open_shards = max(1, max_open_shards)
        store = self._store()
        self.manifest = read_manifest(store)
        index = self.manifest["shards"]  # a columnar ShardIndex: cheap at 10^6 shards
        self.shards = index.select(index.cols["ok"] > 0)
        self._starts = self.shards.starts()
        self._starts_arr = np.asarray(self._starts[:-1], np.int64)
        self.format_name = str(self.manifest["format"])
        self._formats = _formats(index)
        self.layout = PartLayout(load_parts(self.manifest, None, self.uri), store.url())
        self._part_col = self.shards.cols.get("part")
        for part, uri in self.layout.referenced():
            check_current(self._part_store(uri), part, self.uri)
        self.is_local = store.is_local and all(is_local(uri) for _, uri in self.layout.referenced())
        extension = self._formats[0].extension if len(self._formats) == 1 else ".shard"
        self.cache = ShardCache(self.cache_dir, self._fetch_file, extension, cache_limit, url_of=self._url_of)
        self._init_process()
        self._selection: tuple[str, ...] | None = None
        self.schema = self._schema(columns)
        if columns is not None:
            self._selection = tuple(c.name for c in self.schema)
            for reader in self._readers.values():  # a shard opened to find the schema returns every column
                reader.close()
            self._init_process()

    def _init_process(self) -> None:
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self._lock = threading.RLock()  # background iteration threads open shards too
        self._pid = os.getpid()

    # -- pickling: handles are per process ------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_readers", "_lock", "_pid"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process()

    # -- public API -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names")

    def column(self, name: str) -> Any:
        """Column `name` of every item, in index order, without reading image bytes (one read per
        shard): list[str | None] for strings; a NumPy array for numbers, masked where null."""
        col = next((c for c in self.schema if c.name == name), None)
        if col is None:
            raise KeyError(f"{self.uri}: no column {name!r}; columns: {[c.name for c in self.schema]}")
        parts = [self._shard_column(s, col) for s in range(len(self.shards))]
        if col.type == "string":
            return [v for part in parts for v in part]
        if not parts:
            return np.zeros(0, col.type)
        if any(isinstance(p, np.ma.MaskedArray) for p in parts):
            return np.ma.concatenate(parts)
        return np.concatenate(parts)

    def columns(self) -> dict[str, Any]:
        """Every column this dataset reads ({name: ds.column(name)}), without image bytes."""
        return {c.name: self.column(c.name) for c in self.schema}

    def read_counts(self) -> Counter[str]:
        """What this process's open shard readers read ("image" items, "column:<name>" whole
        columns): a diagnostic that shows a column read touched no image."""
        with self._lock:
            return sum((r.reads for r in self._readers.values()), Counter())

    def _shard_column(self, shard: int, col: Column) -> Any:
        reader = self._reader(shard)
        if any(c.name == col.name for c in reader.columns):
            return reader.column(col.name)
        n = len(reader)  # a shard written without this column: nulls
        return [None] * n if col.type == "string" else np.ma.masked_all(n, col.type)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, local = self.locate(index)
        return self._finish(self._reader(shard).get(local), self._part(shard))

    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Items for `indices` (any order, repeats allowed) with one read per shard touched."""
        n = len(self)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for dataset of {n} items: {list(indices)[:10]}")
        shard = np.searchsorted(self._starts_arr, idx, side="right") - 1
        order = np.argsort(shard, kind="stable")
        out: list[dict[str, Any]] = [{}] * idx.size
        for group in np.split(order, np.flatnonzero(np.diff(shard[order])) + 1) if idx.size else ():
            s = int(shard[group[0]])
            items = self._reader(s).get_batch(idx[group] - self._starts[s])
            part = self._part(s)
            for pos, item in zip(group.tolist(), items):
                out[pos] = self._finish(item, part)
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """torch DataLoader's batched fetch (used instead of one __getitem__ per index)."""
        return self.get_batch(indices)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Ordered iteration; the next chunks are read in the background while this one is consumed."""
        chunks = (range(s, min(s + ITER_CHUNK, len(self))) for s in range(0, len(self), ITER_CHUNK))
        return read_ahead(chunks, lambda r: self.get_batch(list(r)))

    def __repr__(self) -> str:  # report helper (issue 13)
        shapes = {"x".join(map(str, s["image_shape"])) if s["image_shape"] else s["encoding"] for s in self.shards}
        names = self.label_names or []
        labels = ", ".join(names[:8]) + (f", ... ({len(names)} labels)" if len(names) > 8 else "")
        return (
            f"Dataset({self.uri!r}, items={len(self)}, shards={len(self.shards)}, format={self.format_name}, "
            f"shape={'/'.join(sorted(shapes)) or '-'}, labels=[{labels}])"
        )

    def ledger(self) -> dict[str, Any]:
        """Every input item with its status and error message (columns); a merged dataset's as it
        shows them (labels remapped, keys prefixed), shard by shard, then its failed shards' rows."""
        if not self.layout.parts:
            return read_ledger(self._store())
        index = self.manifest["shards"]
        cols: dict[str, list[Any]] = {}
        for shard in index:
            found = self.record_ledger(shard)
            if found is None:
                raise ManifestError(f"{self.uri}: the record of shard {shard['name']!r} is missing; rerun merge")
            for k, v in {**found, "shard": [shard["name"]] * len(found["key"])}.items():
                cols.setdefault(k, []).extend(np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
        return cols

    def record_ledger(self, shard: dict[str, Any]) -> dict[str, Any] | None:
        """A shard's ledger columns from its record (in its part's root), as this dataset shows
        them; None if the record is missing or unreadable (convert.records.read_ledger_columns)."""
        part = int(shard.get("part", 0))
        store = self._store_of(shard)
        cols = read_ledger_columns(store, shard["origin"] if self.layout.uris[part] else shard["name"])
        return None if cols is None else self.layout.ledger(cols, part)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, index within the shard) of dataset index `index`."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for dataset of {n} items")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def shard_start(self, shard: int) -> int:
        return self._starts[shard]

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
        self.cache.close()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------
    def _reader(self, shard: int) -> ShardReader:
        if self._pid != os.getpid():  # forked: never share file handles (or a held lock) across processes
            self._init_process()
        with self._lock:  # one download / open per shard even when iteration threads race
            reader = self._readers.get(shard)
            if reader is None:
                reader = self._readers[shard] = self._open_shard(self.shards[shard])
                while len(self._readers) > self.max_open_shards:  # LRU close
                    _, old = self._readers.popitem(last=False)
                    old.close()
            else:
                self._readers.move_to_end(shard)
        return reader

    def _open_shard(self, shard: dict[str, Any]) -> ShardReader:
        """Open now (not lazily): a cached copy evicted by another process between the cache's answer
        and the open is fetched again; once open, the file stays readable even if evicted."""
        for attempt in range(3):
            reader = open_reader(shard["format"], self._source(shard), self._selection)
            try:
                check_opened(self._store_of(shard), shard, reader)  # size, count and the shard's own name
                return reader
            except FileNotFoundError:
                if self.is_local or attempt == 2:
                    raise
            except ManifestError:
                reader.close()
                raise
        raise AssertionError("unreachable")

    def _store(self) -> Store:
        """This process's store (open_store is per process: a forked worker never reuses the parent's s3fs)."""
        return open_store(self.uri, self.storage_options, role="dataset")

    def _part_store(self, uri: str) -> Store:
        return open_store(uri, self.storage_options, role="dataset")

    def _store_of(self, shard: dict[str, Any]) -> Store:
        """The store holding `shard`: this root, or the root of the part it was merged from."""
        uri = self.layout.uris[int(shard.get("part", 0))]
        return self._store() if uri is None else self._part_store(uri)

    def _part(self, shard: int) -> int:
        return 0 if self._part_col is None else int(self._part_col[shard])

    def _locator(self, shard: dict[str, Any]) -> str:
        """What the cache fetches: the shard's path, prefixed '<part>:' when it lives in a part's
        root (paths never hold ':', so the split is unambiguous)."""
        part = int(shard.get("part", 0))
        return f"{part}:{shard['path']}" if self.layout.uris[part] else shard["path"]

    def _unlocate(self, locator: str) -> tuple[Store, str]:
        head, sep, rel = locator.partition(":")
        if not sep:
            return self._store(), locator
        uri = self.layout.uris[int(head)]
        return (self._store() if uri is None else self._part_store(uri)), rel

    def _url_of(self, locator: str) -> str:
        store, rel = self._unlocate(locator)
        return store.url(rel)

    def _source(self, shard: dict[str, Any]) -> Any:
        store = self._store_of(shard)
        local = store.local_path(shard["path"])
        if local is not None:
            check_regular(store, shard["path"])  # a FIFO named by the index would hang the open
            return local
        if get_format(shard["format"]).needs_local_file or self.download:
            return str(self.cache.get({**shard, "path": self._locator(shard)}))
        return store.open(
            shard["path"],
            "rb",
            block_size=REMOTE_BLOCK,
            cache_type="blockcache",
            cache_options={"maxblocks": REMOTE_BLOCKS},
        )

    def _fetch_file(self, locator: str, target: str) -> None:
        """ShardCache's download: the whole object into an existing (reserved) local file."""
        store, rel = self._unlocate(locator)
        with store.open(rel, "rb", block_size=8 * 2**20, cache_type="none") as src:
            with open(target, "r+b") as dst:
                while block := src.read(8 * 2**20):
                    dst.write(block)
                dst.truncate()

    def _schema(self, columns: Sequence[str] | None) -> tuple[Column, ...]:
        """The stored columns (the manifest's, else the first shard's), narrowed to `columns`."""
        listed = self.manifest.get("columns")
        if listed is None and len(self.shards):  # a manifest written before columns were recorded
            stored = self._reader(0).columns
        else:
            ok = isinstance(listed, list | None) and all(
                isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and c[1] in COLUMN_TYPES
                for c in listed or []
            )
            if not ok:
                raise ManifestError(f"{self.uri}: manifest.json's columns are malformed; rerun the conversion")
            stored = tuple(Column(n, t) for n, t in listed or [])
        if columns is None:
            return stored
        by_name = {c.name: c for c in stored}
        unknown = [n for n in columns if n not in by_name]
        if unknown:
            raise ValueError(f"{self.uri}: no column {unknown[0]!r}; its columns are {list(by_name)}")
        return tuple(by_name[n] for n in columns)

    def _finish(self, item: dict[str, Any], part: int = 0) -> dict[str, Any]:
        """Decode (when asked), give unlabelled items NO_LABEL and absent columns None, in place
        (readers return fresh dicts); a merged part's labels remapped and keys prefixed."""
        if self.decode and isinstance(item["image"], (bytes, bytearray, memoryview)):
            item["image"] = decode_image(bytes(item["image"]))
        if part:
            self.layout.finish(item, part)
        elif item["label"] is None:
            item["label"] = NO_LABEL
        for col in self.schema:
            item.setdefault(col.name, None)
        return item


def _formats(index: Any) -> list[Any]:
    """The FormatSpec of every format the index names (a merge of HDF5 and LMDB: both)."""
    try:
        return [get_format(name) for name in sorted(set(index.cols["format"].tolist()))]
    except ValueError as exc:
        raise ManifestError(f"{exc}; rerun the conversion") from None


def read_ahead(reads: Iterable[T], read: Callable[[T], list[Any]], depth: int = 2) -> Iterator[Any]:
    """The items of `read(r)` for each r in order, the next `depth` reads running in the background
    (a read's exception is raised here; closing early joins the threads)."""
    results = prefetch(reads, read, depth=depth)
    try:
        for fetched in results:
            if fetched.error is not None:
                raise fetched.error
            yield from fetched.value
    finally:
        results.close()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> HxWxC uint8 (C=1 for grayscale), upright per EXIF orientation like the write side."""
    return decode_stored(data)


def open_dataset(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    decode: bool = True,
    download: bool = False,
    cache_limit: int | str | None = None,
    columns: Sequence[str] | None = None,
    split: str | None = None,
    filter: str | None = None,  # noqa: A002 - the documented keyword
    seed: int | None = 0,
    stratify: bool = False,
) -> Any:
    """Open a converted dataset (local path or any fsspec URL, e.g. s3://bucket/out/) for training.

    download=True copies remote HDF5 shards whole into `cache_dir` (LMDB shards always are),
    keeping at most `cache_limit` bytes there ('10GB'; None = no limit). `columns`: the stored
    columns to read (None = all, [] = none); the others are never read. `split`
    ("train[:90%]", "[10%:20%]", "[:1000]"; shuffled by `seed` first, None = in order, `stratify`
    by label) and `filter` ("similarity > 0.3 and width >= 256", on columns only) return a
    `convert.views.View` of the dataset instead, without rewriting anything.
    """
    ds = Dataset(
        uri,
        storage_options=storage_options,
        cache_dir=cache_dir,
        decode=decode,
        download=download,
        cache_limit=cache_limit,
        columns=columns,
    )
    return view(ds, split=split, filter=filter, seed=seed, stratify=stratify)
