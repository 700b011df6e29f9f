"""Orchestration: list -> plan -> skip committed shards -> one Dask task per shard -> manifest.

Tasks return `ShardRecord`s (counts, checksum, ledger rows), never image data. A shard task that
raises is retried `cluster.task_retries` times by Dask; a worker death is re-run by the scheduler
and ends as `KilledWorker` after its allowed failures. Either way the shard is reported as failed
and every other shard still completes. Progress lives only in the output's shard records, so a
killed client just reruns the same config.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .cluster import check_reachable_paths, open_client
from .config import Config
from .manifest import LEDGER, MANIFEST, PLAN, committed_records, write_manifest, write_plan
from .plan import fingerprint, output_settings, plan_shards
from .secrets import resolve_config, seal_config, share_secrets
from .sources import SourceListing, list_source
from .specs import ItemResult, ShardRecord, ShardSpec, Status
from .store import SHARDS_DIR, Store, open_store, preflight
from .worker import process_shard


@dataclass
class RunSummary:
    output: str
    shards: int = 0
    skipped: int = 0  # already committed by an earlier run
    converted: int = 0
    failed_shards: dict[str, str] = field(default_factory=dict)  # name -> error
    by_status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    cluster: str = ""
    dashboard: str | None = None

    @property
    def items_ok(self) -> int:
        return self.by_status.get(Status.OK.value, 0)

    @property
    def items_failed(self) -> int:
        return sum(self.by_status.values()) - self.items_ok

    @property
    def images_per_second(self) -> float:
        return self.items_ok / self.seconds if self.seconds > 0 else 0.0

    def exit_code(self, fail_on_item_errors: bool = False) -> int:
        if self.failed_shards:
            return 1
        if fail_on_item_errors and self.items_failed:
            return 3
        return 0


ProgressHook = Callable[[str, int, int], None]  # (event, done, total)


def describe_error(exc: BaseException) -> str:
    """One line: exception type and first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _failed_rows(spec: ShardSpec, error: str) -> tuple[ItemResult, ...]:
    return tuple(ItemResult(r.key, r.uri, r.label, Status.SHARD_FAILED, error) for r in spec.items)


def _reset_output(out: Store) -> None:
    """--overwrite: drop the old manifest, ledger and shards before converting again."""
    for rel in (MANIFEST, LEDGER, PLAN, SHARDS_DIR):
        out.delete_tree(rel)


def run(config: Config, on_progress: ProgressHook | None = None, log: Callable[[str], None] = print) -> RunSummary:
    """Convert the configured source into a verified dataset; returns the summary."""
    start = time.perf_counter()
    config = config.with_absolute_paths()
    local = resolve_config(config)  # this process's own view, secrets resolved
    out = preflight(local.output.uri, local.output.storage_options, "output")
    listing = _list(local)
    specs = plan_shards(listing.items, config.shard.size)
    config_data = config.redacted()
    if config.run.overwrite:
        _reset_output(out)
    fps = {s.name: fingerprint(s, output_settings(config_data)) for s in specs}
    records: dict[str, ShardRecord] = committed_records(out, fps)
    pending = [s for s in specs if s.name not in records]
    summary = RunSummary(output=out.url(""), shards=len(specs), skipped=len(records))
    log(f"{len(listing.items)} items from {listing.kind} source -> {len(specs)} shards "
        f"({len(records)} already committed, {len(pending)} to convert)")  # fmt: skip
    if pending:
        _prepare_output(out, specs, fps, log)
        _convert_pending(config, pending, records, summary, on_progress, log)
    ordered = [records[s.name] for s in specs if s.name in records]
    failed_rows = [row for s in specs if s.name in summary.failed_shards
                   for row in _failed_rows(s, summary.failed_shards[s.name])]  # fmt: skip
    counts = Counter(row.status.value for r in ordered for row in r.ledger)
    counts.update(row.status.value for row in failed_rows)
    summary.by_status = dict(counts)
    write_manifest(out, ordered, config_data, listing.label_names, listing.kind,
                   failed=summary.failed_shards, failed_rows=failed_rows)  # fmt: skip
    summary.seconds = time.perf_counter() - start
    return summary


def _prepare_output(out: Store, specs: list[ShardSpec], fps: dict[str, str], log: Callable[[str], None]) -> None:
    """Before shards change: retract the manifest, clear debris of killed attempts, record the plan."""
    out.delete(MANIFEST)  # readers must not trust a manifest while shards change
    removed = out.clean_leftovers()  # incomplete uploads / temps of earlier killed attempts
    if removed:
        log(f"removed {len(removed)} leftovers of earlier attempts (incomplete uploads, temp files)")
    write_plan(out, specs, fps)


def _convert_pending(config: Config, pending: list[ShardSpec], records: dict[str, ShardRecord],
                     summary: RunSummary, on_progress: ProgressHook | None, log: Callable[[str], None]) -> None:  # fmt: skip
    """Run the pending shards on the configured cluster; fills `records` and the summary."""
    shipped, secrets = seal_config(config)  # what workers get: secrets only as references
    with open_client(config.cluster, job_name="convert") as handle:
        check_reachable_paths([config.source.uri, config.output.uri], handle)
        summary.cluster, summary.dashboard = handle.description, handle.dashboard_link
        log(f"cluster: {handle.description}" + (f"  dashboard: {handle.dashboard_link}" if handle.dashboard_link else ""))
        if handle.job_ids:
            log(f"batch jobs: {' '.join(handle.job_ids)}")
        with share_secrets(handle.client, secrets):
            _execute(handle.client, pending, shipped, records, summary.failed_shards, on_progress)
    summary.converted = len(pending) - len(summary.failed_shards)


def _list(config: Config) -> SourceListing:
    """List the source once, here; storage failures become one-line errors naming the source."""
    try:
        return list_source(config.source)
    except OSError:  # PermissionError "Forbidden", endpoint errors: say which bucket and what to fix
        preflight(config.source.uri, config.source.storage_options, "source")
        raise


def _execute(client, pending, config, records, failed, on_progress) -> None:  # type: ignore[no-untyped-def]
    """Submit one task per pending shard and collect records/failures as they complete."""
    from distributed import as_completed

    token = str(time.time_ns())
    futures = client.map(
        process_shard,
        pending,
        config=config,
        key=[f"{s.name}-{token}" for s in pending],
        retries=config.cluster.task_retries,
        pure=False,
    )
    names = {f.key: s.name for f, s in zip(futures, pending)}
    total = len(pending)
    for done, future in enumerate(as_completed(futures), start=1):
        name = names[future.key]
        if future.status == "finished":
            records[name] = future.result()
        else:
            failed[name] = describe_error(future.exception())
        future.release()
        if on_progress:
            on_progress(name, done, total)
