"""One writer per output: a lease object (`_lease.json`) taken before a run changes anything.

    with hold_lease(store, force=False, log=print) as lease:   # in the orchestrator's run()
        ...                                                    # lease.run_id names this run

The lease is created with the store's conditional create (O_EXCL locally, `If-None-Match: *` on
S3); a store that cannot do that refuses the run instead of risking two writers. It holds owner,
host, pid, run id, start time and a heartbeat that a client-side thread renews every ttl/3 s. A
second run exits with one line naming the owner; a lease whose heartbeat is older than its ttl is
stale and `--force-unlock` takes it over (automatically when the owner's pid is provably dead on
this host). The holder alone removes debris of earlier attempts, and only what is provably dead:
staged by another run id, or older than this lease (staging names carry the run id).

Every write of the lease is conditional on the version read (`Store.replace_if`: If-Match on
S3, lock + compare locally): a renewal or takeover that raced another loses instead of
overwriting it. A heartbeat that is NaN, infinite, in the future or paired with an absurd ttl
counts as stale. Workers fence their publish with the shard task's run id (the fencing token):
it commits only while the lease still carries that id (locally under the lease's lock, so a
takeover cannot slip between the compare and the rename; on S3 by an If-Match rewrite of the
lease just before the final PUT / CompleteMultipartUpload, which leaves a window of that one
request). Staging names and run debris are this module's: the store knows neither.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Iterator

from .layout import SHARDS_DIR
from .store import PARTIAL, Guard, PreconditionFailed, StorageError, Store

LEASE = "_lease.json"
TTL = 60.0  # seconds without a heartbeat after which a lease is stale
MAX_TTL = 7 * 86400.0  # a longer ttl is absurd: the lease is treated as stale
MAX_SKEW = 60.0  # seconds a heartbeat may lie in the future (clock skew between hosts)
_STAGED = re.compile(
    r"^\.(?P<name>.+?)\.(?:r-(?P<run>[0-9A-Za-z]+)\.)?(?P<attempt>[0-9a-f]{8,32})" + re.escape(PARTIAL)
)


class LeaseError(StorageError):
    """The output is leased by another run (one line: who, since when, how to take over)."""


@dataclass(frozen=True)
class Lease:
    run_id: str
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float
    ttl: float
    token: str = field(default="", compare=False)  # the store's version of the lease object (not stored)

    def encode(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "token"}, indent=1).encode()

    @classmethod
    def decode(cls, data: bytes, token: str = "") -> "Lease":
        """Parse a lease object; anything malformed is a ValueError (treated as a stale lease)."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("lease is not a JSON object")
        return cls(
            str(raw["run_id"]),
            str(raw["owner"]),
            str(raw["host"]),
            int(raw["pid"]),
            float(raw["started"]),
            float(raw["heartbeat"]),
            float(raw["ttl"]),
            token,
        )

    def stale(self, now: float) -> bool:
        """No heartbeat within the ttl, or a heartbeat/ttl that cannot be trusted (NaN, infinite,
        in the future beyond clock skew, a ttl <= 0 or over MAX_TTL)."""
        if not (math.isfinite(self.heartbeat) and math.isfinite(self.ttl)) or not 0 < self.ttl <= MAX_TTL:
            return True
        return self.heartbeat > now + MAX_SKEW or now - self.heartbeat > self.ttl

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.started)) if math.isfinite(self.started) else "?"
        return (
            f"run {self.run_id} ({self.owner} on {self.host}, pid {self.pid}, started {started}, "
            f"last heartbeat {now - self.heartbeat:.0f} s ago)"
        )


@dataclass(frozen=True)
class Leftover:
    """Debris of a failed or killed attempt: a staged temp, an incomplete upload, an unlisted object."""

    kind: str  # "partial" | "multipart" | "unlisted"
    url: str
    detail: str = ""  # the upload id of a multipart upload
    run_id: str = ""  # the run that staged it, when its name says so
    started: float = 0.0  # unix seconds the attempt began (mtime / upload initiation); 0 = unknown
    rel: str = ""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _unreadable(token: str) -> Lease:
    return Lease("unreadable", "?", "?", -1, 0.0, 0.0, 0.0, token)


