"""Orchestration: plan -> skip committed shards -> bounded shard tasks on an executor -> manifest.

The client holds O(shards) state: the plan names input slices, never items. At most about
4 x (worker threads) shard tasks are in flight; more are submitted as tasks finish, so client and
scheduler memory stay O(workers). Tasks return `ShardRecord`s (counts, checksum, ledger rows), never
image data. A shard task that raises is retried `cluster.task_retries` times; a worker death is re-run
by the scheduler and ends as `KilledWorker` after its allowed failures. Either way the shard is
reported as failed and every other shard still completes. Progress lives only in the output's shard
records, so an interrupted or killed client just reruns the same config.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .append import Previous, appending_marker, combine, generation_of, previous
from .config import Config, ConfigError
from .executor import Executor
from .executor.early import StartingExecutor
from .layout import SHARDS_DIR
from .lease import hold_lease
from .manifest import LEDGER, MANIFEST, PLAN, ShardIndex, write_manifest
from .plan import dump_plan
from .records import RECORD_SUFFIX
from .redact import redact_text
from .resume import fill_identities, resume, retry_mask
from .secrets import resolve_config, seal_config
from .shardtable import ShardTable
from .sources import SourcePlan, Workdir, plan_source, shard_refs
from .specs import Column, ItemResult, ShardRecord, ShardSpec, Status
from .store import StorageError, Store, preflight
from .summary import LedgerTally, after_manifest, announce_rebuild
from .task import ShardTask, TaskMaker
from .submit import ProgressHook, describe_error, execute

#: `run --retry-failed` with no statuses: the failures a later attempt may well not repeat
TRANSIENT = ("timeout", "connection_error", "http_error", "error")


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
    items: int = 0
    # -- report helper (issue 13): rate of this run only, and the top failure reasons --
    items_converted: int = 0  # ok items written by THIS run (resumed shards excluded)
    top_failures: list[tuple[str, int, list[str]]] = field(default_factory=list)  # (status, count, example keys)

    @property
    def items_ok(self) -> int:
        return self.by_status.get(Status.OK.value, 0)

    @property
    def items_failed(self) -> int:
        return sum(self.by_status.values()) - self.items_ok

    @property
    def images_per_second(self) -> float:
        return self.items_converted / self.seconds if self.seconds > 0 else 0.0

    def exit_code(self, fail_on_item_errors: bool = False) -> int:
        if self.failed_shards:
            return 1
        if fail_on_item_errors and self.items_failed:
            return 3
        return 0


class Interrupted(Exception):
    """The run was stopped (Ctrl-C / SIGTERM); committed shards stay and a rerun resumes."""

    def __init__(self, committed: int, total: int | None, signal_name: str = "SIGINT") -> None:
        if total is None:
            super().__init__("interrupted while planning (no shard changed); rerun the same command to resume")
        else:
            super().__init__(f"interrupted: {committed} of {total} shards committed; rerun the same command to resume")
        self.committed, self.total, self.signal_name = committed, total, signal_name


def plan(config: Config, work: Workdir) -> SourcePlan:
    """List and plan the configured source (no cluster); storage failures name the source."""
    try:
        return plan_source(config.source, config.shard.size, work)
    except OSError:  # PermissionError "Forbidden", endpoint errors: say which bucket and what to fix
        preflight(config.source.uri, config.source.storage_options, "source")
        raise


def _reset_output(out: Store) -> None:
    """--overwrite: drop the old manifest, ledger and shards before converting again."""
    for rel in (MANIFEST, LEDGER, PLAN, SHARDS_DIR):
        out.delete_tree(rel)


def run(config: Config, on_progress: ProgressHook | None = None, log: Callable[[str], None] = print) -> RunSummary:
    """Convert the configured source into a verified dataset; returns the summary.

    The run holds the output's lease (convert.lease) before it changes anything, so a second run
    on the same output stops with one line naming the owner. Raises Interrupted on
    KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI).
    """
    start = time.perf_counter()
    config = config.with_absolute_paths()
    local = resolve_config(config)  # this process's own view, secrets resolved
    out = preflight(local.output.uri, local.output.storage_options, "output")
    with hold_lease(out, force=config.output.force_unlock, ttl=config.output.lease_ttl, log=log) as lease:
        # the cluster starts while the source is planned, unless the output looks finished already
        early = config.run.overwrite or not out.exists(MANIFEST)
        with StartingExecutor(config.cluster, job_name="convert", early=early, source=config.source) as starting:
            summary = _run_leased(config, local, out, starting, lease.run_id, on_progress, log)
    summary.seconds = time.perf_counter() - start
    return summary


def _run_leased(
    config: Config,
    local: Config,
    out: Store,
    starting: StartingExecutor,
    run_id: str,
    on_progress: ProgressHook | None,
    log: Callable[[str], None],
) -> RunSummary:
    config_data = config.redacted()
    prev = _previous(config, out, config_data)
    work = Workdir(out, prev.prefix if prev else "")
    try:
        source_plan = plan(local, work)
    except KeyboardInterrupt as exc:
        raise Interrupted(0, None, getattr(exc, "signal_name", "SIGINT")) from None
    known: dict[str, str] = {}
    grew = prev is None  # an append that finds nothing new publishes no new generation
    if prev is not None:  # run --append: the old plan's shards as they are, then what is new
        options = (local.source.storage_options, local.output.storage_options)
        grown = combine(prev, source_plan, work, *options, config.shard.size, config.run.rebuild_changed)
        source_plan, known, grew = grown.plan, grown.fingerprints, bool(grown.added or grown.retired)
        retired = f", {len(grown.retired)} retired (changed): {' '.join(grown.retired[:4])}" if grown.retired else ""
        log(f"append: generation {prev.generation}, {grown.added} new shards after {len(known)} kept{retired}")
    specs = source_plan.specs
    if config.run.overwrite:
        _reset_output(out)
    # Every decision a shard task carries is made here, once (convert.task); workers execute it.
    shipped, secrets = seal_config(config)  # what workers get: secrets only as references
    maker = TaskMaker(shipped, source_plan.kind, source_plan.columns, run_id)
    fps = {s.name: known.get(s.name) or maker.fingerprint(s) for s in specs}
    # The client keeps each shard as a row of columns (convert.shardtable, ~300 B), never records.
    table = ShardTable([s.name for s in specs], list(fps.values()))
    resume(out, table, verify=config.output.verify_resume)
    if config.run.retry_failed:
        table.drop(retry_mask(table, tuple(config.run.retry_failed)))
    pending = [s for i, s in enumerate(specs) if not table.filled[i]]
    summary = RunSummary(output=out.url(""), shards=len(specs), skipped=len(table), items=source_plan.items)
    log(
        f"{source_plan.items} items from {source_plan.kind} source -> {len(specs)} shards "
        f"({len(table)} already committed, {len(pending)} to convert)"
    )
    if prev is None:
        announce_rebuild(out, config_data, pending, log)  # report helper (issue 13): why shards are rebuilt
    try:
        if pending:
            _prepare_output(out, specs, fps, source_plan.digests, prev)
            tasks = (maker.task(s, fps[s.name]) for s in pending)
            _convert_pending(
                config,
                tasks,
                len(pending),
                sum(len(s) for s in pending),
                secrets,
                starting,
                _keeper(table),
                summary,
                on_progress,
                log,
            )
    except KeyboardInterrupt as exc:
        committed = _committed_count(out, specs, len(table))
        raise Interrupted(committed, len(specs), getattr(exc, "signal_name", "SIGINT")) from None
    columns = maker.task(specs[0], fps[specs[0].name]).items.columns if specs else ()  # what every shard stores
    if grew or pending:
        _finish(out, local, specs, table, summary, config_data, source_plan, columns, log, prev)
    else:
        summary.by_status = dict(table.tally().counts)
        log("append: nothing new in the source; the dataset is unchanged")
    return summary


def _previous(config: Config, out: Store, config_data: dict[str, Any]) -> Previous | None:
    """--append: the dataset appended to; otherwise None (and a plain rerun of an appended dataset,
    which would plan the grown source afresh and rebuild every shard, is refused)."""
    if config.run.append:
        if config.run.overwrite or config.run.retry_failed:
            raise ConfigError("--append cannot be combined with --overwrite or --retry-failed; run them one at a time")
        return previous(out, config_data)
    generation = generation_of(out)
    if not config.run.overwrite and (generation > 1 or out.exists(appending_marker(generation + 1))):
        raise ConfigError(
            f"{out.url('')} has grown by appends (generation {generation}, or an append was interrupted); "
            "rerun with --append to add to it or finish an interrupted append, or --overwrite to rebuild it"
        )
    return None


def _committed_count(out: Store, specs: list[ShardSpec], known: int) -> int:
    """Shards of this plan with a record on storage: the records the client received are not all
    (workers commit shards whose results never reached it before Ctrl-C). One listing."""
    try:
        names = {entry.name for entry in out.list(SHARDS_DIR)}
    except (OSError, StorageError):
        return known
    return max(known, sum(f"{spec.name}{RECORD_SUFFIX}" in names for spec in specs))


def _keeper(table: ShardTable) -> Callable[[ShardRecord], None]:
    """A function that files a new record in `table`: its ledger folded to counts, the rest dropped."""

    def keep(record: ShardRecord) -> None:
        table.add(record, LedgerTally.of(record.ledger), record.identity or None, new=True)

    return keep


def _finish(
    out: Store,
    local: Config,
    specs: list[ShardSpec],
    table: ShardTable,
    summary: RunSummary,
    config_data: dict,
    source_plan: SourcePlan,
    columns: tuple[Column, ...],
    log: Callable[[str], None],
    prev: Previous | None = None,
) -> None:
    failed_rows = [
        row
        for s in specs
        if s.name in summary.failed_shards
        for row in _failed_rows(s, summary.failed_shards[s.name], local)
    ]
    fill_identities(out, table)  # so the next resume reads no record (convert.resume)
    tally = table.tally()
    counts: Counter[str] = Counter(tally.counts)
    counts.update(row.status.value for row in failed_rows)
    summary.by_status = dict(counts)
    manifest = write_manifest(
        out,
        ShardIndex(table.index_cols()),
        config_data,
        source_plan.label_names,
        source_plan.kind,
        failed=summary.failed_shards,
        failed_rows=failed_rows,
        counts=summary.by_status,
        columns=columns,
        generation=prev.generation if prev else 1,
        history=prev.manifest.get("history") or [] if prev else (),
    )
    if prev is not None:
        out.delete(appending_marker(prev.generation))
    summary.items_converted = table.new_ok()
    after_manifest(out, manifest, specs, tally, failed_rows, summary, log)  # report helper (issue 13)


def _failed_rows(spec: ShardSpec, error: str, local: Config) -> list[ItemResult]:
    """shard_failed rows for a shard that failed for good (its slice read here; [] if unreadable)."""
    try:
        refs = list(shard_refs(spec, local.source.storage_options, local.output.storage_options))
    except Exception:  # noqa: BLE001 - the shard's input itself may be what failed
        return []
    return [ItemResult(r.key, r.uri, r.label, Status.SHARD_FAILED, error) for r in refs]


def _prepare_output(
    out: Store, specs: list[ShardSpec], fps: dict[str, str], digests: Sequence[str], prev: Previous | None
) -> None:
    """Before shards change: retract the manifest, record the plan (hold_lease cleared dead attempts' debris).
    An append keeps the manifest: it only adds shards, so the old generation stays whole to read."""
    if prev is not None:
        out.write_bytes(appending_marker(prev.generation), b"")
    else:
        out.delete(MANIFEST)  # readers must not trust a manifest while shards change
    out.write_bytes(PLAN, dump_plan(specs, fps, digests))


def _convert_pending(
    config: Config,
    tasks: Iterator[ShardTask],
    count: int,
    items: int,
    secrets: dict[str, str],
    starting: StartingExecutor,
    keep: Callable[[ShardRecord], Any],
    summary: RunSummary,
    on_progress: ProgressHook | None,
    log: Callable[[str], None],
) -> None:
    """Run the pending shard tasks on the configured executor; `keep` files each new record; fills the summary."""
    with starting.executor(shards=count, items=items) as ex:
        ex.check_paths([config.source.uri, config.output.uri])
        check_memory(config, ex)
        summary.cluster, summary.dashboard = ex.description, ex.dashboard
        log(f"cluster: {ex.description}" + (f"  dashboard: {ex.dashboard}" if ex.dashboard else ""))
        if ex.job_ids:
            log(f"batch jobs: {' '.join(ex.job_ids)}")
        with ex.share_secrets(secrets):
            execute(ex, tasks, count, items, config.cluster.task_retries, keep, summary.failed_shards, on_progress)
    summary.converted = count - len(summary.failed_shards)


def check_memory(config: Config, ex: Executor) -> None:
    """ConfigError when one shard's prefetch buffer cannot fit in a worker's memory limit."""
    limit = ex.memory_limit()
    per_worker = config.fetch.prefetch_bytes * config.cluster.threads_per_worker
    if limit and per_worker > limit:
        raise ConfigError(
            f"fetch.prefetch_bytes={config.fetch.prefetch_bytes} x cluster.threads_per_worker="
            f"{config.cluster.threads_per_worker} is above the worker memory limit {limit} bytes; "
            "lower fetch.prefetch_bytes or raise cluster.memory_limit"
        )
