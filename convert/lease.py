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

Workers fence their publish: a shard staged under run A is not published once the lease names
another run (a run that was taken over cannot overwrite the new run's shards).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

from .store import StorageError, Store
from .store.base import staged_run_id

LEASE = "_lease.json"
TTL = 60.0  # seconds without a heartbeat after which a lease is stale


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

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Lease":
        """Parse a lease object; anything malformed is a ValueError (treated as a stale lease)."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("lease is not a JSON object")
        lease = cls(str(raw["run_id"]), str(raw["owner"]), str(raw["host"]), int(raw["pid"]),
                    float(raw["started"]), float(raw["heartbeat"]), float(raw["ttl"]))  # fmt: skip
        return lease

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.started))
        return (f"run {self.run_id} ({self.owner} on {self.host}, pid {self.pid}, started {started}, "
                f"last heartbeat {now - self.heartbeat:.0f} s ago)")  # fmt: skip


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_lease(store: Store) -> Lease | None:
    """The current lease, None if there is none; an unreadable one comes back as stale."""
    try:
        data = store.read_bytes(LEASE)
    except FileNotFoundError:
        return None
    try:
        return Lease.decode(data)
    except (ValueError, KeyError, TypeError):
        return Lease("unreadable", "?", "?", -1, 0.0, 0.0, 0.0)


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
    """Take the lease for `run_id` or raise LeaseError naming the holder and how to take over."""
    now = time.time()
    lease = Lease(run_id, getpass.getuser(), socket.gethostname(), os.getpid(), now, now, ttl)
    for _ in range(3):  # a holder releasing between our create and our read: try again
        if store.create_exclusive(LEASE, lease.encode()):
            return lease
        held = read_lease(store)
        if held is None:
            continue
        now = time.time()
        stale = now - held.heartbeat > held.ttl
        if _pid_dead_here(held) or (stale and force):
            store.delete(LEASE)  # take over: the holder is dead (or declared so with --force-unlock)
            continue
        where = store.url(LEASE)
        if stale:
            raise LeaseError(f"output {store.url()} is locked by {held.describe(now)}, which looks dead "
                             f"(no heartbeat for over {held.ttl:.0f} s); if it is, rerun with --force-unlock "
                             f"to take over (or delete {where})")  # fmt: skip
        raise LeaseError(f"output {store.url()} is being written by {held.describe(now)}; wait for it to "
                         f"finish, or if it was killed rerun with --force-unlock once its lease is stale "
                         f"(no heartbeat for {held.ttl:.0f} s)")  # fmt: skip
    raise LeaseError(f"output {store.url()}: could not take the lease {store.url(LEASE)} (another run keeps "
                     "taking it); rerun when the other run has finished")  # fmt: skip


def renew(store: Store, lease: Lease) -> Lease | None:
    """Write a fresh heartbeat; None if the lease is no longer ours (taken over)."""
    held = read_lease(store)
    if held is None or held.run_id != lease.run_id:
        return None
    fresh = Lease(**{**asdict(lease), "heartbeat": time.time()})
    store.write_bytes(LEASE, fresh.encode())
    return fresh


def release(store: Store, lease: Lease) -> None:
    """Delete the lease if it is still ours."""
    held = read_lease(store)
    if held is not None and held.run_id == lease.run_id:
        store.delete(LEASE)


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
def hold_lease(store: Store, run_id: str | None = None, force: bool = False, ttl: float = TTL,
               log: Callable[[str], None] | None = None) -> Iterator[Lease]:  # fmt: skip
    """Hold the output's lease for the block: acquire, clean dead attempts' debris, renew, release."""
    lease = acquire(store, run_id or new_run_id(), force, ttl)
    beat = _Heartbeat(store, lease)
    try:
        removed = store.clean_leftovers(keep_run=lease.run_id, since=lease.started)
        if removed and log:
            log(f"removed {len(removed)} leftovers of earlier attempts (incomplete uploads, temp files)")
        yield lease
        if beat.lost:
            raise LeaseError(f"output {store.url()}: this run's lease was taken over by another run "
                             "(--force-unlock); its results were not published as complete")  # fmt: skip
    finally:
        beat.stop()
        if not beat.lost:
            release(store, lease)


# -- worker side: stage under the current run id, publish only while that run holds the lease ----
def current_run_id(store: Store) -> str:
    held = read_lease(store)
    return held.run_id if held is not None else ""


@contextlib.contextmanager
def staging(store: Store, name: str, extension: str, sidecars: Iterable[str] = (), run_id: str = "") -> Iterator[str]:
    """store.staging named with the task's run id (so cleanup can tell whose it is)."""
    with store.staging(name, extension, run_id, sidecars) as tmp:
        yield tmp


def publish(store: Store, tmp: str, rel: str, size: int, sha256: str | None = None, run_id: str = "") -> None:
    """store.publish, refused unless the lease still carries `run_id`, the fencing token the shard
    task was planned under (a leftover task of an earlier run must not publish into a newer one)."""
    staged = run_id or staged_run_id(os.path.basename(tmp))
    if staged and current_run_id(store) != staged:
        raise LeaseError(f"{store.url(rel)}: not published, the output's lease moved from run {staged} "
                         "to another run (--force-unlock); this attempt is discarded")  # fmt: skip
    store.publish(tmp, rel, size, sha256)