def read_lease(store: Store) -> Lease | None:
    """The current lease with its version token, None if there is none; an unreadable one comes
    back as stale (so --force-unlock can replace it)."""
    try:
        data, token = store.read_versioned(LEASE)
    except FileNotFoundError:
        return None
    try:
        return Lease.decode(data, token)
    except (ValueError, KeyError, TypeError):
        return _unreadable(token)


def _pid_dead_here(lease: Lease) -> bool:
    """True only when the owner ran on this host and its process is gone (provably dead)."""
    if lease.host != socket.gethostname() or lease.pid <= 0:
        return False
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def acquire(store: Store, run_id: str, force: bool = False, ttl: float = TTL) -> Lease:
    """Take the lease for `run_id` or raise LeaseError naming the holder and how to take over.
    A takeover is a compare-and-swap on the lease's version: of two runs taking over, one wins."""
    now = time.time()
    lease = Lease(run_id, getpass.getuser(), socket.gethostname(), os.getpid(), now, now, ttl)
    for _ in range(3):  # a holder releasing or renewing between our create and our read: try again
        if store.create_exclusive(LEASE, lease.encode()):
            return read_lease(store) or lease
        held = read_lease(store)
        if held is None:
            continue
        now = time.time()
        stale = held.stale(now)
        if _pid_dead_here(held) or (stale and force):
            token = store.replace_if(LEASE, lease.encode(), held.token)  # take over: dead or declared so
            if token is not None:
                return replace(lease, token=token)
            continue
        where = store.url(LEASE)
        if stale:
            raise LeaseError(
                f"output {store.url()} is locked by {held.describe(now)}, which looks dead "
                f"(no valid heartbeat within {held.ttl:.0f} s); if it is, rerun with --force-unlock "
                f"to take over (or delete {where})"
            )
        raise LeaseError(
            f"output {store.url()} is being written by {held.describe(now)}; wait for it to "
            f"finish, or if it was killed rerun with --force-unlock once its lease is stale "
            f"(no heartbeat for {held.ttl:.0f} s)"
        )
    raise LeaseError(
        f"output {store.url()}: could not take the lease {store.url(LEASE)} (another run keeps "
        "taking it); rerun when the other run has finished"
    )


def renew(store: Store, lease: Lease) -> Lease | None:
    """Write a fresh heartbeat by compare-and-swap on the version we hold; None if the lease
    changed under us (taken over)."""
    fresh = replace(lease, heartbeat=time.time())
    token = store.replace_if(LEASE, fresh.encode(), lease.token)
    if token is None:  # our previous renewal may have landed with its answer lost: still ours?
        held = read_lease(store)
        if held is None or (held.run_id, held.started, held.pid, held.host) != (
            lease.run_id,
            lease.started,
            lease.pid,
            lease.host,
        ):
            return None
        token = store.replace_if(LEASE, fresh.encode(), held.token)
    return None if token is None else replace(fresh, token=token)


def release(store: Store, lease: Lease) -> None:
    """Delete the lease if it is still ours (conditional on the version read: a takeover that
    lands in between is not deleted)."""
    held = read_lease(store)
    if held is not None and held.run_id == lease.run_id:
        store.delete_if(LEASE, held.token)


class _Heartbeat:
    """A daemon thread renewing the lease every ttl/3 seconds until stopped."""

    def __init__(self, store: Store, lease: Lease) -> None:
        self.store, self.lease, self.lost = store, lease, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="convert-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.lease.ttl / 3):
            try:
                renewed = renew(self.store, self.lease)
            except Exception:  # noqa: BLE001 - a failed renewal is retried; the ttl allows two misses
                continue
            if renewed is None:
                self.lost = True
                return
            self.lease = renewed

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@contextlib.contextmanager
def hold_lease(
    store: Store,
    run_id: str | None = None,
    force: bool = False,
    ttl: float = TTL,
    log: Callable[[str], None] | None = None,
) -> Iterator[Lease]:
    """Hold the output's lease for the block: acquire, clean dead attempts' debris, renew, release."""
    lease = acquire(store, run_id or new_run_id(), force, ttl)
    beat = _Heartbeat(store, lease)
    try:
        removed = clean_debris(store, keep_run=lease.run_id, since=lease.started)
        if removed and log:
            log(f"removed {len(removed)} leftovers of earlier attempts (incomplete uploads, temp files)")
        yield lease
        if beat.lost:
            raise LeaseError(
                f"output {store.url()}: this run's lease was taken over by another run "
                "(--force-unlock); its results were not published as complete"
            )
    finally:
        beat.stop()
        if not beat.lost:
            release(store, lease)


