"""A bounded, machine-wide local cache of remote shards, shared by the processes of one machine.

Files are named by the manifest's sha256 (`<sha256><ext>`), so a copy is reused by any dataset
holding the same shard, and verified after download (size and sha256) before it becomes visible
through an atomic rename. The cache never holds more than `limit` bytes: before a download the
space is reserved (the partial file is created at its full size under the cache-wide lock) and
least-recently-used complete files are evicted to make room (the shard being fetched never is).
A shard another reader still has open may be evicted: that reader keeps reading its open file (an
unlinked file stays readable until closed; readers are LRU-bounded, see Dataset.max_open_shards),
and a later open downloads it again. Never a wrong read.

Locks are `fcntl.flock` on files in the cache directory (one per shard for the download, one for
the whole cache for accounting): they work between forked or spawned DataLoader workers and
between unrelated processes of one machine. fsspec's own caches (`filecache`) have no size limit
shared across processes, hence this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

from .manifest import ManifestError

PARTIAL = ".partial"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_WAIT = 0.05  # seconds between checks while other processes' downloads hold the space
_WAIT_LIMIT = 600.0

Fetch = Callable[[str, str], None]  # (shard rel path, local target path) -> writes the file


class CacheError(ManifestError):
    """A shard cannot be cached: its download does not match the manifest, or the limit is too small."""


def parse_size(value: int | str | None) -> int | None:
    """'10GB', '512MiB', 10**9 or None (no limit) -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cache_limit {value!r}: expected bytes or a size like '10GB' or '512MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _stale(path: Path) -> bool:
    """A partial file whose writer process is gone (killed mid-download): removed, not counted."""
    if not path.name.endswith(PARTIAL):
        return False
    try:
        pid = int(path.name.split(".")[-3])
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return True
    except (ValueError, IndexError, PermissionError):
        return False


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ShardCache:
    """`get(shard)` -> local path of a verified copy; `prefetch(shards)` downloads ahead in a thread.

    `shard` is a manifest entry (`path`, `bytes`, `sha256`). Picklable (a DataLoader worker gets a
    fresh pin set and thread pool).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        fetch: Fetch,
        extension: str,
        limit: int | str | None = None,
        prefetch_depth: int = 2,
        url_of: Callable[[str], str] = str,
    ) -> None:
        self.directory = Path(directory)
        self.fetch = fetch
        self.extension = extension
        self.limit = parse_size(limit)
        self.prefetch_depth = prefetch_depth
        self.url_of = url_of  # shard path -> full URL, for messages
        self._init_process()

    def _init_process(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future[Path]] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.__dict__.items()
            if k in ("directory", "fetch", "extension", "limit", "prefetch_depth", "url_of")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's threads and locks are not ours
            self._init_process()

    # -- public ---------------------------------------------------------------------------
    def target(self, shard: dict[str, Any]) -> Path:
        if not _SHA.match(str(shard["sha256"])):  # the name comes from metadata: never a path
            raise CacheError(f"{shard['path']}: manifest sha256 {shard['sha256']!r} is not a hex digest")
        return self.directory / f"{shard['sha256']}{self.extension}"

    def get(self, shard: dict[str, Any]) -> Path:
        """The verified local copy of `shard` (downloaded now unless present), marked as recently used."""
        self._check_pid()
        with self._lock:
            pending = self._pending.pop(shard["sha256"], None)
        if pending is not None:
            with contextlib.suppress(Exception):  # a failed prefetch is retried below, in the caller
                return pending.result()
        return self._ensure(shard)

    def prefetch(self, shards: list[dict[str, Any]]) -> None:
        """Start downloading the next shards (at most `prefetch_depth` in flight) in the background."""
        self._check_pid()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(1, self.prefetch_depth), thread_name_prefix="convert-cache")
            for shard in shards[: self.prefetch_depth]:
                if shard["sha256"] not in self._pending:
                    self._pending[shard["sha256"]] = self._pool.submit(self._ensure, shard)

    def used_bytes(self) -> int:
        """Bytes the cache directory holds now (complete copies plus reserved partial ones)."""
        return sum(size for _, size, _ in self._entries(include_partial=True))

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._pending = None, {}

    # -- internals --------------------------------------------------------------------
    def _ensure(self, shard: dict[str, Any]) -> Path:
        target = self.target(shard)
        self.directory.mkdir(parents=True, exist_ok=True)
        with _flock(self.directory / f".{shard['sha256']}.lock"):  # one download per shard per machine
            if target.is_file() and target.stat().st_size == shard["bytes"]:
                os.utime(target)  # recently used
                return target
            tmp = self.directory / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL}"
            try:
                self._reserve(tmp, int(shard["bytes"]), keep=shard["sha256"])
                self.fetch(shard["path"], str(tmp))
                self._verify(tmp, shard)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return target

    def _verify(self, tmp: Path, shard: dict[str, Any]) -> None:
        digest, size = hashlib.sha256(), 0
        with open(tmp, "rb") as f:
            while block := f.read(4 * 2**20):
                digest.update(block)
                size += len(block)
        if size != shard["bytes"] or digest.hexdigest() != shard["sha256"]:
            raise CacheError(
                f"{self.url_of(shard['path'])}: checksum does not match the manifest; "
                "run `convert-dataset verify` on the dataset and re-run the conversion"
            )

    def _reserve(self, tmp: Path, size: int, keep: str) -> None:
        """Create `tmp` at `size` bytes once the cache has room, evicting LRU copies as needed."""
        if self.limit is not None and size > self.limit:
            raise CacheError(f"cache_limit {self.limit} bytes is smaller than one shard ({size} bytes); raise it")
        deadline = time.monotonic() + _WAIT_LIMIT
        while True:
            with _flock(self.directory / ".cache.lock"):
                if self._make_room(size, keep):
                    with open(tmp, "wb") as f:
                        f.truncate(size)  # counts in every process's accounting from now on
                    return
            if time.monotonic() > deadline:
                raise CacheError(
                    f"{self.directory}: no room for {size} bytes within cache_limit after "
                    f"{_WAIT_LIMIT:.0f}s (other readers hold it); raise cache_limit"
                )
            time.sleep(_WAIT)

    def _make_room(self, size: int, keep: str) -> bool:
        if self.limit is None:
            return True
        entries = [e for e in self._entries(include_partial=True) if not _stale(e[0])]
        used = sum(s for _, s, _ in entries)
        for path, s, _ in sorted((e for e in entries if not e[0].name.endswith(PARTIAL)), key=lambda e: e[2]):
            if used + size <= self.limit:
                break
            sha = path.name[: -len(self.extension)] if path.name.endswith(self.extension) else path.name
            if sha == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                used -= s
        return used + size <= self.limit

    def _entries(self, include_partial: bool) -> list[tuple[Path, int, int]]:
        out = []
        try:
            listing = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in listing:
            name = entry.name
            partial = name.endswith(PARTIAL)
            if name.endswith(".lock") or (partial and not include_partial):
                continue
            if not partial and not name.endswith(self.extension):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                out.append((Path(entry.path), st.st_size, st.st_mtime_ns))
        return out
