"""Columns of a converted dataset for views (convert.views), read without touching image bytes.

`dataset_column(ds, name)`: `ds.column(name)` when the dataset has that column (numbers as arrays,
masked where null; text as a list), else the ledger's columns of the converted items (key, label,
width, height, src_format, src_bytes, digest, uri), read straight from the shard records' columnar
ledgers without per-row objects (`ds.ledger()` when a record is not in the expected form):
sequentially from a local store (decoding holds the GIL: threads only contend; ~0.6 s per 10^6
items), RECORD_THREADS at once from an object store (the requests overlap). A column read once is kept per process and saved (numbers and
plain text, as .npy, loaded without pickle) under `<cache_dir>/columns/<index sha256>-<name>.npy`:
the index digest changes whenever any shard does, so a cached column is never one of another version.
"""

from __future__ import annotations

import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .records import read_ledger_columns
from .store import atomic_write, open_store

RECORD_THREADS = 4  # concurrent shard-record reads for ledger columns
_MEMO: weakref.WeakKeyDictionary[Any, dict[str, np.ndarray]] = weakref.WeakKeyDictionary()  # per process
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][\w.-]{0,100}$")


def dataset_column(ds: Any, name: str) -> np.ndarray:
    """Column `name` of every item of `ds` in index order (memo, then disk cache, then a read)."""
    memo = _MEMO.setdefault(ds, {})
    col = memo.get(name)
    if col is None:
        col = _load_cached(ds, name)
        if col is None:
            col = _read_column(ds, name)
            _save_cached(ds, name, col)
        memo[name] = col
    return col


def _read_column(ds: Any, name: str) -> np.ndarray:
    if hasattr(ds, "column"):
        try:
            col = ds.column(name)  # numbers: an array (masked where null); text: a list (None = null)
        except KeyError:
            pass
        else:
            return col if isinstance(col, np.ndarray) else np.asarray(col, dtype=object)
    cols = _record_columns(ds, name)
    if cols is None:  # not a dataset whose records read as expected: the ledger, with its own errors
        ledger = ds.ledger()
        ok = np.asarray(ledger["status"]) == "ok"
        cols = {k: np.asarray(v)[ok] for k, v in ledger.items() if k not in ("status", "error", "shard")}
    if len(cols.get("label", ())) != len(ds):
        raise ValueError(
            f"{ds.uri}: the ledger lists {len(cols.get('label', ()))} converted items, the dataset {len(ds)}"
        )
    if name not in cols:
        raise ValueError(f"filter: no column {name!r}; columns: {', '.join(sorted(cols))}")
    memo = _MEMO.setdefault(ds, {})
    for other, col in cols.items():  # one ledger read yields every ledger column: keep them all
        if other != name and other not in memo:
            memo[other] = col
            _save_cached(ds, other, col)
    return cols[name]


def _record_columns(ds: Any, name: str) -> dict[str, np.ndarray] | None:
    """The converted items' ledger columns straight from the shard records' columnar ledgers,
    without per-row objects (~0.6 ms per 1000-item record): every numeric column
    and `name`. None when the records are not in the expected form (the caller reads ds.ledger())."""
    manifest, shards = getattr(ds, "manifest", None), getattr(ds, "shards", None)
    if manifest is None or shards is None or not hasattr(ds, "storage_options"):
        return None
    store = open_store(ds.uri, ds.storage_options, role="dataset")
    entries = list(shards)

    def load(shard: dict[str, Any]) -> dict[str, np.ndarray] | None:
        own = getattr(ds, "record_ledger", None)  # a Dataset: a merged one's records live in its parts
        ledger = own(shard) if own else read_ledger_columns(store, shard["name"])  # regular files only, never unpickled
        if ledger is None:
            return None
        status, wanted = ledger["status"], int(shard["ok"])
        if any(len(v) != len(status) for v in ledger.values()):
            return None
        keep = {
            k: v for k, v in ledger.items() if k not in ("status", "error") and (k == name or isinstance(v, np.ndarray))
        }
        if wanted == len(status):  # the common case, every item converted: no mask to build
            return {k: np.asarray(v) for k, v in keep.items()} if list(status).count("ok") == wanted else None
        ok = np.asarray(status) == "ok"
        return {k: np.asarray(v)[ok] for k, v in keep.items()} if int(ok.sum()) == wanted else None

    if store.is_local:  # decoding is the cost and holds the GIL: threads only contend
        parts = list(map(load, entries))
    else:  # an object store: requests overlap
        with ThreadPoolExecutor(RECORD_THREADS) as pool:
            parts = list(pool.map(load, entries))
    if not parts or any(p is None or p.keys() != parts[0].keys() for p in parts):  # type: ignore[union-attr]
        return None
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # type: ignore[index,union-attr]


def _cache_path(ds: Any, name: str) -> Path | None:
    """Where a column of this dataset version is cached locally: <cache_dir>/columns/<index sha256>-<name>.npy
    (the index digest changes whenever any shard does); None when the dataset has no identity."""
    digest = (getattr(ds, "manifest", None) or {}).get("index", {}).get("sha256", "")
    folder = getattr(ds, "cache_dir", None)
    if not digest or folder is None or not _SAFE_NAME.match(name):
        return None
    return Path(folder) / "columns" / f"{digest[:32]}-{name}.npy"


def _load_cached(ds: Any, name: str) -> np.ndarray | None:
    path = _cache_path(ds, name)
    if path is None or not path.exists():
        return None
    try:
        col = np.load(path, allow_pickle=False)  # never unpickle
        mask_path = path.with_suffix(".mask.npy")
        if mask_path.exists():
            col = np.ma.masked_array(col, mask=np.load(mask_path, allow_pickle=False))
    except (OSError, ValueError):
        return None
    return col if len(col) == len(ds) else None


def _save_cached(ds: Any, name: str, col: np.ndarray) -> None:
    """Best effort: numbers and plain text only (text with nulls would need pickles)."""
    path = _cache_path(ds, name)
    if path is None or col.dtype.kind == "O":
        return
    try:
        if isinstance(col, np.ma.MaskedArray):
            with atomic_write(str(path.with_suffix(".mask.npy"))) as f:
                np.save(f, np.ma.getmaskarray(col), allow_pickle=False)
        with atomic_write(str(path)) as f:
            np.save(f, np.ma.getdata(col), allow_pickle=False)
    except OSError:
        pass  # a read-only home: every process reads the columns itself
