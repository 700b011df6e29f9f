"""A local (or shared POSIX: NFS, Lustre) directory as a store: rename, O_EXCL, flock, stat identities."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat as stat_mod
import shutil
import uuid
from typing import Any, BinaryIO, Iterator, cast

from .base import PARTIAL, Entry, Guard, RangeStream, PreconditionFailed, StorageError, file_digest, guard_refused
from .generic import FsspecStore, _FileRange, _join

LOCK_SUFFIX = ".lock"  # beside an object whose conditional writes are serialised by flock

_READ_DENIED = "check the folder's owner and permissions, or choose another output.uri"


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[BinaryIO]:
    """The one tmp-then-replace writer of the project: `path.<uuid>.partial`, then `os.replace`;
    the temp is removed on failure. `with atomic_write(path) as f: f.write(...)`."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}{PARTIAL}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class LocalStore(FsspecStore):
    """A directory: rename publishes, O_EXCL creates, and a lock file (`flock`) beside an object
    serialises its conditional replaces with the publishes it guards (the lease fence)."""

    is_local = True
    supports_rename = True
    supports_conditional_writes = True

    def local_path(self, rel: str) -> str:
        return self.path(rel)

    def url(self, rel: str = "") -> str:
        return self.path(rel)

    def read_bytes(self, rel: str) -> bytes:
        with open(self.path(rel), "rb") as f:
            return f.read()

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        with open(self.path(rel), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
            f.seek(start)
            return f.read(max(0, min(end, size) - start))

    def open_range(
        self, rel: str, start: int = 0, end: int | None = None, match: str | None = None, timeout: float | None = None
    ) -> RangeStream:
        f = open(self.path(rel), "rb")  # noqa: SIM115 - closed by the stream
        entry = _stat_entry(rel, os.fstat(f.fileno()))
        if match is not None and entry.token != match:
            f.close()
            raise PreconditionFailed(f"{self.url(rel)} changed (was {match}, now {entry.token})")
        return _FileRange(f, entry, start, end)

    def open(self, rel: str, mode: str = "rb", **kwargs: Any) -> BinaryIO:
        return cast(BinaryIO, open(self.path(rel), mode))  # noqa: SIM115 - the caller closes it

    def get_file(self, rel: str, local_path: str) -> None:
        shutil.copyfile(self.path(rel), local_path)

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path(rel))

    def info(self, rel: str) -> Entry:
        return _stat_entry(rel, os.stat(self.path(rel)))

    def list(self, rel_dir: str) -> Iterator[Entry]:
        try:
            it = os.scandir(self.path(rel_dir))
        except (FileNotFoundError, NotADirectoryError):
            return
        with it:
            for d in it:
                with contextlib.suppress(FileNotFoundError):  # removed while listing
                    yield _stat_entry(_join(rel_dir, d.name), d.stat(follow_symlinks=False), d.is_dir())

    def walk(self, rel_dir: str) -> Iterator[Entry]:
        base = self.path(rel_dir)
        found = []
        for folder, _, names in os.walk(base):
            for name in names:
                rel = os.path.relpath(os.path.join(folder, name), base).replace(os.sep, "/")
                with contextlib.suppress(FileNotFoundError):
                    found.append(_stat_entry(_join(rel_dir, rel), os.stat(os.path.join(folder, name))))
        yield from sorted(found, key=lambda e: e.rel)

    def identity(self, rel: str) -> dict[str, Any]:
        """Size, inode and mtime_ns (a copy or a swap changes them) plus a hash of both ends."""
        entry = self.info(rel)
        return {
            "size": entry.size,
            "inode": entry.inode,
            "mtime_ns": entry.mtime_ns,
            "edges": self._edges(rel, entry.size),
        }

    def same_object(self, rel: str, recorded: dict[str, Any], entry: Entry) -> bool:
        """Size, inode and mtime as listed; then the change time recorded at commit (every write,
        utime or chmod advances it, no call sets it back: the same stamp proves the same file,
        with no read) or, for a record without one, a hash of both ends."""
        if (entry.size, entry.inode, entry.mtime_ns) != (
            recorded.get("size"),
            recorded.get("inode"),
            recorded.get("mtime_ns"),
        ):
            return False
        ctime = recorded.get("ctime_ns")
        if isinstance(ctime, int) and ctime % 1_000_000_000:  # sub-second: an edit after commit moved it
            with contextlib.suppress(OSError):
                return os.stat(self.path(rel)).st_ctime_ns == ctime
            return False
        return self._edges(rel, entry.size) == recorded.get("edges")

    @contextlib.contextmanager
    def writer(self, rel: str) -> Iterator[BinaryIO]:
        with atomic_write(self.path(rel)) as f:
            yield f

    def write_bytes(self, rel: str, data: bytes) -> None:
        with atomic_write(self.path(rel)) as f:
            f.write(data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """O_EXCL on a temp-complete file: written whole to a temp, then hard-linked into place
        (link fails if the name exists), so no reader ever sees a half-written object."""
        final = self.path(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.{uuid.uuid4().hex[:12]}{PARTIAL}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except OSError:  # filesystems without hard links: O_EXCL directly
                try:
                    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _locked(self, rel: str) -> Iterator[None]:
        """An exclusive flock on `<rel>.lock`: conditional replaces and guarded publishes of one
        object take it, so a compare and the write it allows are one step for every process."""
        path = self.path(rel) + LOCK_SUFFIX
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        data = self.read_bytes(rel)
        return data, _token(data)

    def replace_if(self, rel: str, data: bytes, token: str) -> str | None:
        with self._locked(rel):
            try:
                current = self.read_bytes(rel)
            except FileNotFoundError:
                return None
            if _token(current) != token:
                return None
            self.write_bytes(rel, data)
        return _token(data)

    def delete_if(self, rel: str, token: str) -> bool:
        with self._locked(rel):
            try:
                current = self.read_bytes(rel)
            except FileNotFoundError:
                return False
            if _token(current) != token:
                return False
            self.delete(rel)
        return True

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(rel))

    def delete_tree(self, rel: str) -> None:
        path = self.path(rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            self.delete(rel)

    def publish(self, tmp: str, rel: str, size: int, sha256: str | None = None, guard: Guard | None = None) -> None:
        """A rename within the filesystem; with a guard, under the guard object's lock."""
        if guard is None:
            return _rename_into(tmp, self.path(rel))
        with self._locked(guard.rel):
            try:
                allowed = guard.holds(self.read_bytes(guard.rel))
            except FileNotFoundError:
                allowed = False
            if not allowed:
                raise guard_refused(self, rel, guard)
            _rename_into(tmp, self.path(rel))

    def sha256(self, rel: str, chunk: int = 4 * 2**20) -> tuple[int, str]:
        return file_digest(self.path(rel), chunk)

    def preflight(self, role: str) -> None:
        """The root (or its nearest existing parent) must be a writable directory."""
        probe = self.root
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StorageError(f"{role}.uri {self.root}: not a directory; choose a folder for {role}.uri")
        if role == "output" and not os.access(probe, os.W_OK | os.X_OK):
            raise StorageError(f"{role}.uri {self.root}: permission denied writing {probe}; {_READ_DENIED}")


def _token(data: bytes) -> str:
    """A local object's version for replace_if: its content hash (like an S3 ETag, the same for the
    same bytes, so a rewrite of identical content does not break a holder's compare)."""
    return hashlib.sha256(data).hexdigest()


def _rename_into(tmp: str, final: str) -> None:
    """Rename `tmp` to `final`; from another filesystem (EXDEV), copy beside `final` first."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
        _rename(tmp, final)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        near = f"{final}.{uuid.uuid4().hex[:12]}{PARTIAL}"
        try:
            (shutil.copytree if os.path.isdir(tmp) else shutil.copyfile)(tmp, near)
            _rename(near, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(near) if os.path.isdir(near) else os.unlink(near)


def _rename(tmp: str, final: str) -> None:
    if os.path.isdir(tmp):  # directory-shaped shard: a directory cannot replace a directory
        old = f"{final}.{uuid.uuid4().hex[:12]}{PARTIAL}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, final)


def _stat_entry(rel: str, st: os.stat_result, is_dir: bool | None = None) -> Entry:
    directory = stat_mod.S_ISDIR(st.st_mode) if is_dir is None else is_dir
    return Entry(rel, st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino, is_dir=directory)
