"""The `Store` contract: the storage operations a dataset root offers, and nothing else.

A store is rooted at one URI and addresses objects by '/'-separated paths relative to that root.
The abstract methods below are the whole surface (read, ranged read, streamed range, atomic
write, publish, conditional create and replace, listing with identity, delete, identity);
capability flags say what a backend guarantees. Shard names, staging names and run debris are
policy of the modules that own them (`convert.records`, `convert.lease`), not of the store.
`convert.testing.StoreTests` is the contract suite any implementation must pass.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, ContextManager, Iterable, Iterator, Protocol

from ..config import ConfigError

PARTIAL = ".partial"  # suffix of every temporary object a store (or a writer staging into it) creates
EDGE_BLOCK = 64 * 2**10  # bytes hashed at each end of a file for the cheap identity check
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # 2+ chars, so "C:\\x" stays a path


class StorageError(ConfigError):
    """The output/source store cannot be used as configured (missing bucket, refused credentials)."""


class PreconditionFailed(OSError):
    """A conditional request found the object changed (S3 412, a local compare that failed)."""


def scheme_of(uri: str) -> str:
    """'file' for plain paths, else the lower-cased scheme ('https', 's3', 'data', 'file', ...).

    'data:...' and 'file:/x' have no '//' but are schemes all the same: they must meet the
    allow-list rather than pass as relative local paths."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else "file"


def has_scheme(uri: str) -> bool:
    """True for 'https://...', 's3://...', 'file:...', 'data:...'; False for paths (incl. 'C:\\x')."""
    return bool(_SCHEME.match(uri))


def is_local(uri: str) -> bool:
    """The one local-vs-remote rule: plain paths and file:// / local:// URLs are local."""
    return scheme_of(uri) in ("file", "local")


@dataclass(frozen=True, slots=True)
class Entry:
    """What a store knows about one object; -1 / "" where the backend does not say."""

    rel: str
    size: int
    etag: str = ""
    version: str = ""
    mtime_ns: int = -1
    inode: int = -1
    is_dir: bool = False

    @property
    def name(self) -> str:
        return self.rel.rstrip("/").rsplit("/", 1)[-1]

    @property
    def token(self) -> str | None:
        """The strongest identity the backend gave (ETag, version, else modification stamp)."""
        if self.etag:
            return f"etag:{self.etag}"
        if self.version:
            return f"version:{self.version}"
        if self.mtime_ns >= 0:
            return f"mtime:{self.mtime_ns}:{self.inode}"
        return None


def _stamp_ns(value: Any) -> int:
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1e9)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return -1
    return int(seconds * 1e9) if math.isfinite(seconds) and seconds >= 0 else -1


def entry_of(rel: str, d: dict[str, Any]) -> Entry:
    """The one identity parser: an Entry from an fsspec `info`/`ls` dict or a boto3 response
    (HeadObject, GetObject, a ListObjectsV2 item). ETags lose their quotes."""
    size = d.get("size", d.get("Size", d.get("ContentLength")))
    etag = d.get("ETag") or d.get("etag") or ""
    version = d.get("VersionId") or d.get("version_id") or d.get("generation") or ""
    stamp = next((d[k] for k in ("mtime", "LastModified", "last_modified", "updated", "created") if d.get(k)), None)
    directory = d.get("type") == "directory" or d.get("StorageClass") == "DIRECTORY"
    return Entry(
        rel,
        int(size or 0),
        str(etag).strip('"'),
        str(version or ""),
        _stamp_ns(stamp),
        int(d.get("ino") or -1),
        directory,
    )


