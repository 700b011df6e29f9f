"""The shard task's execution: `process_shard(task)` is the one function Dask runs.

The task (convert.task.ShardTask) arrives fully decided on the client: the source kind, a fetch
policy per input slice, the output and every format option, the kept columns, the fingerprint and
the run id that fences publishing. Nothing here re-derives any of it from a config.

Fetch (bounded async prefetch, in memory) -> decode/transform -> write in batches to a temp file
unique to this attempt -> close, re-open and count -> hash -> publish -> write the record. Item
failures become ledger rows; anything that breaks the shard itself raises, and the orchestrator
retries the whole shard.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pickle
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import numpy as np

from .fetch import CurlStream, Fetched, fetch_bytes, prefetch, scheme_of
from .fetch.dispatch import has_control
from .fetch.netguard import PrivateAddressError, PrivateNetworkRefused
from .fetch.policy import FetchPolicy
from .formats.base import Sample, ShardInfo, ShardWriter, get_format, open_reader, open_writer
from .itemcols import ItemColumns, unfit_value
from .lease import publish, staging
from .mute import muted
from .records import shard_rel_path, write_record
from .redact import redact_url
from .secrets import resolve_options
from .sources import SourceError, read_member, shard_refs
from .specs import ItemError, ItemRef, ItemResult, ShardRecord, ShardSpec, Status
from .store import StorageError, file_digest, open_store
from .task import ShardTask
from .timing import StageClock, timed_fetch
from .transform import SourceFacts, output_shape, transform

EARLY_REFUSALS = 8  # a shard whose first items are all refused as private addresses stops at once
WRITE_BATCH = 64  # samples per writer call: amortises HDF5/LMDB overhead, bounds buffered pixels


class ShardError(RuntimeError):
    """The shard as a whole failed (the orchestrator retries it)."""


class OutputError(StorageError):
    """The output cannot be written (disk full, no permission): every shard would fail the same
    way, so the orchestrator stops the run and shows this one line."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")


def _errno_of(exc: BaseException | None) -> int | None:
    """The errno of an exception or of one it was raised from / during (h5py puts it in the text)."""
    while exc is not None:
        code = getattr(exc, "errno", None)
        if code is None:
            found = _ERRNO_IN_TEXT.search(str(exc))
            code = int(found.group(1)) if found else None
        if code is not None:
            return code
        exc = exc.__cause__ or exc.__context__
    return None


def output_error(exc: BaseException, spec: ShardSpec, uri: str) -> OutputError | None:
    """A one-line OutputError naming the output and the fix for disk-full / permission errors."""
    code = _errno_of(exc)
    where = f"output {redact_url(uri)}: {os.strerror(code) if code else ''} while writing {spec.name}"
    if code in _NO_SPACE:
        return OutputError(f"{where}; free space there or set output.uri to a volume with room, then rerun to resume")
    if code in _NO_ACCESS:
        return OutputError(f"{where}; make it writable for this user (uid {os.getuid()}) or choose another output.uri")
    return None


def load_item(ref: ItemRef, policies: tuple[FetchPolicy, ...]) -> bytes | np.ndarray:
    """Bytes (or decoded pixels for records inside a container file) of one item, in memory,
    fetched under the policy of the slice it was read from."""
    policy = policies[ref.slice]
    if ref.member is not None:
        return read_member(ref.uri, ref.member, policy.storage_options)
    return fetch_bytes(ref.uri, policy)


def _size_of(value: Any) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else len(value)


def _examine(
    ref: ItemRef, value: Any, error: BaseException | None, task: ShardTask, cols: ItemColumns, clock: StageClock
) -> tuple[ItemResult, Any, str]:
    """One item: fetched value (or fetch error) -> ledger row (with the source's size, format, byte
    count and digest as far as they are known), the data to store if ok (else None) and the digest.
    Thread-safe (no shared counters), so grouped local reads run it on the prefetch pool."""
    facts = SourceFacts()
    nbytes = -1 if error is not None or value is None else _size_of(value)
    digest = ""
    try:
        cols.check(ref)  # an unusable list row says so, not the fetch of its missing URL
        if error is not None:
            raise error
        digest = cols.digest(ref, value)
        data = transform(value, task.items.image, clock, facts)
    except ItemError as exc:
        status, message, data = exc.status, exc.message, None
    except Exception as exc:  # an unexpected per-item failure must not sink the other items
        status, message, data = Status.ERROR, f"{type(exc).__name__}: {exc}", None
    else:
        status, message = Status.OK, ""
    row = ItemResult(
        ref.key, ref.uri, ref.label, status, message, facts.width, facts.height, facts.format, nbytes, digest
    )
    return row, data, digest


