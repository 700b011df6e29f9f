"""Shard records: each committed shard's done-marker, its ledger rows, and the identity of its file.

    shards/shard-00000.record.gz   counts, size, sha256, fingerprint, identity, ledger columns

A record is written by the worker after its shard is published. Ledgers stay here, beside their
shards: nothing concatenates them; `iter_ledger` (convert.manifest) streams them shard by shard.
Records are read concurrently (a thread pool; reads are I/O), in order, with bounded look-ahead,
so resume and ledger streaming cost O(shards) requests in parallel and O(window) memory.

Resume trusts a record only if its shard is provably the file that was committed: the store's
identity check (S3: the ETag recorded at upload, from the listing, no download; local: size,
inode, mtime_ns, ctime_ns and a hash of both ends), falling back to a full sha256 when the cheap
check fails (a copied dataset), when the identity cannot prove the commit (`proves_commit`: no
inode, whole-second timestamps, no ETag), or always under `verify=True` (`--verify-resume`).
Names and paths read back are validated, and local metadata and shards must be regular files
(`read_meta`, `check_regular`): a FIFO planted in the output is refused, never opened blocking.
"""

from __future__ import annotations

import io
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from . import persist
from .specs import Column, ItemResult, ShardRecord, Status
from .layout import SHARDS_DIR
from .store import Entry, Store

RECORD_SUFFIX = ".record.gz"
VERSION = 1
CODEC = ("gzip", 6)
READ_THREADS = 16  # concurrent record reads / shard hashes
WINDOW = 64  # records read ahead of the consumer

