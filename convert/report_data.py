"""What the report (and `inspect`) shows, gathered from a dataset root without trusting anything else.

    run = load_run(out)               # the manifest, or the committed shard records of a partial run
    iter_ledger(run, statuses)        # ledger rows streamed shard by shard (the ONE place ledgers are read)
    scan = scan_ledger(run, k, cap)   # one pass: k samples per label, capped failures, source statistics
    samples = read_samples(run, scan) # the chosen items read back from the shards, as training sees them

A run that is still going or was killed has no manifest yet; it is described by the records
(`shards/*.record.gz`) whose fingerprint matches the current plan (`plan.gz`), so a record left by
earlier settings is not counted. Memory is bounded by the shard count plus the caps: statistics are
kept as counters of distinct values, never as per-item lists.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

from .manifest import MANIFEST, PLAN, RECORD_SUFFIX, ManifestError, read_manifest, read_record
from .manifest import iter_ledger as manifest_ledger
from .specs import ItemResult, Status
from .layout import SHARDS_DIR
from .store import Store

BYTES_BINS_PER_OCTAVE = 4  # source-size histogram resolution (log2 bins)
MAX_LABELS = 64  # labels shown in the sample grid (the first ones met in input order)


class LedgerRow(NamedTuple):
    key: str
    uri: str
    label: int | None
    status: str
    error: str
    width: int
    height: int
    src_format: str
    src_bytes: int
    shard: int  # index into RunView.shards; -1 for items of a shard that failed


@dataclass
class RunView:
    """A dataset root as far as it is committed: complete (manifest) or partial (records only)."""

    out: Store
    manifest: dict[str, Any] | None
    shards: list[dict[str, Any]]  # shard summaries in shard order (ShardRecord.summary() fields)
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

    def state(self) -> str:
        """"complete", "incomplete (N shards failed)" or "partial: N of M shards committed"."""
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
        return RunView(out, manifest, list(manifest["shards"]), dict(manifest["totals"]), planned)
    plan = _plan_fingerprints(out)
    shards, by_status = [], Counter()
    for name in _record_names(out):
        found = read_record(out, name)
        if found is None or (plan is not None and plan.get(name) != found[1]):
            continue  # unreadable, or a record of earlier settings that resume will not trust
        shards.append(found[0].summary())
        by_status.update(row.status.value for row in found[0].ledger)
    if not shards and plan is None:  # with a plan, "0 of N committed" is the answer, not an error
        raise ManifestError(f"{out.url(MANIFEST)} not found and no committed shard records under "
                            f"{out.url(SHARDS_DIR)}: not a converted dataset, or no shard has finished yet")  # fmt: skip
    ok = by_status.get(Status.OK.value, 0)
    totals = {"items": sum(by_status.values()), "ok": ok, "failed": sum(by_status.values()) - ok,
              "by_status": dict(sorted(by_status.items())), "shards": len(shards),
              "bytes": sum(s["bytes"] for s in shards)}  # fmt: skip
    return RunView(out, None, shards, totals, len(plan) if plan is not None else None)


def _record_names(out: Store) -> list[str]:
    names = (entry.rel.rsplit("/", 1)[-1] for entry in out.list(SHARDS_DIR))
    return sorted(n[: -len(RECORD_SUFFIX)] for n in names if n.endswith(RECORD_SUFFIX))


def _plan_fingerprints(out: Store) -> dict[str, str] | None:
    """Shard name -> fingerprint of the current plan (plan.gz), or None if there is no readable plan."""
    from . import persist

    try:
        import io

        plan = persist.load(io.BytesIO(out.read_bytes(PLAN)))
        return dict(zip(plan["shards"], plan["fingerprints"]))
    except (FileNotFoundError, persist.PersistError, KeyError, TypeError):
        return None


def iter_ledger(run: RunView, statuses: set[str] | None = None) -> Iterator[LedgerRow]:
    """Ledger rows in input order, streamed shard by shard; only `statuses` if given.

    This is the single adapter between the report/inspect and the ledger storage: a complete run
    streams the per-shard ledgers through `manifest.iter_ledger`, a partial run each committed
    record's rows. Items of failed shards carry shard index -1.
    """
    if run.manifest is not None:
        index = {summary["name"]: i for i, summary in enumerate(run.shards)}
        rows = ((entry.item, index.get(entry.shard, -1)) for entry in manifest_ledger(run.out, statuses or None))
    else:
        rows = ((item, i) for i, summary in enumerate(run.shards) for item in _record_rows(run.out, summary["name"]))
    for r, shard in rows:
        if statuses is None or r.status.value in statuses:
            yield LedgerRow(r.key, r.uri, r.label, r.status.value, r.error, r.width, r.height, r.src_format,
                            r.src_bytes, shard)  # fmt: skip


def _record_rows(out: Store, name: str) -> tuple[ItemResult, ...]:
    found = read_record(out, name)
    return () if found is None else found[0].ledger  # () if replaced or removed since load_run


@dataclass
class SourceStats:
    """Counters of the source images' width, height, aspect ratio, size and format (known values only)."""

    width: Counter[int] = field(default_factory=Counter)
    height: Counter[int] = field(default_factory=Counter)
    aspect: Counter[float] = field(default_factory=Counter)  # width / height, 2 decimals
    bytes_bin: Counter[int] = field(default_factory=Counter)  # round(log2(bytes) * BYTES_BINS_PER_OCTAVE)
    formats: Counter[str] = field(default_factory=Counter)
    unknown: int = 0  # rows without source facts (-1 / ""), e.g. fetch failures or older datasets

    def add(self, row: LedgerRow) -> None:
        if row.width > 0 and row.height > 0:
            self.width[row.width] += 1
            self.height[row.height] += 1
            self.aspect[round(row.width / row.height, 2)] += 1
        else:
            self.unknown += 1
        if row.src_bytes > 0:
            self.bytes_bin[round(math.log2(row.src_bytes) * BYTES_BINS_PER_OCTAVE)] += 1
        if row.src_format:
            self.formats[row.src_format] += 1

    @property
    def known(self) -> int:
        return sum(self.width.values())


