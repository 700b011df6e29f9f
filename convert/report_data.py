"""What the report (and `inspect`) shows, gathered from a dataset root without trusting anything else.

    run = load_run(out)               # convert.ledger: the manifest, or the records of a partial run
    scan = scan_ledger(run, k, cap)   # one pass of convert.ledger.iter_ledger: k samples per label,
                                      # capped failures, source statistics
    samples = read_samples(run, scan) # the chosen items read back from the shards, as training sees them
                                      # (with their captions, when the dataset stores a caption column)
    columns = stored_columns(run)     # the stored columns' names and types (manifest, else a record)
    stats = column_stats(run, columns)  # per column: nulls, numeric / text-length histograms; None when
                                      # this version cannot read column values back

Memory is bounded by the shard count plus the caps: ledger statistics are kept as counters of
distinct values, never as per-item lists. Column statistics read one column at a time (a complete
run: `ds.column(name)`, that one column in memory; a partial run: shard by shard) and keep counts,
text lengths and at most SAMPLE_CAP numbers per column.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .ledger import LedgerRow, RunView, iter_ledger, load_run
from .records import check_regular, read_record
from .sources.columns import CAPTION
from .specs import Column, ItemResult, Status
from .store import Store

__all__ = [
    "BYTES_BINS_PER_OCTAVE",
    "CAPTION",
    "CAPTION_FULL",
    "CAPTION_PREVIEW",
    "MAX_LABELS",
    "ColumnStats",
    "LedgerRow",
    "Pick",
    "RunView",
    "SampleView",
    "Scan",
    "SourceStats",
    "caption_preview",
    "column_stats",
    "load_run",
    "read_samples",
    "scan_ledger",
    "stored_columns",
]

BYTES_BINS_PER_OCTAVE = 4  # source-size histogram resolution (log2 bins)
MAX_LABELS = 64  # labels shown in the sample grid (the first ones met in input order)
CAPTION_PREVIEW = 120  # characters of a caption shown under its thumbnail
CAPTION_FULL = 2000  # characters of a caption kept for the full-size viewer
SAMPLE_CAP = 100_000  # numeric values kept per column for its histogram (a systematic sample beyond)


@dataclass
class SourceStats:
    """Counters of the source images' width, height, aspect ratio, size and format (known values only)."""

    width: Counter[int] = field(default_factory=Counter)
    height: Counter[int] = field(default_factory=Counter)
    aspect: Counter[float] = field(default_factory=Counter)  # width / height, 2 decimals
    bytes_bin: Counter[int] = field(default_factory=Counter)  # round(log2(bytes) * BYTES_BINS_PER_OCTAVE)
    formats: Counter[str] = field(default_factory=Counter)
    unknown: int = 0  # rows without source facts (-1 / ""), e.g. fetch failures or older datasets

    def add(self, item: ItemResult) -> None:
        if item.width > 0 and item.height > 0:
            self.width[item.width] += 1
            self.height[item.height] += 1
            self.aspect[round(item.width / item.height, 2)] += 1
        else:
            self.unknown += 1
        if item.src_bytes > 0:
            self.bytes_bin[round(math.log2(item.src_bytes) * BYTES_BINS_PER_OCTAVE)] += 1
        if item.src_format:
            self.formats[item.src_format] += 1

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
        item = row.item
        scan.by_status[item.status.value] += 1
        scan.sources.add(item)
        if item.status is not Status.OK:
            scan.failed_total += 1
            if len(scan.failures) < cap:
                scan.failures.append(row)
            continue
        folder = item.key.split("/", 1)[0] if "/" in item.key else None
        if scan.key_dirs.setdefault(item.label, folder) != folder:
            scan.key_dirs[item.label] = None
        group = scan.picks.get(item.label)
        if group is None and len(scan.picks) < max_labels:
            group = scan.picks[item.label] = []
        if group is not None and len(group) < k:
            group.append(Pick(row, stored[row.shard_index], index))
        stored[row.shard_index] += 1
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
    caption: str | None = None  # the stored caption column's value (None: null, or no caption column)


