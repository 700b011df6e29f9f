"""The `Store` protocol: everything the pipeline does to an output (or input) location.

A store is rooted at one URI and addresses objects by '/'-separated paths relative to that root.
The base class implements every operation on top of an fsspec filesystem; `LocalStore` and
`S3Store` override what their backend does better (atomic rename, O_EXCL, checksummed multipart
upload, conditional create, incomplete-upload listing) and say so in their capability flags.
Nothing outside `convert.store` asks which backend it is talking to.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Iterator

import fsspec

from ..config import ConfigError

SHARDS_DIR = "shards"
PARTIAL = ".partial"
EDGE_BLOCK = 64 * 2**10  # bytes hashed at each end of a file for the cheap identity check
_STAGED = re.compile(r"^\.(?P<name>.+?)\.(?:r-(?P<run>[0-9A-Za-z]+)\.)?(?P<attempt>[0-9a-f]{8,32})" + re.escape(PARTIAL))


class StorageError(ConfigError):
    """The output/source store cannot be used as configured (missing bucket, refused credentials)."""


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


@dataclass(frozen=True)
class Leftover:
    """Debris of a failed or killed attempt: a local temp file, an incomplete upload, an unlisted object."""

    kind: str  # "partial" | "multipart" | "unlisted"
    url: str
    detail: str = ""
    run_id: str = ""  # the run that staged it, when its name says so
    started: float = 0.0  # unix seconds the attempt began (mtime / upload initiation); 0 = unknown


def staged_run_id(filename: str) -> str:
    """The run id encoded in a staging file name ('' for names of older versions)."""
    m = _STAGED.match(filename)
    return (m.group("run") or "") if m else ""


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
        files = sorted(os.path.relpath(os.path.join(d, n), path).replace(os.sep, "/")
                       for d, _, names in os.walk(path) for n in names)  # fmt: skip
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


def fs_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """URL of a backend path: the plain path for local files, else protocol://path."""
    from fsspec.implementations.local import LocalFileSystem

    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