class RangeStream(Protocol):
    """Bytes [start, end) of one object, as returned by `Store.open_range`."""

    entry: Entry  # the object as the response described it (size = whole object)
    first: int  # first byte actually returned (0 if the backend ignored the range)

    def read(self, n: int) -> bytes:
        """Up to n (> 0) bytes; b"" only at the end of the requested range."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Guard:
    """A publish precondition: `holds(content of rel)` must be true when the publish commits,
    atomically with respect to conditional writes of `rel` (the lease fence)."""

    rel: str
    holds: Callable[[bytes], bool]


def _digest(f: Any, chunk: int) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    while block := f.read(chunk):
        h.update(block)
        size += len(block)
    return size, h.hexdigest()


def file_digest(path: str, chunk: int = 4 * 2**20) -> tuple[int, str]:
    """(size, sha256 hex) of a local file, read in chunks; of a directory, see tree_digest."""
    if os.path.isdir(path):
        files = sorted(
            os.path.relpath(os.path.join(d, n), path).replace(os.sep, "/")
            for d, _, names in os.walk(path)
            for n in names
        )
        return tree_digest((rel, *file_digest(os.path.join(path, rel), chunk)) for rel in files)
    with open(path, "rb") as f:
        return _digest(f, chunk)


def tree_digest(files: Iterable[tuple[str, int, str]]) -> tuple[int, str]:
    """(total bytes, sha256) of a directory-shaped shard from its sorted (relative path, size,
    sha256) triples: the same on every store."""
    h, total = hashlib.sha256(), 0
    for rel, size, digest in files:
        h.update(f"{rel}\0{size}\0{digest}\n".encode())
        total += size
    return total, h.hexdigest()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


_CACHE: dict[tuple[int, str, str], "Store"] = {}
_LOCK = threading.Lock()
_BUILDERS: list[Callable[[str, dict[str, Any], str], "Store"]] = []  # set once by convert.store


def reopen(uri: str, options: dict[str, Any] | None = None, role: str = "output") -> "Store":
    """The store rooted at `uri`, built once per (process, uri, options): a forked child (a
    DataLoader worker, a Dask nanny's process) never reuses its parent's instance or connection
    pool (s3fs is not fork-safe). What `open_store` and unpickling call."""
    key = (os.getpid(), uri, json.dumps(options or {}, sort_keys=True, default=repr))
    store = _CACHE.get(key)
    if store is None:
        with _LOCK:
            store = _CACHE.get(key)
            if store is None:
                store = _CACHE[key] = _BUILDERS[0](uri, dict(options or {}), role)
    return store


class Store(ABC):
    """One dataset root. Picklable as (uri, storage options); re-opened per process via open_store."""

    is_local = False  # objects are files on this machine (`local_path` answers)
    supports_rename = False  # publish is an atomic rename on the same filesystem
    supports_conditional_writes = False  # create_exclusive / replace_if are atomic (leases, fences)
    supports_etags = False  # Entry.etag is a content version the backend checks (If-Match)
    supports_multipart = False  # large objects go up in checksummed parts, aborted on failure

    def __init__(self, uri: str, options: dict[str, Any]) -> None:
        self.uri = uri
        self.storage_options = options  # as given (may hold ${VAR} references); never logged

    def __reduce__(self) -> tuple[Any, ...]:
        return (reopen, (self.uri, self.storage_options))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- naming ---------------------------------------------------------------------------
    @abstractmethod
    def url(self, rel: str = "") -> str:
        """Full URL of `rel`, for messages."""

    def local_path(self, rel: str) -> str | None:
        """A local filesystem path for `rel` (h5py/lmdb open it directly), or None if remote."""
        return None

    # -- reading --------------------------------------------------------------------------
    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The whole object; FileNotFoundError if absent."""

    @abstractmethod
    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `rel`; negative offsets count from the end, as in fsspec."""

    @abstractmethod
    def open_range(
        self, rel: str, start: int = 0, end: int | None = None, match: str | None = None, timeout: float | None = None
    ) -> RangeStream:
        """A stream of bytes [start, end) (end None: to the end), for the resilient reader.
        `match` (an Entry.token seen before) makes it conditional: PreconditionFailed if the object
        changed. A start at or past the end gives an empty stream."""

    @abstractmethod
    def open(self, rel: str, mode: str = "rb", **kwargs: Any) -> BinaryIO:
        """A seekable file object for reading (kwargs: backend caching hints)."""

    @abstractmethod
    def get_file(self, rel: str, local_path: str) -> None:
        """Download `rel` whole to a local path."""

    @abstractmethod
    def info(self, rel: str) -> Entry:
        """The object's Entry, asked afresh (never a cached listing); FileNotFoundError if absent."""

    @abstractmethod
    def list(self, rel_dir: str) -> Iterator[Entry]:
        """Entries directly under `rel_dir` with their identity (empty if it does not exist)."""

    @abstractmethod
    def walk(self, rel_dir: str) -> Iterator[Entry]:
        """Every file below `rel_dir`, recursively, sorted by path."""

    def exists(self, rel: str) -> bool:
        try:
            self.info(rel)
        except FileNotFoundError:
            return False
        return True

    def sha256(self, rel: str, chunk: int = 4 * 2**20) -> tuple[int, str]:
        """(size, sha256 hex) of an object, streamed; a directory by tree_digest."""
        try:
            directory = self.info(rel).is_dir
        except FileNotFoundError:  # object stores: a directory is only a prefix
            directory = True
        if not directory:
            stream = self.open_range(rel)
            try:
                return _digest(stream, chunk)
            finally:
                stream.close()
        files = [e.rel for e in self.walk(rel)]
        if not files:
            raise FileNotFoundError(self.url(rel))
        return tree_digest((f[len(rel) + 1 :], *self.sha256(f, chunk)) for f in files)

    # -- identity (content-checked resume) -----------------------------------------------
    @abstractmethod
    def identity(self, rel: str) -> dict[str, Any]:
        """What resume later compares to prove `rel` is still the object committed now."""

    @abstractmethod
    def same_object(self, rel: str, recorded: dict[str, Any], entry: Entry) -> bool:
        """True if the listed `entry` is provably the object whose identity() was recorded."""

    def _edges(self, rel: str, size: int) -> str:
        """sha256 of the first and last EDGE_BLOCK bytes (what a same-size swap cannot keep)."""
        h = hashlib.sha256(self.read_range(rel, 0, min(size, EDGE_BLOCK)))
        if size > EDGE_BLOCK:
            h.update(self.read_range(rel, max(EDGE_BLOCK, size - EDGE_BLOCK), size))
        return h.hexdigest()

    # -- writing --------------------------------------------------------------------------
    @abstractmethod
    def writer(self, rel: str) -> ContextManager[BinaryIO]:
        """A file object whose content appears under `rel` only when the block exits cleanly."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small object atomically (temp + rename locally; one PUT remotely)."""

    @abstractmethod
    def publish(self, tmp: str, rel: str, size: int, sha256: str | None = None, guard: Guard | None = None) -> None:
        """Move a verified local temp file (or directory) to `rel` atomically; checks the stored size.
        With a `guard`, the publish commits only while the guard holds (else PreconditionFailed)."""

    @abstractmethod
    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` only if absent (True), atomically; False if it already exists."""

    @abstractmethod
    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        """(content, version token) of `rel`, read in one request; the token feeds replace_if."""

    @abstractmethod
    def replace_if(self, rel: str, data: bytes, token: str) -> str | None:
        """Replace `rel` with `data` only if its version is still `token` (a compare-and-swap);
        the new token, or None if the object changed or vanished meanwhile."""

    @abstractmethod
    def delete_if(self, rel: str, token: str) -> bool:
        """Delete `rel` only if its version is still `token`; False if it changed or is gone."""

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Remove one object; absent is not an error."""

    @abstractmethod
    def delete_tree(self, rel: str) -> None:
        """Remove an object or everything below a prefix; absent is not an error."""

    # -- incomplete uploads and preflight ------------------------------------------------
    def incomplete_uploads(self) -> builtins.list[tuple[str, str, float]]:
        """(rel, upload id, unix start) of uploads begun under the root and never completed."""
        return []

    def abort_upload(self, rel: str, upload_id: str) -> None:
        """Abort one incomplete upload (what incomplete_uploads listed)."""

    def preflight(self, role: str) -> None:
        """Raise StorageError (one line naming the uri and the fix) if the store is unusable.
        Generic stores are left to their first real use."""


def guard_refused(store: Store, rel: str, guard: Guard) -> PreconditionFailed:
    """The error of a publish whose guard no longer holds."""
    return PreconditionFailed(f"{store.url(rel)}: not published, {store.url(guard.rel)} no longer allows it")
