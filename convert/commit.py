"""Commit: where shards are staged, and how a finished shard becomes visible under its final name.

A shard is written under a temporary name unique to the attempt, closed, verified by the caller,
then moved into place: `os.replace` on a local filesystem (atomic), or one upload to the final key
on an object store (an S3 PUT / completed multipart upload is atomic per object). Two attempts of
the same shard may run at once; both produce the same bytes, so the last rename/upload wins
harmlessly. A killed writer leaves only a `.partial` temp, never a file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

SHARDS_DIR = "shards"
PARTIAL = ".partial"


@dataclass(frozen=True)
class Output:
    """The dataset root: a local path or fsspec URL plus storage options (picklable, tiny)."""

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return _filesystem(self.uri, tuple(sorted(self.storage_options.items())))[0]

    @property
    def root(self) -> str:
        return _filesystem(self.uri, tuple(sorted(self.storage_options.items())))[1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        """Filesystem path (no protocol) of `rel` under the root."""
        return f"{self.root.rstrip('/')}/{rel}"

    def url(self, rel: str) -> str:
        """Full URL of `rel` (for messages and fsspec.open)."""
        return self.fs.unstrip_protocol(self.path(rel)) if not self.is_local else self.path(rel)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small object atomically (temp + rename locally; single PUT remotely)."""
        if self.is_local:
            final = self.path(rel)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.{uuid.uuid4().hex[:12]}{PARTIAL}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(self.path(rel), data)


_FS_CACHE: dict[tuple[str, tuple[Any, ...]], tuple[fsspec.AbstractFileSystem, str]] = {}


def _filesystem(uri: str, options: tuple[Any, ...]) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem + root path for `uri`, cached per process (instances are pooled anyway)."""
    key = (uri, options)
    if key not in _FS_CACHE:
        fs, root = fsspec.core.url_to_fs(uri, **dict(options))
        if isinstance(fs, LocalFileSystem):
            root = os.path.abspath(root)
        _FS_CACHE[key] = (fs, root)
    return _FS_CACHE[key]


def shard_rel_path(name: str, extension: str) -> str:
    return f"{SHARDS_DIR}/{name}{extension}"


@contextlib.contextmanager
def staging_path(out: Output, name: str, extension: str) -> Iterator[str]:
    """A local temp path unique to this attempt; removed afterwards whatever happened.

    Local outputs stage inside the output's shards/ folder so the final rename stays on one
    filesystem (atomic); remote outputs stage in a worker-local temp dir before upload.
    """
    attempt = uuid.uuid4().hex[:12]
    if out.is_local:
        folder = out.path(SHARDS_DIR)
        os.makedirs(folder, exist_ok=True)
        tmpdir = None
    else:
        folder = tmpdir = tempfile.mkdtemp(prefix="convert-")
    tmp = os.path.join(folder, f".{name}.{attempt}{PARTIAL}{extension}")
    try:
        yield tmp
    finally:
        for leftover in (tmp, tmp + "-lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def file_digest(path: str, chunk: int = 4 * 2**20) -> tuple[int, str]:
    """(size, sha256 hex) of a local file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def stream_digest(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 4 * 2**20) -> tuple[int, str]:
    """(size, sha256 hex) of any fsspec object, streamed."""
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb", block_size=chunk, cache_type="none") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def publish(out: Output, tmp: str, rel_path: str, size: int) -> None:
    """Move a verified local temp file to its final name (rename locally, upload remotely)."""
    final = out.path(rel_path)
    if out.is_local:
        os.replace(tmp, final)
        return
    out.fs.put_file(tmp, final)
    remote_size = out.fs.info(final)["size"]
    if remote_size != size:
        raise OSError(f"upload of {out.url(rel_path)} incomplete: {remote_size} of {size} bytes")