# -- worker side: stage under the task's run id, publish only while that run holds the lease ----
def current_run_id(store: Store) -> str:
    held = read_lease(store)
    return held.run_id if held is not None else ""


def staged_run_id(filename: str) -> str:
    """The run id encoded in a staging file name ('' for names of older versions)."""
    m = _STAGED.match(filename)
    return (m.group("run") or "") if m else ""


@contextlib.contextmanager
def staging(store: Store, name: str, extension: str, sidecars: Iterable[str] = (), run_id: str = "") -> Iterator[str]:
    """A local temp path unique to this attempt, named with the task's run id (so cleanup can tell
    whose it is): inside shards/ when the store publishes by rename (same filesystem), else in a
    private temp folder. Removed afterwards with the format's `sidecars` (e.g. LMDB's "-lock")."""
    local = store.local_path(SHARDS_DIR) if store.supports_rename else None
    if local is not None:
        os.makedirs(local, exist_ok=True)
    folder = local or tempfile.mkdtemp(prefix="convert-")
    tag = f"r-{run_id}." if run_id else ""
    tmp = os.path.join(folder, f".{name}.{tag}{uuid.uuid4().hex[:12]}{PARTIAL}{extension}")
    try:
        yield tmp
    finally:
        for path in [tmp, *(tmp + suffix for suffix in sidecars)]:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        if local is None:
            shutil.rmtree(folder, ignore_errors=True)


def _carries(run_id: str) -> Callable[[bytes], bool]:
    def holds(data: bytes) -> bool:
        try:
            return Lease.decode(data).run_id == run_id
        except (ValueError, KeyError, TypeError):
            return False

    return holds


def publish(store: Store, tmp: str, rel: str, size: int, sha256: str | None = None, run_id: str = "") -> None:
    """store.publish, committed only while the lease carries `run_id`, the fencing token the shard
    task was planned under (a leftover task of an earlier run must not publish into a newer one).
    The check is the store's conditional write: locally lock + compare + rename, on S3 an If-Match
    rewrite of the lease right before the commit."""
    token = run_id or staged_run_id(os.path.basename(tmp))
    if not token:
        store.publish(tmp, rel, size, sha256)
        return
    try:
        store.publish(tmp, rel, size, sha256, guard=Guard(LEASE, _carries(token)))
    except PreconditionFailed:
        raise LeaseError(
            f"{store.url(rel)}: not published, the output's lease moved from run {token} "
            "to another run (--force-unlock); this attempt is discarded"
        ) from None


# -- debris of dead attempts: staged temps under shards/ and incomplete uploads ----------------
def debris(store: Store) -> list[Leftover]:
    """Staged temps under shards/ (with the run id their name carries) and incomplete uploads."""
    found = [
        Leftover("multipart", store.url(rel), upload, started=started, rel=rel)
        for rel, upload, started in store.incomplete_uploads()
    ]
    for entry in store.list(SHARDS_DIR):
        if PARTIAL in entry.name:
            found.append(
                Leftover(
                    "partial",
                    store.url(entry.rel),
                    "",
                    staged_run_id(entry.name),
                    max(entry.mtime_ns, 0) / 1e9,
                    entry.rel,
                )
            )
    return found


def remove_debris(store: Store, item: Leftover) -> None:
    if item.kind == "multipart":
        store.abort_upload(item.rel, item.detail)
    else:
        store.delete_tree(item.rel or item.url[len(store.url()) + 1 :])


def clean_debris(store: Store, keep_run: str = "", since: float = float("inf")) -> list[Leftover]:
    """Remove debris that is provably dead: staged by another run than `keep_run`, or started
    before `since` (the lease's start). Returns what was removed."""
    removed = []
    for item in debris(store):
        if not keep_run or item.run_id != keep_run or item.started < since:
            remove_debris(store, item)
            removed.append(item)
    return removed
