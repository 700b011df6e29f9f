"""What a run says about itself at the end: top failure reasons, why shards are rebuilt, stale shards.

Small pure functions that the run orchestration calls at a few clearly marked call sites, so the
run output stays readable without growing the orchestration (this module deletes nothing: stale
shard files are removed by convert.shards, which owns the files under shards/):

    top_failures(rows)                       -> [(status, count, [example keys])], most frequent first
    explain_changes(old_config, new_config)  -> ["image.size changed: [64, 64] → [32, 32]", ...]
    rebuild_message(old, new, pending)       -> one line for the run log, or None

The orchestration calls two hooks, one line each:
    announce_rebuild(out, config_data, pending, log)            before the old manifest is retracted
    after_manifest(out, manifest, specs, tally, failed_rows, summary, log)   after the new one
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .manifest import MANIFEST, ManifestError, read_manifest
from .plan import output_settings
from .shards import remove_stale_shards
from .specs import ItemResult, ShardRecord, ShardSpec, Status
from .store import Store

# The config keys each output setting comes from (output_settings() flattens output.* away).
_SETTING_KEYS = {
    "format": "output.format",
    "compression": "output.compression",
    "compression_level": "output.compression_level",
}
_TRANSIENT_HTTP = re.compile(r"HTTP (429|5\d\d)\b")  # the http_error rows `--retry-failed` redoes


@dataclass(frozen=True)
class LedgerTally:
    """One shard's ledger folded to what the client keeps: counts per status, the first few keys of
    each failure status, and per-status counts of failures a later attempt may not repeat (for
    `--retry-failed`; http_error only for 429/5xx). O(statuses), never O(items): the client folds
    each record as it arrives and drops its rows (they stay in the shard's record on storage)."""

    counts: dict[str, int]
    examples: dict[str, tuple[str, ...]]
    transient: dict[str, int]

    @classmethod
    def of(cls, rows: Iterable[ItemResult], examples: int = 2) -> "LedgerTally":
        counts: Counter[str] = Counter()
        transient: Counter[str] = Counter()
        keys: dict[str, list[str]] = {}
        for row in rows:
            status = row.status.value
            counts[status] += 1
            if row.status is Status.OK:
                continue
            sample = keys.setdefault(status, [])
            if len(sample) < examples:
                sample.append(row.key)
            if row.status is not Status.HTTP_ERROR or _TRANSIENT_HTTP.search(row.error):
                transient[status] += 1
        return cls(dict(counts), {k: tuple(v) for k, v in keys.items()}, dict(transient))


def fold_record(record: ShardRecord) -> tuple[ShardRecord, LedgerTally]:
    """(the record without its ledger rows, their tally)."""
    return dataclasses.replace(record, ledger=()), LedgerTally.of(record.ledger)


def top_failures(tallies: Iterable[LedgerTally], n: int = 3, examples: int = 2) -> list[tuple[str, int, list[str]]]:
    """The `n` most frequent failure statuses with their counts and the first `examples` keys of each
    (in the order the tallies are given: shard order)."""
    counts: Counter[str] = Counter()
    keys: dict[str, list[str]] = {}
    for tally in tallies:
        for status, count in tally.counts.items():
            if status == Status.OK.value:
                continue
            counts[status] += count
            sample = keys.setdefault(status, [])
            sample.extend(tally.examples.get(status, ())[: examples - len(sample)])
    return [(status, count, keys[status]) for status, count in counts.most_common(n)]


def _flatten(settings: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            flat[_SETTING_KEYS.get(name, name)] = value
    return flat


def explain_changes(old_config: dict[str, Any] | None, new_config: dict[str, Any]) -> list[str]:
    """One line per output-affecting setting that differs between two (redacted) configs.

    Only settings that change shard bytes count (the same ones the shard fingerprint covers), so a
    changed worker count or fetch timeout is never reported as a reason to rebuild.
    """
    if not old_config:
        return []
    try:
        old, new = _flatten(output_settings(old_config)), _flatten(output_settings(new_config))
    except KeyError:  # a manifest written by an older version without some section
        return []
    return [
        f"{key} changed: {_show(old.get(key))} → {_show(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def _show(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return str(value[0])  # image.size [64, 64] -> 64, as users write it
    return "none" if value is None else str(value)


def previous_config(out: Store) -> dict[str, Any] | None:
    """The config recorded in the dataset's current manifest.json, or None (no or unreadable manifest)."""
    if not out.exists(MANIFEST):
        return None
    try:
        return read_manifest(out).get("config")
    except ManifestError:
        return None


def rebuild_message(old_config: dict[str, Any] | None, new_config: dict[str, Any], pending: int) -> str | None:
    """ "image.size changed: 64 → 32; 3 shards will be rebuilt", or None when the settings are unchanged."""
    changes = explain_changes(old_config, new_config)
    if not changes or not pending:
        return None
    return "; ".join(changes) + f"; {pending} shard{'s' if pending != 1 else ''} will be rebuilt"


def announce_rebuild(
    out: Store, config_data: dict[str, Any], pending: Sequence[ShardSpec], log: Callable[[str], None]
) -> None:
    """Log why committed shards are rebuilt, if the output settings changed since the last manifest."""
    message = rebuild_message(previous_config(out), config_data, len(pending))
    if message:
        log(message)


def after_manifest(
    out: Store,
    manifest: dict[str, Any],
    specs: Sequence[ShardSpec],
    tally: LedgerTally,
    failed_rows: Sequence[ItemResult],
    summary: Any,
    log: Callable[[str], None],
) -> None:
    """Once the new manifest is written: the top failures go into the summary (`top_failures`,
    from the run's aggregate `tally` then the failed shards' rows), and `convert.shards` removes
    the shard files of an old format or plan (logged here)."""
    summary.top_failures = top_failures([tally, LedgerTally.of(failed_rows)])
    stale = remove_stale_shards(out, manifest, [s.name for s in specs])
    if stale:
        log(
            f"removed {len(stale)} files of earlier settings no manifest lists: {', '.join(stale[:4])}"
            + (" ..." if len(stale) > 4 else "")
        )
