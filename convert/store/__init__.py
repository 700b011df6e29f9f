"""The storage seam: `open_store(uri, options)` -> a `Store` for a dataset root (local, S3, any fsspec URL).

    store = open_store("s3://bucket/out", {"profile": "x"})
    store.write_bytes("manifest.json", data)          # atomic
    with store.staging("shard-00000", ".h5", run_id) as tmp: ...; store.publish(tmp, rel, size, sha256)

Stores are cached per (process id, uri, options): a forked child (a DataLoader worker, a Dask
nanny's process) never reuses its parent's instance or connection pool (s3fs is not fork-safe).
`${VAR}` / `${secret:id}` references in the options are resolved once, when the store is built.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..backends import missing_backend
from ..secrets import resolve_options
from .base import PARTIAL, SHARDS_DIR, Entry, FsspecStore, Leftover, StorageError, Store, file_digest, first_line, fs_url
from .local import LocalStore, atomic_write

_CACHE: dict[tuple[int, str, str], Store] = {}
_LOCK = threading.Lock()

__all__ = ["PARTIAL", "SHARDS_DIR", "Entry", "FsspecStore", "Leftover", "LocalStore", "StorageError", "Store",
           "atomic_write", "file_digest", "fs_url", "open_store", "preflight"]  # fmt: skip


def _key(options: dict[str, Any] | None) -> str:
    return json.dumps(options or {}, sort_keys=True, default=repr)


def open_store(uri: str, options: dict[str, Any] | None = None, role: str = "output") -> Store:
    """The store rooted at `uri`, built once per process; local paths become absolute."""
    key = (os.getpid(), uri, _key(options))
    store = _CACHE.get(key)
    if store is None:
        with _LOCK:
            store = _CACHE.get(key)
            if store is None:
                store = _CACHE[key] = _build(uri, dict(options or {}), role)
    return store


def _build(uri: str, options: dict[str, Any], role: str) -> Store:
    resolved = resolve_options(options, f"{role}.storage_options")
    try:
        fs, root = fsspec.core.url_to_fs(uri, **resolved)
    except (ImportError, ValueError) as exc:
        if missing := missing_backend(uri):
            raise StorageError(f"{role}.uri {uri}: {missing}") from None
        raise StorageError(f"{role}.uri {uri}: cannot open ({first_line(exc)}); check the URL scheme "
                           f"(pip install the fsspec backend it needs) and {role}.storage_options") from None  # fmt: skip
    if isinstance(fs, LocalFileSystem):
        return LocalStore(uri, options, fs, os.path.abspath(root))
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" in protocols or "s3a" in protocols:
        from .s3 import S3Store

        return S3Store(uri, options, fs, root)
    return FsspecStore(uri, options, fs, root)


def preflight(uri: str, options: dict[str, Any] | None, role: str) -> Store:
    """open_store + Store.preflight(role): one-line StorageError naming the uri and the fix."""
    store = open_store(uri, options, role)
    store.preflight(role)
    return store
