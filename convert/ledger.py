"""The dataset ledger, streamed: every input item once, shard by shard, from a complete or a partial run.

    run = load_run(store)                 # the manifest, or the committed records of a partial run
    for row in iter_ledger(run, {"timeout"}):   # LedgerRow(shard, item, shard_index)
        ...
    cols = read_ledger(store)             # the whole ledger as columns (small datasets: ds.ledger())
    for name, cols in iter_ledger_columns(store, names):   # each shard's stored columns, no row objects

This is the single ledger adapter: `inspect --failures`, the report, `Dataset.ledger()`, the
library's `iter_ledger(store)` and column reads for views (`iter_ledger_columns`) all read ledgers here. Ledgers are never concatenated: they stay in
the shard records (convert.records) and are read concurrently, in order, a window at a time.

A run that is still going or was killed has no manifest yet; it is described by the records
(`shards/*.record.gz`) whose fingerprint matches the current plan (`plan.gz`), so a record left by
earlier settings is not counted.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from itertools import groupby
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from . import persist
from .manifest import FAILED, LEDGER, MANIFEST, PLAN, ShardIndex, read_manifest
from .records import (
    RECORD_SUFFIX,
    ManifestError,
    is_shard_name,
    iter_record_ledgers,
    ledger_columns,
    ledger_rows,
    ordered_map,
    read_ledger_columns,
    read_meta,
    read_record,
)
from .parts import PartLayout, load_parts
from .specs import ItemResult, Status
from .layout import SHARDS_DIR
from .store import Store, open_store

__all__ = ["LedgerRow", "RunView", "iter_ledger", "iter_ledger_columns", "load_run", "read_ledger"]


class LedgerRow(NamedTuple):
    """One input item's outcome and where it went."""

    shard: str  # the shard's name; "" for items of a shard that failed after its retries
    item: ItemResult
    shard_index: int  # position in RunView.shards; -1 for items of a failed shard


@dataclass
class RunView:
    """A dataset root as far as it is committed: complete (manifest) or partial (records only)."""

    out: Store
    manifest: dict[str, Any] | None
    shards: Sequence[dict[str, Any]]  # shard summaries in shard order (a ShardIndex for a complete run)
    totals: dict[str, Any]
    planned: int | None = None  # shards in the plan, when known

    @property
    def partial(self) -> bool:
        return self.manifest is None

    @property
    def format(self) -> str:
        return self.manifest["format"] if self.manifest else (self.shards[0]["format"] if self.shards else "?")

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names") if self.manifest else None

    @property
    def config(self) -> dict[str, Any] | None:
        return self.manifest.get("config") if self.manifest else None

    @property
    def failed_shards(self) -> dict[str, str]:
        return dict(self.manifest.get("failed_shards", {})) if self.manifest else {}

    def names(self) -> list[str]:
        if isinstance(self.shards, ShardIndex):
            return self.shards.cols["name"].tolist()
        return [s["name"] for s in self.shards]

    def state(self) -> str:
        """ "complete", "incomplete (N shards failed)" or "partial: N of M shards committed"."""
        if self.manifest is None:
            of = f" of {self.planned}" if self.planned else ""
            return f"partial: {len(self.shards)}{of} shards committed (no manifest yet: running or interrupted)"
        if self.failed_shards:
            return f"incomplete: {len(self.failed_shards)} shards failed"
        return "complete"


def load_run(out: Store) -> RunView:
    """The manifest's view if the run finished, else the committed records of the current plan."""
    if out.exists(MANIFEST):
        manifest = read_manifest(out)
        planned = len(manifest["shards"]) + len(manifest.get("failed_shards", {}))
        return RunView(out, manifest, manifest["shards"], dict(manifest["totals"]), planned)
    plan = _plan_fingerprints(out)
    shards, by_status = [], Counter[str]()
    for name in _record_names(out):
        found = read_record(out, name)
        if found is None or (plan is not None and plan.get(name) != found[1]):
            continue  # unreadable, or a record of earlier settings that resume will not trust
        shards.append(found[0].summary())
        by_status.update(row.status.value for row in found[0].ledger)
    if not shards and plan is None:  # with a plan, "0 of N committed" is the answer, not an error
        raise ManifestError(
            f"{out.url(MANIFEST)} not found and no committed shard records under "
            f"{out.url(SHARDS_DIR)}: not a converted dataset, or no shard has finished yet"
        )
    ok = by_status.get(Status.OK.value, 0)
    totals = {
        "items": sum(by_status.values()),
        "ok": ok,
        "failed": sum(by_status.values()) - ok,
        "by_status": dict(sorted(by_status.items())),
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
    }
    return RunView(out, None, shards, totals, len(plan) if plan is not None else None)


