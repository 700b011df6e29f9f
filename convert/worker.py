"""The shard task: `process_shard(spec, config)` is the one function Dask runs.

Fetch (bounded async prefetch, in memory) -> decode/transform -> write in batches to a temp file
unique to this attempt -> close, re-open and count -> hash -> publish -> write the record. Item
failures become ledger rows; anything that breaks the shard itself raises, and the orchestrator
retries the whole shard.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .config import Config
from .fetch import fetch_bytes, prefetch
from .fetch.netguard import PrivateAddressError, PrivateNetworkRefused
from .fetch.policy import FetchPolicy
from .formats.base import Sample, ShardInfo, ShardWriter, get_format, open_reader, open_writer
from .manifest import shard_rel_path, write_record
from .plan import fingerprint, output_settings
from .secrets import resolve_config
from .sources import detect_kind, read_member
from .specs import ItemError, ItemRef, ItemResult, ShardRecord, ShardSpec, Status
from .store import file_digest, open_store
from .timing import StageClock, timed_fetch
from .transform import SourceFacts, output_shape, transform

EARLY_REFUSALS = 8  # a shard whose first items are all refused as private addresses stops at once
WRITE_BATCH = 64  # samples per writer call: amortises HDF5/LMDB overhead, bounds buffered pixels


class ShardError(RuntimeError):
    """The shard as a whole failed (the orchestrator retries it)."""


def load_item(ref: ItemRef, policy: FetchPolicy) -> bytes | np.ndarray:
    """Bytes (or decoded pixels for records inside a container file) of one item, in memory."""
    if ref.member is not None:
        return read_member(ref.uri, ref.member, policy.storage_options)
    return fetch_bytes(ref.uri, policy)


def _size_of(value: Any) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else len(value)


def _convert(
    ref: ItemRef, value: Any, error: BaseException | None, config: Config, clock: StageClock
) -> tuple[ItemResult, Sample | None]:
    """One item: fetched value (or fetch error) -> ledger row (with the source's size, format and
    byte count as far as they are known) and, if ok, the sample to store."""
    facts = SourceFacts()
    nbytes = -1 if error is not None or value is None else _size_of(value)
    try:
        if error is not None:
            raise error
        data = transform(value, config.image, clock, facts)
    except ItemError as exc:
        status, message, data = exc.status, exc.message, None
    except Exception as exc:  # an unexpected per-item failure must not sink the other items
        status, message, data = Status.ERROR, f"{type(exc).__name__}: {exc}", None
    else:
        status, message = Status.OK, ""
    row = ItemResult(ref.key, ref.uri, ref.label, status, message, facts.width, facts.height, facts.format, nbytes)
    return row, (None if data is None else Sample(ref.key, ref.label, data))


def _fill(writer: ShardWriter, spec: ShardSpec, config: Config, clock: StageClock) -> list[ItemResult]:
    """Stream every item of the shard through fetch -> transform -> writer; returns the ledger rows."""
    source = config.source
    policy = config.fetch.policy(source, detect_kind(source.uri) if source.kind == "auto" else source.kind)
    ledger: list[ItemResult] = []
    batch: list[Sample] = []
    fetched_items = prefetch(
        spec.items,
        timed_fetch(clock, lambda ref: load_item(ref, policy)),
        depth=config.fetch.threads,
        max_bytes=config.fetch.prefetch_bytes,
        size_of=_size_of,
    )
    cpu, refused = time.thread_time_ns(), 0
    try:
        t = clock.now()
        for i, fetched in enumerate(fetched_items):
            t = clock.lap("wait", t)
            if refused == i < EARLY_REFUSALS and isinstance(fetched.error, PrivateAddressError):
                refused += 1
                if refused == min(EARLY_REFUSALS, len(spec)):
                    raise PrivateNetworkRefused(f"{spec.name}: its first {refused} items were refused: {fetched.error}")
            row, sample = _convert(fetched.item, fetched.value, fetched.error, config, clock)
            ledger.append(row)
            if sample is not None:
                batch.append(sample)
            if len(batch) >= WRITE_BATCH:
                clock.timed("write", writer.write_batch, batch)
                batch = []
            t = clock.now()
    finally:
        fetched_items.close()
    if batch:
        clock.timed("write", writer.write_batch, batch)
    clock.add("convert_cpu", time.thread_time_ns() - cpu)  # this thread's CPU over decode..write
    return ledger


def _stored_count(fmt: str, path: str) -> int:
    reader = open_reader(fmt, path)
    try:
        return len(reader)
    finally:
        reader.close()


def shard_info(spec: ShardSpec, config: Config, fp: str) -> ShardInfo:
    shape = output_shape(config.image)
    return ShardInfo(
        name=spec.name,
        encoding=config.image.encode,
        image_shape=shape,
        expected_count=len(spec),
        attrs={"shard": spec.name, "fingerprint": fp, "image": config.image.model_dump(mode="json")},
        compression=config.output.compression,
        compression_level=config.output.compression_level,
    )


def process_shard(spec: ShardSpec, config: Config) -> ShardRecord:
    """Convert one shard end to end and commit it; returns its record (no image data).

    `config` arrives with storage-option secrets as references; they are resolved here, in the
    worker, from its environment and the secrets shared with it (see convert.secrets).
    """
    started, clock = time.time(), StageClock()
    config = resolve_config(config)
    out = open_store(config.output.uri, config.output.storage_options)
    fmt = get_format(config.output.format)
    fp = fingerprint(spec, output_settings(config.redacted()))
    info = shard_info(spec, config, fp)
    rel = shard_rel_path(spec.name, fmt.extension)
    with out.staging(spec.name, fmt.extension) as tmp:
        writer = open_writer(fmt.name, tmp, info)
        try:
            ledger = _fill(writer, spec, config, clock)
            clock.timed("write", writer.close)
        except BaseException:
            writer.abort()
            raise
        ok = sum(row.ok for row in ledger)
        stored = clock.timed("verify", _stored_count, fmt.name, tmp)
        if stored != ok:
            raise ShardError(f"{spec.name}: wrote {ok} images but the re-opened shard holds {stored}")
        size, digest = clock.timed("hash", file_digest, tmp)
        clock.timed("commit", out.publish, tmp, rel, size, digest)
    record = ShardRecord(
        name=spec.name, path=rel, format=fmt.name, count=len(spec), ok=ok, failed=len(spec) - ok,
        bytes=size, sha256=digest, image_shape=info.image_shape, encoding=info.encoding, ledger=tuple(ledger),
        stages=clock.seconds(), started=started, finished=time.time(),
    )  # fmt: skip
    write_record(out, record, fp)
    return record