def read_samples(run: RunView, scan: Scan) -> dict[Any, list[SampleView]]:
    """The picked items read back from the shards: `open_dataset` for a complete run (the model's
    view, including its caches for remote shards), the shard readers directly for a partial one."""
    picks = [p for group in scan.picks.values() for p in group]
    if not picks:
        return {}
    stored = _dataset_items(run, picks) if run.manifest is not None else _shard_items(run, picks)
    by_label: dict[Any, list[SampleView]] = {}
    for pick, (image, caption) in zip(picks, stored):
        item = pick.row.item
        index = pick.index if run.manifest is not None else None
        view = SampleView(item.key, item.label, item.uri, pick.row.shard, index, image, caption)
        by_label.setdefault(item.label, []).append(view)
    return dict(sorted(by_label.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def _dataset_items(run: RunView, picks: list[Pick]) -> list[tuple[np.ndarray, str | None]]:
    from .dataset import open_dataset

    for shard in sorted({p.row.shard_index for p in picks}):  # a FIFO in a shard's place would block its open
        check_regular(run.out, run.shards[shard]["path"])
    with open_dataset(run.out.uri, run.out.storage_options) as ds:
        return [(item["image"], _text(item.get(CAPTION))) for item in ds.get_batch([p.index for p in picks])]


def _shard_items(run: RunView, picks: list[Pick]) -> list[tuple[np.ndarray, str | None]]:
    from .dataset import decode_image
    from .formats.base import open_reader

    images: dict[int, tuple[np.ndarray, str | None]] = {}
    by_shard: dict[int, list[int]] = {}
    for pos, pick in enumerate(picks):
        by_shard.setdefault(pick.row.shard_index, []).append(pos)
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
                image = (
                    image
                    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                    else decode_image(bytes(image))
                )
                images[pos] = (image, _text(item.get(CAPTION)))
    return [images[pos] for pos in range(len(picks))]


def _local_copy(out: Store, rel: str, tmp: Path) -> str:
    """A local path of a committed shard: itself when local, else a download into `tmp`."""
    local = out.local_path(rel)
    if local is not None:
        check_regular(out, rel)
        return local
    target = tmp / rel.rsplit("/", 1)[-1]
    out.get_file(rel, str(target))
    return str(target)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def caption_preview(text: str | None, limit: int = CAPTION_PREVIEW, flat: bool = True) -> str:
    """A caption cut to `limit` characters with an ellipsis; `flat`: on one line (line breaks shown as
    spaces), as under a thumbnail (the full-size viewer keeps them)."""
    shown = (" ".join(text.splitlines()) if flat else text) if text else ""
    return shown if len(shown) <= limit else shown[: limit - 1].rstrip() + "\u2026"


# -- columns ----------------------------------------------------------------------------------------
def stored_columns(run: RunView) -> tuple[Column, ...]:
    """The stored columns' names and types: the manifest's list, else the first committed shard's
    (its summary in a partial run, or its record); () for a dataset without columns."""
    listed = run.manifest.get("columns") if run.manifest else None
    if listed is None and run.shards:
        listed = run.shards[0].get("columns")
        if listed is None:
            found = read_record(run.out, run.names()[0])
            return found[0].columns if found else ()
    return tuple(Column(str(name), str(kind)) for name, kind in listed or ())


@dataclass
class ColumnStats:
    """One column over the dataset, in bounded memory: counts, nulls, and per type what the report
    draws: text lengths (characters) as counts of distinct lengths; numbers as exact count/min/max/mean
    plus a systematic sample of at most SAMPLE_CAP values (every `stride`-th) for the histogram;
    booleans as true/false counts."""

    name: str
    type: str
    count: int = 0
    nulls: int = 0
    lengths: Counter[int] = field(default_factory=Counter)
    empty: int = 0
    true: int = 0
    low: float = math.inf
    high: float = -math.inf
    total: float = 0.0
    finite: int = 0  # numeric values that are not NaN / inf (what min, max and mean are over)
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stride: int = 1
    _seen: int = 0

    def add(self, values: Any) -> None:
        """Fold in one chunk of the column: list[str | None] for strings, an array (masked where null) else."""
        if self.type == "string":
            self.count += len(values)
            for v in values:
                if v is None:
                    self.nulls += 1
                else:
                    self.lengths[len(v)] += 1
            self.empty += self.lengths.pop(0, 0)  # kept apart: an empty caption is worth its own line
            return
        arr = np.ma.asarray(values)
        data = np.asarray(arr.compressed()) if np.ma.is_masked(arr) else np.asarray(arr.data).ravel()
        self.count += arr.size
        self.nulls += arr.size - data.size
        if self.type == "bool":
            self.true += int(np.count_nonzero(data))
            return
        finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
        if finite.size:
            self.low, self.high = min(self.low, float(finite.min())), max(self.high, float(finite.max()))
            self.total += float(finite.sum(dtype=np.float64))
            self.finite += finite.size
        self._keep(data)

    def _keep(self, data: np.ndarray) -> None:
        positions = self._seen + np.arange(data.size)
        self._seen += data.size
        self.sample = np.concatenate([self.sample, data[positions % self.stride == 0].astype(np.float64)])
        while self.sample.size > SAMPLE_CAP:  # kept positions are multiples of stride: halve them
            self.sample, self.stride = self.sample[::2], self.stride * 2

    @property
    def values(self) -> int:
        """Non-null values."""
        return self.count - self.nulls

    @property
    def mean(self) -> float | None:
        return self.total / self.finite if self.finite else None


def column_stats(run: RunView, columns: tuple[Column, ...]) -> list[ColumnStats] | None:
    """Statistics of every stored column, read column by column without image bytes: through
    `open_dataset(...).column(name)` for a complete run, the shard readers' `column(name)` for a
    partial one. None when the readers of this version cannot return column values."""
    if not columns:
        return []
    stats = [ColumnStats(c.name, c.type) for c in columns]
    for chunk in _column_chunks(run, columns):
        if chunk is None:
            return None
        for stat, values in zip(stats, chunk):
            if values is not None:
                stat.add(values)
    return stats


def _column_chunks(run: RunView, columns: tuple[Column, ...]) -> Iterator[list[Any] | None]:
    """Each column's values (a chunk per column, or per shard of a partial run); None if unreadable."""
    names = [c.name for c in columns]
    if run.manifest is not None:
        from .dataset import open_dataset

        with open_dataset(run.out.uri, run.out.storage_options) as ds:
            column = getattr(ds, "column", None)  # Dataset.column: the formats' side of columns
            if not callable(column):
                yield None
                return
            for i, name in enumerate(names):
                yield [column(name) if j == i else None for j in range(len(names))]
        return
    from .formats.base import open_reader

    with tempfile.TemporaryDirectory(prefix="convert-report-") as tmp:
        for summary in run.shards:
            source = _local_copy(run.out, summary["path"], Path(tmp))
            reader = open_reader(summary["format"], source)
            try:
                column = getattr(reader, "column", None)
                if not callable(column):
                    yield None
                    return
                have = {c.name for c in getattr(reader, "columns", columns)}
                yield [column(name) if name in have else None for name in names]
            finally:
                reader.close()
                if source.startswith(tmp):  # a downloaded copy: one shard on disk at a time
                    Path(source).unlink(missing_ok=True)