def _record_names(out: Store) -> list[str]:
    """Shard names of the records under shards/ (names that are not shard names are never read)."""
    names = (entry.name[: -len(RECORD_SUFFIX)] for entry in out.list(SHARDS_DIR) if entry.name.endswith(RECORD_SUFFIX))
    return sorted(n for n in names if is_shard_name(n))


def _plan_fingerprints(out: Store) -> dict[str, str] | None:
    """Shard name -> fingerprint of the current plan (plan.gz), or None if there is no readable plan."""
    try:
        plan = persist.load(io.BytesIO(read_meta(out, PLAN)))
        return dict(zip(plan["shards"], plan["fingerprints"]))
    except (FileNotFoundError, persist.PersistError, KeyError, TypeError):
        return None


def iter_ledger(target: Store | RunView, status: str | Collection[str] | None = None) -> Iterator[LedgerRow]:
    """Every input item once, in input order, streamed shard by shard; only `status` (a status
    name or several) if given. `target`: a dataset root (complete, or the committed records of a
    partial run) or a RunView already loaded. Items of failed shards come last, with shard ""."""
    run = target if isinstance(target, RunView) else load_run(target)
    wanted = {status} if isinstance(status, str) else set(status) if status else None

    def keep(rows: Sequence[ItemResult]) -> Iterator[ItemResult]:
        return (r for r in rows if wanted is None or r.status.value in wanted)

    if run.manifest is None:  # partial: a record replaced or removed since load_run has no rows
        for i, name in enumerate(run.names()):
            found = read_record(run.out, name)
            yield from (LedgerRow(name, r, i) for r in keep(found[0].ledger if found else ()))
        return
    for i, (name, rows) in enumerate(_record_ledgers(run)):
        yield from (LedgerRow(name, r, i) for r in keep(rows))
    yield from (LedgerRow("", r, -1) for r in keep(_failed_rows(run)))


def _record_ledgers(run: RunView) -> Iterator[tuple[str, Sequence[ItemResult]]]:
    """Each shard's ledger rows in shard order; a merged dataset's from its parts' records (under
    their own names in a referenced part), keys prefixed and labels remapped as its readers show them."""
    manifest = run.manifest or {}
    if not manifest.get("parts") or not isinstance(run.shards, ShardIndex):
        yield from iter_record_ledgers(run.out, run.names())
        return
    cols = run.shards.cols
    layout = PartLayout(load_parts(manifest, cols.get("part"), run.out.url()), run.out.url())
    shards = zip(cols["part"].tolist(), cols["name"].tolist(), cols["origin"].tolist())
    for part, group in groupby(shards, key=lambda s: s[0]):  # one part's shards are consecutive
        names, origins = zip(*((n, o) for _, n, o in group))
        uri = layout.uris[part]
        store = run.out if uri is None else open_store(uri, run.out.storage_options, role="dataset")
        for name, (_, rows) in zip(names, iter_record_ledgers(store, names if uri is None else origins)):
            yield name, [_as_merged(r, layout, part) for r in rows]


def _as_merged(row: ItemResult, layout: PartLayout, part: int) -> ItemResult:
    label = None if row.label is None else layout.label(row.label, part)
    return replace(row, key=layout.prefixes[part] + row.key, label=label)


def _failed_rows(run: RunView) -> Sequence[ItemResult]:
    """Ledger rows of the shards that failed after their retries (failed.gz; wave 1: ledger.gz)."""
    manifest = run.manifest or {}
    if manifest.get("failed_ledger") == FAILED:
        return ledger_rows(persist.load(io.BytesIO(read_meta(run.out, FAILED))))
    if manifest.get("version") == 1 and manifest.get("ledger") == LEDGER:  # wave 1: failed rows were only there
        cols = persist.load(io.BytesIO(read_meta(run.out, LEDGER)))
        return [r for r, s in zip(ledger_rows(cols), cols["shard"]) if int(s) < 0]
    return ()


def read_ledger(target: Store | RunView) -> dict[str, Any]:
    """The whole ledger as columns (key, uri, label, status, error, ..., shard name). Materializes
    every row: for large datasets stream `iter_ledger` instead."""
    rows = list(iter_ledger(target))
    cols = ledger_columns(r.item for r in rows)
    cols["shard"] = [r.shard for r in rows]
    return cols


def iter_ledger_columns(store: Store, names: Iterable[str]) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(shard name, its ledger columns as stored, or None if its record is missing or unreadable)
    for each named shard, in order, read concurrently: the columnar path for callers that want
    whole columns (views: labels, numeric columns) without building an ItemResult per row."""
    names = list(names)
    yield from zip(names, ordered_map(lambda n: read_ledger_columns(store, n), names))
