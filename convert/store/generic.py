"""`FsspecStore`: the Store operations on any fsspec filesystem (memory://, gs://, az://, ...).

`LocalStore` and `S3Store` build on it and override what their backend does better (rename,
O_EXCL and flock, checksummed multipart upload, If-Match / If-None-Match), saying so in their
capability flags. A generic filesystem has no conditional writes, so it cannot hold a lease.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, BinaryIO, Iterator

import fsspec

from .base import (
    Entry,
    Guard,
    PreconditionFailed,
    RangeStream,
    StorageError,
    Store,
    entry_of,
    guard_refused,
    is_local,
    reopen,
)

_NO_CAS = "this store cannot write objects conditionally, so two runs could write one output at once"


class _FileRange:
    """open_range on a seekable file object: the entry from info(), bytes up to `end`."""

    def __init__(self, f: Any, entry: Entry, start: int, end: int | None) -> None:
        self._f, self.entry, self.first = f, entry, start
        self._remaining = max(0, (entry.size if end is None else min(end, entry.size)) - start)
        if self._remaining:
            f.seek(start)

    def read(self, n: int) -> bytes:
        if self._remaining <= 0:
            return b""
        data = self._f.read(min(n, self._remaining))
        if not data:
            raise OSError(f"object ended {self._remaining} bytes short")
        self._remaining -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


class FsspecStore(Store):
    """Any fsspec filesystem: the base behaviour, no extras."""

    def __init__(self, uri: str, options: dict[str, Any], fs: fsspec.AbstractFileSystem, root: str) -> None:
        super().__init__(uri, options)
        self._fs, self._pid = fs, os.getpid()
        self.root = root.rstrip("/") or root

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem (for the source listers' globbing); rebuilt in a forked child
        (s3fs's session must not cross a fork)."""
        if self._pid != os.getpid():
            fresh = reopen(self.uri, self.storage_options)
            self._fs, self._pid = fresh.fs if isinstance(fresh, FsspecStore) else self._fs, os.getpid()
        return self._fs

    # -- naming ---------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Backend path (no protocol) of `rel` under the root."""
        if not rel:
            return self.root
        return f"{self.root}{rel}" if self.root.endswith("/") else f"{self.root}/{rel}"

    def url(self, rel: str = "") -> str:
        return self.fs.unstrip_protocol(self.path(rel))

    # -- reading --------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    def open_range(
        self, rel: str, start: int = 0, end: int | None = None, match: str | None = None, timeout: float | None = None
    ) -> RangeStream:
        entry = self.info(rel)
        if match is not None and entry.token != match:
            raise PreconditionFailed(f"{self.url(rel)} changed (was {match}, now {entry.token})")
        return _FileRange(self.fs.open(self.path(rel), "rb", cache_type="none"), entry, start, end)

    def open(self, rel: str, mode: str = "rb", **kwargs: Any) -> BinaryIO:
        """An fsspec file object; its size comes from the store, not a stale listing."""
        self.fs.invalidate_cache(self.path(rel))
        return self.fs.open(self.path(rel), mode, **kwargs)

    def get_file(self, rel: str, local_path: str) -> None:
        self.fs.get_file(self.path(rel), local_path)

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self.path(rel))  # object stores: never answer from a stale listing
        return self.fs.exists(self.path(rel))

    def info(self, rel: str) -> Entry:
        self.fs.invalidate_cache(self.path(rel))
        return entry_of(rel, self.fs.info(self.path(rel)))

    def list(self, rel_dir: str) -> Iterator[Entry]:
        self.fs.invalidate_cache(self.path(rel_dir))
        try:
            found = self.fs.ls(self.path(rel_dir), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return
        for d in found:
            yield entry_of(_join(rel_dir, d["name"].rstrip("/").rsplit("/", 1)[-1]), d)

    def walk(self, rel_dir: str) -> Iterator[Entry]:
        self.fs.invalidate_cache(self.path(rel_dir))
        base = self.path(rel_dir)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return
        for path, d in sorted(found.items()):
            yield entry_of(_join(rel_dir, path[len(base) :].lstrip("/")), d)

    # -- identity ------------------------------------------------------------------------
    def identity(self, rel: str) -> dict[str, Any]:
        entry = self.info(rel)
        return {"size": entry.size, "etag": entry.etag, "edges": self._edges(rel, entry.size)}

    def same_object(self, rel: str, recorded: dict[str, Any], entry: Entry) -> bool:
        if entry.size != recorded.get("size") or (recorded.get("etag") and entry.etag != recorded["etag"]):
            return False
        return self._edges(rel, entry.size) == recorded.get("edges")

    # -- writing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, rel: str) -> Iterator[BinaryIO]:
        """Spooled locally and sent in one put when complete: generic backends do not all honour
        fsspec's autocommit=False (memory:// writes through)."""
        with tempfile.SpooledTemporaryFile(max_size=8 * 2**20) as spool:
            yield spool  # type: ignore[misc]
            spool.seek(0)
            with self.fs.open(self.path(rel), "wb") as f:
                shutil.copyfileobj(spool, f, 2**20)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(rel), data)

    def publish(self, tmp: str, rel: str, size: int, sha256: str | None = None, guard: Guard | None = None) -> None:
        """fs.put, then the stored size is checked. A guard is only checked (no atomicity here)."""
        if guard is not None and not guard.holds(self.read_bytes(guard.rel)):
            raise guard_refused(self, rel, guard)
        self.fs.put(tmp, self.path(rel), recursive=os.path.isdir(tmp))
        self._check_size(rel, size)

    def _check_size(self, rel: str, size: int) -> None:
        self.fs.invalidate_cache(self.path(rel))
        path = self.path(rel)
        stored = self.fs.du(path) if self.fs.isdir(path) else self.fs.info(path)["size"]
        if stored != size:
            raise OSError(f"upload of {self.url(rel)} incomplete: {stored} of {size} bytes")

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        raise StorageError(f"{self.url(rel)}: {_NO_CAS}; use a local path or S3 for the output")

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        raise StorageError(f"{self.url(rel)}: {_NO_CAS}; use a local path or S3 for the output")

    def replace_if(self, rel: str, data: bytes, token: str) -> str | None:
        raise StorageError(f"{self.url(rel)}: {_NO_CAS}; use a local path or S3 for the output")

    def delete_if(self, rel: str, token: str) -> bool:
        raise StorageError(f"{self.url(rel)}: {_NO_CAS}; use a local path or S3 for the output")

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))
        self.fs.invalidate_cache(self.path(rel))

    def delete_tree(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)
        self.fs.invalidate_cache(self.path(rel))


def _join(rel_dir: str, name: str) -> str:
    rel_dir = rel_dir.rstrip("/")
    return f"{rel_dir}/{name}" if rel_dir else name


def fs_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """URL of a backend path: the plain path for local files (the is_local rule), else protocol://path."""
    url = fs.unstrip_protocol(path)
    return path if is_local(url) else url