def _check_refused(spec: ShardSpec, index: int, refused: int, error: BaseException | None) -> int:
    """Count leading private-address refusals; all of the first EARLY_REFUSALS items refused stops
    the shard with one line naming fetch.allow_private_networks (PrivateNetworkRefused)."""
    if refused == index < EARLY_REFUSALS and isinstance(error, PrivateAddressError):
        refused += 1
        if refused == min(EARLY_REFUSALS, len(spec)):
            raise PrivateNetworkRefused(f"{spec.name}: its first {refused} items were refused: {error}")
    return refused


def _unique_keys(refs: Iterator[ItemRef], spec: ShardSpec) -> Iterator[ItemRef]:
    """The shard's refs, refusing a key seen twice (the planner guarantees uniqueness across shards)."""
    seen: set[str] = set()
    for ref in refs:
        if ref.key in seen:
            raise ShardError(f"{spec.name}: key {ref.key!r} occurs twice; every item needs a distinct key")
        seen.add(ref.key)
        yield ref


def _unexpected(spec: ShardSpec, ref: ItemRef, error: BaseException | None, row: ItemResult) -> ShardError | None:
    """A ShardError for a failure that is not a fact about the input, else None.

    Fetchers and transforms report bad input as ItemError (transforms never with status `error`);
    anything else (a bug, an import race, a full disk) must fail and retry the shard rather than be
    committed as a final item status. A list value its column cannot hold is a fact about the input.
    """
    if error is not None and not isinstance(error, ItemError):
        return ShardError(f"{spec.name}: {ref.key}: {type(error).__name__}: {error}")
    if error is None and row.status is Status.ERROR and unfit_value(ref) is None:
        return ShardError(f"{spec.name}: {ref.key}: {row.error}")
    return None


def _http_url(ref: ItemRef, policy: FetchPolicy) -> str | None:
    """The URL libcurl should fetch for `ref`, or None for items read another way."""
    uri = ref.uri
    if ref.member is not None or uri[:4].lower() != "http" or has_control(uri):
        return None  # (a control character: fetch_bytes refuses it as bad_url)
    scheme = scheme_of(uri)
    return uri if scheme in ("http", "https") and scheme in policy.allowed_schemes else None


FETCH_GROUP = 8  # cached local items per prefetch task: one thread hand-off per group, not per item
DECODE_THREADS = 2  # grouped local reads: threads per shard that read + decode + resize (the GIL is released)