@dataclass
class Pick:
    row: LedgerRow
    local: int  # index among the stored items of its shard
    index: int  # dataset index (i-th ok item in input order)


@dataclass
class Scan:
    picks: dict[Any, list[Pick]] = field(default_factory=dict)  # label -> first k ok items
    failures: list[LedgerRow] = field(default_factory=list)  # first `cap` failed rows
    failed_total: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    sources: SourceStats = field(default_factory=SourceStats)
    key_dirs: dict[Any, str | None] = field(default_factory=dict)  # label -> first key folder, None if mixed

    def label_names_from_keys(self) -> dict[int, str]:
        """label -> folder name when every ok key of each label starts with its own folder
        (ImageFolder keys such as "cat/001.jpg"): names for a partial run, whose manifest is not written."""
        dirs = {label: d for label, d in self.key_dirs.items() if label is not None}
        if not dirs or None in dirs.values() or len(set(dirs.values())) != len(dirs):
            return {}
        return dict(dirs)  # type: ignore[arg-type]


def scan_ledger(run: RunView, k: int, cap: int, max_labels: int = MAX_LABELS) -> Scan:
    """One streamed pass over the ledger: sample picks, capped failures, counts, source statistics."""
    scan = Scan()
    stored: Counter[int] = Counter()  # shard -> ok items seen so far
    index = 0
    for row in iter_ledger(run):
        scan.by_status[row.status] += 1
        scan.sources.add(row)
        if row.status != Status.OK.value:
            scan.failed_total += 1
            if len(scan.failures) < cap:
                scan.failures.append(row)
            continue
        folder = row.key.split("/", 1)[0] if "/" in row.key else None
        if scan.key_dirs.setdefault(row.label, folder) != folder:
            scan.key_dirs[row.label] = None
        group = scan.picks.get(row.label)
        if group is None and len(scan.picks) < max_labels:
            group = scan.picks[row.label] = []
        if group is not None and len(group) < k:
            group.append(Pick(row, stored[row.shard], index))
        stored[row.shard] += 1
        index += 1
    return scan


@dataclass
class SampleView:
    key: str
    label: int | None
    uri: str
    shard: str
    index: int | None  # dataset index (complete runs); None for a partial run
    image: np.ndarray  # H x W x C uint8, exactly as a training loop receives it


def read_samples(run: RunView, scan: Scan) -> dict[Any, list[SampleView]]:
    """The picked items read back from the shards: `open_dataset` for a complete run (the model's
    view, including its caches for remote shards), the shard readers directly for a partial one."""
    picks = [p for group in scan.picks.values() for p in group]
    if not picks:
        return {}
    images = _dataset_images(run, picks) if run.manifest is not None else _shard_images(run, picks)
    by_label: dict[Any, list[SampleView]] = {}
    for pick, image in zip(picks, images):
        name = run.shards[pick.row.shard]["name"]
        index = pick.index if run.manifest is not None else None
        by_label.setdefault(pick.row.label, []).append(
            SampleView(pick.row.key, pick.row.label, pick.row.uri, name, index, image))
    return dict(sorted(by_label.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def _dataset_images(run: RunView, picks: list[Pick]) -> list[np.ndarray]:
    from .dataset import open_dataset

    with open_dataset(run.out.uri, run.out.storage_options) as ds:
        return [item["image"] for item in ds.get_batch([p.index for p in picks])]


def _shard_images(run: RunView, picks: list[Pick]) -> list[np.ndarray]:
    from .dataset import decode_image
    from .formats.base import open_reader

    images: dict[int, np.ndarray] = {}
    by_shard: dict[int, list[int]] = {}
    for pos, pick in enumerate(picks):
        by_shard.setdefault(pick.row.shard, []).append(pos)
    with tempfile.TemporaryDirectory(prefix="convert-report-") as tmp:
        for shard, positions in by_shard.items():
            summary = run.shards[shard]
            source = _local_copy(run.out, summary["path"], Path(tmp))
            reader = open_reader(summary["format"], source)
            try:
                items = reader.get_batch([picks[pos].local for pos in positions])
            finally:
                reader.close()
            for pos, item in zip(positions, items):
                image = item["image"]
                images[pos] = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 \
                    else decode_image(bytes(image))  # fmt: skip
    return [images[pos] for pos in range(len(picks))]


def _local_copy(out: Store, rel: str, tmp: Path) -> str:
    """A local path of a committed shard: itself when local, else a download into `tmp`."""
    local = out.local_path(rel)
    if local is not None:
        return local
    target = tmp / rel.rsplit("/", 1)[-1]
    out.get_file(rel, str(target))
    return str(target)