_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}"
_NAME = re.compile(f"^{_NAME_RE}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX; elsewhere the stat check alone
T = TypeVar("T")
R = TypeVar("R")


class ManifestError(ValueError):
    """The output's manifest, index or a record is missing, unreadable or not to be trusted."""


class NotRegularFile(ManifestError):
    """A local object named by metadata is a FIFO, device, socket (or holds one): never opened."""


def shard_rel_path(name: str, extension: str) -> str:
    return f"{SHARDS_DIR}/{name}{extension}"


def record_rel_path(name: str) -> str:
    return f"{SHARDS_DIR}/{name}{RECORD_SUFFIX}"


def check_rel_path(path: Any, where: str) -> str:
    """A path read from metadata must be relative, normalized and under shards/: no '..', no
    absolute path, no scheme, no backslash or control character. ManifestError otherwise."""
    ok = isinstance(path, str) and path.startswith(f"{SHARDS_DIR}/") and len(path) < 1024
    if ok:
        parts = path.split("/")
        ok = all(p not in ("", ".", "..") for p in parts) and not any(c in path for c in "\\:\0\n\r")
    if not ok:
        raise ManifestError(
            f"{where}: path {str(path)[:120]!r} is not a relative path under {SHARDS_DIR}/; "
            "the metadata was tampered with or corrupted - rerun the conversion"
        )
    return path


def check_rel_paths(paths: np.ndarray, where: str) -> None:
    """check_rel_path over a whole column with numpy's string ufuncs (10^6 paths in a fraction of
    a second); the first bad path is then named by check_rel_path."""
    p = np.asarray(paths, dtype=str)
    ok = np.strings.startswith(p, f"{SHARDS_DIR}/") & ~np.strings.endswith(p, "/")
    for bad in ("//", "/./", "/../", "\\", ":", "\n", "\r"):  # (NUL cannot be found: numpy pads with it)
        ok &= np.strings.find(p, bad) < 0
    ok &= ~np.strings.endswith(p, "/..") & ~np.strings.endswith(p, "/.")
    if not ok.all():
        for path in p[~ok][:1].tolist():
            check_rel_path(path, where)
        raise ManifestError(f"{where}: a shard path is not a relative path under {SHARDS_DIR}/; rerun the conversion")


def is_shard_name(name: Any) -> bool:
    """A shard name is one path segment of letters, digits, '.', '_' and '-' (never '..' alone,
    '/', NUL or a leading dot): safe to join under shards/."""
    return isinstance(name, str) and bool(_NAME.match(name))


def _allowed(chars: bytes) -> np.ndarray:
    table = np.zeros(128, dtype=bool)
    table[list(chars)] = True
    return table


_ALNUM = _allowed(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _ALNUM | _allowed(b"._-\0")  # \0: numpy's padding after the name


def _chars(column: np.ndarray, width: int = 0) -> np.ndarray:
    """A str column as an (n, width) matrix of code points (numpy's UCS-4 storage, zero padded)."""
    u = np.ascontiguousarray(column, dtype=f"<U{max(width, column.dtype.itemsize // 4, 1)}")
    return u.view(np.uint32).reshape(len(u), u.dtype.itemsize // 4)


def _names_ok(names: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """Per shard: a safe name (`is_shard_name`) and a path that is shards/<name>.<ext>, from
    code-point matrices (10^6 shards in well under a second: the index is read by every reader)."""
    c = _chars(names)
    length = np.count_nonzero(c, axis=1)
    ascii_ = (c < 128).all(axis=1)
    c7 = np.where(c < 128, c, 0)
    ok = ascii_ & (length >= 1) & (length <= 201) & _ALNUM[c7[:, 0]] & _NAME_CHARS[c7].all(axis=1)
    ok &= ~((c[:, :-1] == 0) & (c[:, 1:] != 0)).any(axis=1)  # no NUL inside a name
    start = len(SHARDS_DIR) + 1
    p = _chars(paths, start + c.shape[1] + 1)
    own = ((p[:, start : start + c.shape[1]] == c) | (c == 0)).all(axis=1)
    dot = p[np.arange(len(p)), np.minimum(start + length, p.shape[1] - 1)] == ord(".")
    return ok & own & dot


def check_names(names: np.ndarray, paths: np.ndarray, where: str) -> None:
    """Every shard name of the index is a safe name (`is_shard_name`) and its path is
    shards/<name>.<ext>; the first bad one is named."""
    names, paths = np.asarray(names, dtype=str), np.asarray(paths, dtype=str)
    ok = _names_ok(names, paths) if len(names) else np.ones(0, dtype=bool)
    if ok.all():
        return
    i = int(np.flatnonzero(~ok)[0])
    name = str(names[i])
    if not is_shard_name(name):
        raise ManifestError(
            f"{where}: bad shard name {name[:80]!r}; the metadata was tampered with or corrupted - rerun the conversion"
        )
    raise ManifestError(
        f"{where}: shard {name!r} has path {str(paths[i])[:120]!r}, not its own file; rerun the conversion"
    )


def read_meta(store: Store, rel: str) -> bytes:
    """The bytes of a metadata object (manifest, index, record, plan). A local one must be a
    regular file: it is opened non-blocking and checked before reading, so a FIFO or a device
    put in its place is refused (ManifestError) instead of hanging the reader."""
    local = store.local_path(rel)
    if local is None:
        return store.read_bytes(rel)
    refused = NotRegularFile(f"{local} is not a regular file; the output was tampered with - rerun the conversion")
    if not stat.S_ISREG(os.stat(local).st_mode):  # a socket or device would fail or block in open()
        raise refused
    fd = os.open(local, os.O_RDONLY | _NONBLOCK | os.O_CLOEXEC)  # and if swapped since: fstat says so
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refused
        os.set_blocking(fd, True)
        return f.read()


def check_regular(store: Store, rel: str) -> None:
    """A local shard named by metadata must be a regular file, or a directory (directory-shaped
    formats) holding only regular files and directories; ManifestError otherwise (a FIFO would
    hang whoever opens it). Object stores hold only objects: nothing to check."""
    local = store.local_path(rel)
    if local is None:
        return
    try:
        mode = os.stat(local).st_mode
    except FileNotFoundError:
        return  # the caller reports it missing
    bad = not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
    if stat.S_ISDIR(mode):
        bad = any(
            not stat.S_ISREG(os.stat(os.path.join(top, n)).st_mode) for top, _, files in os.walk(local) for n in files
        )
    if bad:
        raise NotRegularFile(
            f"{local} is not a regular file; the output was tampered with - "
            "run `convert-dataset verify --repair` or rerun the conversion"
        )


def check_summary(s: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate one shard summary: safe name and path, non-negative consistent counts, sha256."""
    name = s.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ManifestError(f"{where}: bad shard name {str(name)[:80]!r}; rerun the conversion")
    check_rel_path(s.get("path"), f"{where} shard {name}")
    counts = [s.get(k) for k in ("count", "ok", "failed", "bytes")]
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < 2**53 for c in counts):
        raise ManifestError(f"{where} shard {name}: counts must be non-negative integers, got {counts}")
    if s["ok"] + s["failed"] != s["count"]:
        raise ManifestError(f"{where} shard {name}: ok {s['ok']} + failed {s['failed']} != count {s['count']}")
    if not isinstance(s.get("sha256"), str) or not _SHA.match(s["sha256"]):
        raise ManifestError(f"{where} shard {name}: sha256 is not 64 hex digits")
    return s


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], threads: int = READ_THREADS, window: int = WINDOW
) -> Iterator[R]:
    """fn over items on a thread pool, results in input order, at most `window` in flight."""
    with ThreadPoolExecutor(threads, thread_name_prefix="convert-records") as pool:
        pending: list[Any] = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def ledger_columns(rows: Iterable[ItemResult]) -> dict[str, Any]:
    rows = list(rows)
    return {
        "key": [r.key for r in rows],
        "uri": [r.uri for r in rows],
        "label": np.array([-1 if r.label is None else r.label for r in rows], dtype=np.int64),
        "status": [r.status.value for r in rows],
        "error": [r.error for r in rows],
        "width": np.array([r.width for r in rows], dtype=np.int32),
        "height": np.array([r.height for r in rows], dtype=np.int32),
        "src_format": [r.src_format for r in rows],
        "src_bytes": np.array([r.src_bytes for r in rows], dtype=np.int64),
        "digest": [r.digest for r in rows],
    }


def ledger_rows(cols: dict[str, Any]) -> tuple[ItemResult, ...]:
    n = len(cols["key"])
    width, height = cols.get("width", [-1] * n), cols.get("height", [-1] * n)
    fmt, nbytes = cols.get("src_format", [""] * n), cols.get("src_bytes", [-1] * n)
    digests = cols.get("digest", [""] * n)
    return tuple(
        ItemResult(
            key, uri, None if int(label) < 0 else int(label), Status(status), error, int(w), int(h), f, int(b), str(d)
        )
        for key, uri, label, status, error, w, h, f, b, d in zip(
            cols["key"],
            cols["uri"],
            cols["label"],
            cols["status"],
            cols["error"],
            width,
            height,
            fmt,
            nbytes,
            digests,
        )
    )


def dump_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    persist.dump(obj, buf, compress=CODEC)
    return buf.getvalue()


def write_record(store: Store, record: ShardRecord, fingerprint: str) -> dict[str, Any]:
    """Commit a shard's record beside it (after the shard): its done-marker, with the identity
    of the published file so a later resume can prove the file is still that one; returns it."""
    identity = current_identity(store, record.path)
    obj = {
        "version": VERSION,
        "fingerprint": fingerprint,
        **record.summary(),
        "identity": identity,
        "ledger": ledger_columns(record.ledger),
    }
    store.write_bytes(record_rel_path(record.name), dump_bytes(obj))
    return identity


def current_identity(store: Store, rel: str) -> dict[str, Any]:
    """The identity resume later compares (store.identity, plus locally the change time: every
    write, utime or chmod advances it, none sets it back); {} for a directory-shaped shard."""
    try:
        identity = store.identity(rel)
        local = store.local_path(rel)
        if local is not None:
            identity["ctime_ns"] = os.stat(local).st_ctime_ns
    except OSError:  # a directory-shaped shard: resume checks its tree digest instead
        return {}
    return identity


def read_record_full(store: Store, name: str) -> tuple[ShardRecord, str, dict[str, Any]] | None:
    """(record, fingerprint, identity) of a committed shard; None if absent, unreadable or not a
    regular file (resume then rebuilds it; a reader reports it missing).
    A record whose paths or counts are unsafe, or an unsafe name, raises ManifestError."""
    obj = read_record_object(store, name)
    if obj is None:
        return None
    where = store.url(record_rel_path(name))
    check_summary(obj, where)
    if obj["name"] != name:
        raise ManifestError(f"{where}: record names shard {obj['name']!r}; rerun the conversion")
    shape = obj["image_shape"]
    record = ShardRecord(
        name=obj["name"],
        path=obj["path"],
        format=obj["format"],
        count=obj["count"],
        ok=obj["ok"],
        failed=obj["failed"],
        bytes=obj["bytes"],
        sha256=obj["sha256"],
        image_shape=tuple(shape) if shape else None,
        encoding=obj["encoding"],
        ledger=ledger_rows(obj["ledger"]),
        stages=dict(obj.get("stages", {})),
        counters={str(k): int(v) for k, v in dict(obj.get("counters") or {}).items()},
        columns=tuple(Column(str(n), str(t)) for n, t in (obj.get("columns") or [])),
        started=float(obj.get("started", 0.0)),
        finished=float(obj.get("finished", 0.0)),
    )
    if len(record.ledger) != record.count:
        raise ManifestError(f"{where}: {len(record.ledger)} ledger rows for {record.count} items; rerun the conversion")
    return record, obj["fingerprint"], dict(obj.get("identity") or {})


def read_ledger_columns(store: Store, name: str) -> dict[str, Any] | None:
    """A committed shard's ledger as stored: columns (lists / numpy arrays), no per-row objects
    (~1 ms per 1000 items). None if the record is absent, unreadable, not a regular file or not
    this shard's; the caller decides what a missing one means."""
    obj = read_record_object(store, name)
    ledger = None if obj is None else obj.get("ledger")
    if not isinstance(ledger, dict) or obj is None or obj.get("name") != name or "status" not in ledger:
        return None
    return ledger


def read_record_object(store: Store, name: str) -> dict[str, Any] | None:
    """A committed shard's record as stored (a dict of this format version, never unpickled), or
    None if absent, unreadable or not a regular file (a FIFO in its place is not a record). The
    callers check its fields; an unsafe name raises ManifestError."""
    if not is_shard_name(name):
        raise ManifestError(f"bad shard name {str(name)[:80]!r}; the metadata was tampered with - rerun the conversion")
    try:
        obj = persist.load(io.BytesIO(read_meta(store, record_rel_path(name))))
    except (FileNotFoundError, NotRegularFile, persist.PersistError):
        return None
    return obj if isinstance(obj, dict) and obj.get("version") == VERSION else None


def read_record(store: Store, name: str) -> tuple[ShardRecord, str] | None:
    """(record, fingerprint) of a committed shard, or None if absent or unreadable."""
    found = read_record_full(store, name)
    return None if found is None else found[:2]


def trusted_record(
    store: Store, name: str, expected: str, listing: dict[str, Entry], verify: bool
) -> tuple[ShardRecord, dict[str, Any]] | None:
    """(record, identity) of a committed shard resume may keep, else None (module doc). The identity
    is the recorded one, or the file's current one when its full sha256 was checked just now (a
    copied dataset: the index then vouches for the copy, and the next resume hashes nothing)."""
    found = read_record_full(store, name)
    if found is None or found[1] != expected:
        return None
    record, _, identity = found
    if not listed_file(store, record.path, record.bytes, listing):
        return None
    if not verify and proves_identity(store, record.path, identity, listing):
        return record, identity
    now = current_identity(store, record.path)  # taken BEFORE hashing: a later change cannot match it
    return (record, now) if store.sha256(record.path) == (record.bytes, record.sha256) else None


def listed_file(store: Store, rel: str, size: int, listing: dict[str, Entry]) -> bool:
    """`rel` is in the listing of shards/ with the committed size, and (locally) a regular file or directory."""
    entry = listing.get(rel.rsplit("/", 1)[-1])
    if entry is None or (entry.size != size and not entry.is_dir):
        return False
    try:
        check_regular(store, rel)
    except NotRegularFile:  # a FIFO or device in the shard's place: rebuild it
        return False
    return True


def proves_identity(store: Store, rel: str, identity: dict[str, Any], listing: dict[str, Entry]) -> bool:
    """The recorded identity proves (`proves_commit`) and matches (`same_object`) the listed file."""
    entry = listing.get(rel.rsplit("/", 1)[-1])
    return entry is not None and proves_commit(store, rel, identity) and store.same_object(rel, identity, entry)


def proves_commit(store: Store, rel: str, identity: dict[str, Any]) -> bool:
    """True if the recorded identity can prove, without reading the file whole, that `rel` is still
    the file committed: it must carry a stamp no user call sets back. Locally: an inode number and
    the change time (ctime_ns) at sub-second resolution, both unchanged now (an edit in place,
    even with its mtime restored by `touch -d`/utime, advances ctime). On an object store: an ETag
    (any overwrite makes a new one). Anything else cannot prove it - a filesystem without inode
    numbers or with whole-second timestamps, a store without ETags, a record written before
    ctime was recorded - and resume re-hashes that shard, as `--verify-resume` does for all."""
    if not identity:
        return False
    local = store.local_path(rel)
    if local is None:
        return bool(identity.get("etag"))
    inode, ctime = identity.get("inode"), identity.get("ctime_ns")
    if not isinstance(inode, int) or inode <= 0 or not isinstance(ctime, int) or ctime % 1_000_000_000 == 0:
        return False
    try:
        st = os.stat(local)
    except OSError:
        return False
    return (st.st_ino, st.st_ctime_ns) == (inode, ctime)


def committed_records(
    store: Store,
    fingerprints: dict[str, str],
    verify: bool = False,
    fold: Callable[[ShardRecord], ShardRecord] | None = None,
) -> dict[str, ShardRecord]:
    """Records from a previous run that resume may trust: same fingerprint, and the shard file
    provably the one committed (see the module doc). Reads records concurrently; `fold` (e.g. drop
    the ledger rows after counting them) is applied to each as it is read, so at most a window of
    full records is in memory at once."""
    listing = {entry.name: entry for entry in store.list(SHARDS_DIR)}
    names = [n for n in fingerprints if f"{n}{RECORD_SUFFIX}" in listing]
    found = ordered_map(lambda n: trusted_record(store, n, fingerprints[n], listing, verify), names)
    return {name: (fold(kept[0]) if fold else kept[0]) for name, kept in zip(names, found) if kept is not None}


def iter_record_ledgers(store: Store, names: Iterable[str]) -> Iterator[tuple[str, tuple[ItemResult, ...]]]:
    """(shard name, ledger rows) for each named shard, in order, read concurrently."""
    names = list(names)

    def rows(name: str) -> tuple[ItemResult, ...]:
        found = read_record(store, name)
        if found is None:
            raise ManifestError(
                f"{store.url(record_rel_path(name))}: record missing or unreadable; "
                "rerun `convert-dataset run` with the same config to rebuild it"
            )
        return found[0].ledger

    yield from zip(names, ordered_map(rows, names))