class Store(ABC):
    """One dataset root. Picklable as (uri, storage options); re-opened per process via open_store."""

    is_local = False
    supports_rename = False  # publish is an atomic rename on the same filesystem
    supports_conditional_create = False  # create_exclusive is atomic (leases)
    supports_multipart = False  # large objects go up in checksummed parts, aborted on failure

    def __init__(self, uri: str, options: dict[str, Any], fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.uri = uri
        self.storage_options = options  # as given (may hold ${VAR} references); never logged
        self._fs, self._pid = fs, os.getpid()
        self.root = root.rstrip("/") or root

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem; rebuilt in a forked child (s3fs's session must not cross a fork)."""
        if self._pid != os.getpid():
            from . import open_store

            self._fs, self._pid = open_store(self.uri, self.storage_options).fs, os.getpid()
        return self._fs

    def __reduce__(self) -> tuple[Any, ...]:
        from . import open_store

        return (open_store, (self.uri, self.storage_options))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- naming ---------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """Backend path (no protocol) of `rel` under the root."""
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str = "") -> str:
        """Full URL of `rel`, for messages and for fsspec.open elsewhere."""
        return self.fs.unstrip_protocol(self.path(rel))

    def local_path(self, rel: str) -> str | None:
        """A local filesystem path for `rel` (h5py/lmdb open it directly), or None if remote."""
        return None

    # -- reading --------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `rel`; negative offsets count from the end, as in fsspec."""
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    def open(self, rel: str, mode: str = "rb", **kwargs: Any) -> BinaryIO:
        """An fsspec file object; for reading, its size comes from the store, not a stale listing."""
        self.fs.invalidate_cache(self.path(rel))
        return self.fs.open(self.path(rel), mode, **kwargs)

    def get_file(self, rel: str, local_path: str) -> None:
        """Download `rel` whole to a local path."""
        self.fs.get_file(self.path(rel), local_path)

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self.path(rel))  # object stores: never answer from a stale listing
        return self.fs.exists(self.path(rel))

    def info(self, rel: str) -> Entry:
        self.fs.invalidate_cache(self.path(rel))
        return self._entry(rel, self.fs.info(self.path(rel)))

    def list(self, rel_dir: str) -> Iterator[Entry]:
        """Entries directly under `rel_dir` (empty if it does not exist), listed afresh."""
        self.fs.invalidate_cache(self.path(rel_dir))
        try:
            found = self.fs.ls(self.path(rel_dir), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return
        for d in found:
            yield self._entry(f"{rel_dir.rstrip('/')}/{d['name'].rstrip('/').rsplit('/', 1)[-1]}", d)

    def walk(self, rel_dir: str) -> Iterator[Entry]:
        """Every file below `rel_dir`, recursively."""
        self.fs.invalidate_cache(self.path(rel_dir))
        base = self.path(rel_dir)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return
        for path, d in sorted(found.items()):
            yield self._entry(f"{rel_dir.rstrip('/')}/{path[len(base):].lstrip('/')}", d)

    def _entry(self, rel: str, d: dict[str, Any]) -> Entry:
        mtime = d.get("mtime") or d.get("LastModified") or d.get("created")
        stamp = int(mtime.timestamp() * 1e9) if hasattr(mtime, "timestamp") else int(float(mtime or -1e-9) * 1e9)
        return Entry(rel, int(d.get("size") or 0), str(d.get("ETag", "") or "").strip('"'),
                     str(d.get("VersionId", "") or ""), stamp, is_dir=d.get("type") == "directory")  # fmt: skip

    def sha256(self, rel: str, chunk: int = 4 * 2**20) -> tuple[int, str]:
        """(size, sha256 hex) of an object, streamed; a directory by tree_digest."""
        try:
            directory = self.info(rel).is_dir
        except FileNotFoundError:  # object stores: a directory is only a prefix
            directory = True
        if not directory:
            with self.fs.open(self.path(rel), "rb", block_size=chunk, cache_type="none") as f:
                return _digest(f, chunk)
        files = [e.rel for e in self.walk(rel)]
        if not files:
            raise FileNotFoundError(self.url(rel))
        return tree_digest((f[len(rel) + 1 :], *self.sha256(f, chunk)) for f in files)

    # -- identity (content-checked resume) -----------------------------------------------
    def identity(self, rel: str) -> dict[str, Any]:
        """What resume later compares to prove `rel` is still the object committed now."""
        entry = self.info(rel)
        return {"size": entry.size, "etag": entry.etag, "edges": self._edges(rel, entry.size)}

    def same_object(self, rel: str, recorded: dict[str, Any], entry: Entry) -> bool:
        """True if the listed `entry` is provably the object whose identity() was recorded."""
        if entry.size != recorded.get("size") or (recorded.get("etag") and entry.etag != recorded["etag"]):
            return False
        return self._edges(rel, entry.size) == recorded.get("edges")

    def _edges(self, rel: str, size: int) -> str:
        """sha256 of the first and last EDGE_BLOCK bytes (what a same-size swap cannot keep)."""
        h = hashlib.sha256(self.read_range(rel, 0, min(size, EDGE_BLOCK)))
        if size > EDGE_BLOCK:
            h.update(self.read_range(rel, max(EDGE_BLOCK, size - EDGE_BLOCK), size))
        return h.hexdigest()

    # -- writing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, rel: str) -> Iterator[BinaryIO]:
        """A file object whose content appears under `rel` only when the block exits cleanly.

        Generic backends do not all honour fsspec's autocommit=False (memory:// writes through),
        so the bytes are spooled locally and sent in one put when complete."""
        with tempfile.SpooledTemporaryFile(max_size=8 * 2**20) as spool:
            yield spool  # type: ignore[misc]
            spool.seek(0)
            with self.fs.open(self.path(rel), "wb") as f:
                shutil.copyfileobj(spool, f, 2**20)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small object atomically (temp + rename locally; one PUT remotely)."""
        self.fs.pipe_file(self.path(rel), data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` only if absent (True), atomically; False if it already exists."""
        raise StorageError(f"{self.url(rel)}: this store cannot create objects conditionally, so two runs "
                           "could write one output at once; use a local path or S3 for the output")  # fmt: skip

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))
        self.fs.invalidate_cache(self.path(rel))

    def delete_tree(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)
        self.fs.invalidate_cache(self.path(rel))

    # -- staging and publishing shards ----------------------------------------------------
    def _staging_dir(self) -> tuple[str, str | None]:
        """(folder for temp files, folder to remove afterwards or None)."""
        tmpdir = tempfile.mkdtemp(prefix="convert-")
        return tmpdir, tmpdir

    @contextlib.contextmanager
    def staging(self, name: str, ext: str, run_id: str = "", sidecars: Iterable[str] = ()) -> Iterator[str]:
        """A local temp path unique to this attempt (and named with `run_id`); removed afterwards,
        with the format's `sidecars` (suffixes such as LMDB's "-lock") and whatever the writer left."""
        folder, cleanup = self._staging_dir()
        tag = f"r-{run_id}." if run_id else ""
        tmp = os.path.join(folder, f".{name}.{tag}{uuid.uuid4().hex[:12]}{PARTIAL}{ext}")
        try:
            yield tmp
        finally:
            for path in [tmp, *(tmp + suffix for suffix in sidecars)]:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            if cleanup:
                shutil.rmtree(cleanup, ignore_errors=True)

    def publish(self, tmp: str, rel: str, size: int, sha256: str | None = None) -> None:
        """Move a verified local temp file (or directory) to its final name; checks the stored size."""
        self.fs.put(tmp, self.path(rel), recursive=os.path.isdir(tmp))
        self._check_size(rel, size)

    def _check_size(self, rel: str, size: int) -> None:
        self.fs.invalidate_cache(self.path(rel))
        stored = self.fs.du(self.path(rel)) if self.fs.isdir(self.path(rel)) else self.fs.info(self.path(rel))["size"]
        if stored != size:
            raise OSError(f"upload of {self.url(rel)} incomplete: {stored} of {size} bytes")

    # -- leftovers and preflight -----------------------------------------------------------
    def leftovers(self) -> list[Leftover]:
        """Debris of killed attempts: staged temps under shards/ (and, on S3, incomplete uploads)."""
        found = []
        for entry in self.list(SHARDS_DIR):
            if PARTIAL in entry.name:
                found.append(Leftover("partial", self.url(entry.rel), "", staged_run_id(entry.name),
                                      max(entry.mtime_ns, 0) / 1e9))  # fmt: skip
        return found

    def remove_leftover(self, item: Leftover) -> None:
        rel = item.url[len(self.url()) + 1 :]
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel), recursive=True)

    def clean_leftovers(self, keep_run: str = "", since: float = float("inf")) -> list[Leftover]:
        """Remove debris that is provably dead: staged by another run than `keep_run`, or started
        before `since` (the lease's start). Returns what was removed."""
        removed = []
        for item in self.leftovers():
            if not keep_run or item.run_id != keep_run or item.started < since:
                self.remove_leftover(item)
                removed.append(item)
        return removed

    def preflight(self, role: str) -> None:
        """Raise StorageError (one line naming the uri and the fix) if the store is unusable.
        Generic stores are left to their first real use."""


class FsspecStore(Store):
    """Any other fsspec filesystem (memory://, gs://, az://, ...): the base behaviour, no extras."""