def _fetch_stream(refs: Iterator[ItemRef], task: ShardTask, cols: ItemColumns, clock: StageClock) -> tuple[Any, bool]:
    """The shard's items fetched ahead, in order, the way the task says (ItemPlan.fetch), and whether
    they arrive examined. "curl" = HTTP(S) on libcurl driven from this thread (no per-item thread
    hand-off), other items on a small pool; "threads" = one item per prefetch thread (GETs take
    milliseconds and may hang until item_timeout, so keep `depth` in flight); both yield fetched
    bytes. "grouped" = FETCH_GROUP cached local files per task, read *and examined* (decode, resize)
    on DECODE_THREADS threads, so this thread only writes: local reads are CPU-bound, and one
    converting thread per process left a core idle while it decoded."""
    policies, items = task.policies, task.items
    fetch_one = timed_fetch(clock, lambda ref: load_item(cast(ItemRef, ref), policies))
    depth, budget = items.depth, items.prefetch_bytes
    if items.fetch == "curl":
        return CurlStream(
            refs,
            lambda ref: _http_url(ref, policies[ref.slice]),
            fetch_one,
            policies[0],
            depth=depth,
            max_bytes=budget,
            size_of=_size_of,
            on_done=lambda ns: clock.add("fetch", ns),
        ), False
    if items.fetch == "threads":
        return prefetch(refs, fetch_one, depth=depth, max_bytes=budget, size_of=_size_of), False
    examine = functools.partial(_examine_group, fetch=fetch_one, task=task, cols=cols, clock=clock)
    groups = prefetch(
        _groups(refs), examine, depth=max(2, depth // 2), max_bytes=budget, size_of=_group_size, threads=DECODE_THREADS
    )
    return _Ungrouped(groups), True


def _groups(refs: Iterator[ItemRef]) -> Iterator[list[ItemRef]]:
    group: list[ItemRef] = []
    for ref in refs:
        group.append(ref)
        if len(group) == FETCH_GROUP:
            yield group
            group = []
    if group:
        yield group


def _examine_group(
    group: list[ItemRef], fetch: Any, task: ShardTask, cols: ItemColumns, clock: StageClock
) -> list[Fetched]:
    """Read and examine each item of a group in turn (one source's bytes held at a time): Fetched(ref,
    (row, data, digest), fetch error), per-item failures as values; the CPU of examining goes to
    `convert_cpu`, the reads' to `fetch`/`fetch_cpu` (timed_fetch)."""
    out = []
    for ref in group:
        try:
            value, error = fetch(ref), None
        except Exception as exc:  # noqa: BLE001 - KeyboardInterrupt/SystemExit still propagate
            value, error = None, exc
        cpu = time.thread_time_ns()
        out.append(Fetched(ref, _examine(ref, value, error, task, cols, clock), error))
        clock.add("convert_cpu", time.thread_time_ns() - cpu)
    return out


def _group_size(group: list[Fetched]) -> int:
    """Bytes a finished group holds: its stored data (the source bytes are dropped once examined)."""
    return sum(_size_of(f.value[1]) for f in group if f.value is not None and f.value[1] is not None)


class _Ungrouped:
    """The items of a prefetched stream of groups, one by one (and `close` passed through)."""

    def __init__(self, groups: Any) -> None:
        self._groups = groups

    def __iter__(self) -> Iterator[Fetched]:
        for fetched in self._groups:
            if fetched.error is not None:  # the group task itself failed (a bug, not an item)
                raise fetched.error
            yield from fetched.value

    def close(self) -> None:
        self._groups.close()


def _fill(writer: ShardWriter, task: ShardTask, clock: StageClock, cols: ItemColumns) -> list[ItemResult]:
    """Stream every item of the shard through fetch -> examine -> writer; returns the ledger rows."""
    spec, columns = task.spec, task.items.columns
    ledger: list[ItemResult] = []
    batch: list[Sample] = []
    refs = shard_refs(spec, task.source_options, task.work_options, on_unfit="keep")  # such an item fails alone
    fetched_items, examined = _fetch_stream(_unique_keys(refs, spec), task, cols, clock)
    cpu, refused = time.thread_time_ns(), 0
    try:
        t = clock.now()
        for i, fetched in enumerate(fetched_items):
            t = clock.lap("wait", t)
            ref, error = fetched.item, fetched.error
            refused = _check_refused(spec, i, refused, error)
            row, data, digest = fetched.value if examined else _examine(ref, fetched.value, error, task, cols, clock)
            unexpected = _unexpected(spec, ref, error, row)
            if unexpected is not None:
                raise unexpected from error
            safe_uri = redact_url(row.uri)  # never store credentials given in a URL
            ledger.append(row if safe_uri == row.uri else replace(row, uri=safe_uri))
            if data is not None:
                batch.append(Sample(ref.key, ref.label, data, cols.values(ref, digest) if columns else ()))
            if len(batch) >= WRITE_BATCH:
                clock.timed("write", writer.write_batch, batch)
                batch = []
            t = clock.now()
    finally:
        fetched_items.close()
    if batch:
        clock.timed("write", writer.write_batch, batch)
    inline = getattr(fetched_items, "inline_cpu_ns", 0)  # libcurl driven from this thread
    clock.add("fetch_cpu", inline)
    clock.add("convert_cpu", time.thread_time_ns() - cpu - inline)  # this thread's CPU over decode..write
    if len(ledger) != len(spec):
        raise ShardError(
            f"{spec.name}: read {len(ledger)} items but the plan has {len(spec)}; "
            "the input changed since planning - rerun the same command to plan again"
        )
    return ledger


def shard_info(task: ShardTask) -> ShardInfo:
    """What the writer is told up front: all of it decided on the client (format options included)."""
    image, options = task.items.image, task.output.options
    return ShardInfo(
        name=task.name,
        encoding=image.encode,
        image_shape=output_shape(image),
        expected_count=len(task),
        attrs={
            "shard": task.name,
            "fingerprint": task.fingerprint,
            "image": image.model_dump(mode="json"),
            "format_options": dict(options),
        },
        compression=str(options.get("compression", "none")),
        compression_level=int(options.get("compression_level", 4)),
        columns=task.items.columns,
        options=dict(options),
    )


def _resolved(task: ShardTask) -> ShardTask:
    """The task with its storage-option secrets resolved here, in the worker (convert.secrets):
    from this process's environment and the secrets the executor shared with it."""
    policies = tuple(
        replace(p, storage_options=resolve_options(p.storage_options, "source.storage_options")) for p in task.policies
    )
    out = replace(task.output, storage_options=resolve_options(task.output.storage_options, "output.storage_options"))
    return replace(
        task,
        policies=policies,
        output=out,
        source_options=resolve_options(task.source_options, "source.storage_options"),
        work_options=resolve_options(task.work_options, "output.storage_options"),
    )


def process_shard(task: ShardTask) -> ShardRecord:
    """Convert one shard end to end and commit it; returns its record (no image data).

    `task` arrives with storage-option secrets as references; they are resolved here.
    """
    started = time.time()
    task = _resolved(task)
    out = open_store(task.output.uri, task.output.storage_options)
    fmt = get_format(task.output.format)
    try:
        return _commit_shard(task, out, fmt, shard_info(task), started)
    except (OSError, RuntimeError) as exc:  # h5py reports write failures as RuntimeError
        failure = output_error(exc, task.spec, task.output.uri)
        if failure is None:
            raise
        raise failure from None


def process_batch(tasks: tuple[ShardTask, ...]) -> tuple[ShardRecord | Exception, ...]:
    """Several tiny shards in one engine task (convert.submit groups them), each converted and
    committed by process_shard, in turn. A shard that raises is returned as its exception, so the
    batch's other shards stand and the client retries that one alone; a failure every later shard
    would share (the output not writable, private addresses refused) ends the batch there."""
    outcomes: list[ShardRecord | Exception] = []
    for task in tasks:
        try:
            outcomes.append(process_shard(task))
        except Exception as exc:  # noqa: BLE001 - a per-shard failure, reported as that shard's outcome
            outcomes.append(_portable(exc))
            if isinstance(exc, (StorageError, PrivateNetworkRefused)):
                break
    return tuple(outcomes)


def _portable(exc: Exception) -> Exception:
    """`exc` if the engine can ship it back to the client, else a ShardError with its one line."""
    try:
        pickle.dumps(exc)  # (serialising our own exception object; nothing is ever unpickled here)
    except Exception:  # noqa: BLE001 - any reason it cannot travel
        return ShardError(f"{type(exc).__name__}: {exc}")
    return exc


def _abort(writer: ShardWriter) -> None:
    """Drop a failed writer; its own errors must not hide the first one."""
    with muted(), contextlib.suppress(Exception):
        writer.abort()


def _commit_shard(task: ShardTask, out: Any, fmt: Any, info: ShardInfo, started: float) -> ShardRecord:
    """Write, re-open and count, hash, publish (fenced by the task's run id), then write the record."""
    spec = task.spec
    rel, clock, cols = shard_rel_path(spec.name, fmt.extension), StageClock(), ItemColumns(task.items)
    with staging(out, spec.name, fmt.extension, fmt.sidecars, run_id=task.run_id) as tmp:
        writer = open_writer(fmt.name, tmp, info)
        try:
            ledger = _fill(writer, task, clock, cols)
            with muted():
                clock.timed("write", writer.close)
        except SourceError as exc:  # the slice cannot be read as planned: fail (and retry) the shard
            _abort(writer)
            raise ShardError(f"{spec.name}: {exc}") from None
        except BaseException:
            _abort(writer)
            raise
        ok = sum(row.ok for row in ledger)
        stored, shape = clock.timed("verify", _stored, fmt.name, tmp)
        if stored != ok:
            raise ShardError(f"{spec.name}: wrote {ok} images but the re-opened shard holds {stored}")
        size, digest = clock.timed("hash", file_digest, tmp)
        clock.timed("commit", publish, out, tmp, rel, size, digest, task.run_id)
    record = ShardRecord(
        name=spec.name,
        path=rel,
        format=fmt.name,
        count=len(spec),
        ok=ok,
        failed=len(spec) - ok,
        bytes=size,
        sha256=digest,
        image_shape=shape,
        encoding=info.encoding,
        ledger=tuple(ledger),
        stages=clock.seconds(),
        started=started,
        finished=time.time(),
        counters=cols.counters(),
        columns=info.columns,
    )
    identity = write_record(out, record, task.fingerprint)
    return replace(record, identity=identity)


def _stored(fmt: str, path: str) -> tuple[int, tuple[int, ...] | None]:
    """(images, fixed image shape or None) of the shard as re-opened: a `resize: none` shard whose
    images all have one size is stored in the fixed layout, which the record must say."""
    reader = open_reader(fmt, path)
    try:
        return len(reader), reader.image_shape
    finally:
        reader.close()
