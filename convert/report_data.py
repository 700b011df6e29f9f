"""What the report (and `inspect`) shows, gathered from a dataset root without trusting anything else.

    run = load_run(out)               # convert.ledger: the manifest, or the records of a partial run
    scan = scan_ledger(run, k, cap)   # one pass of convert.ledger.iter_ledger: k samples per label,
                                      # capped failures, source statistics
    samples = read_samples(run, scan) # the chosen items read back from the shards, as training sees them

Memory is bounded by the shard count plus the caps: statistics are kept as counters of distinct
values, never as per-item lists.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .ledger import LedgerRow, RunView, iter_ledger, load_run
from .records import check_regular
from .specs import ItemResult, Status
from .store import Store

__all__ = ["BYTES_BINS_PER_OCTAVE", "MAX_LABELS", "LedgerRow", "Pick", "RunView", "SampleView", "Scan", "SourceStats",
           "load_run", "read_samples", "scan_ledger"]  # fmt: skip

BYTES_BINS_PER_OCTAVE = 4  # source-size histogram resolution (log2 bins)
MAX_LABELS = 64  # labels shown in the sample grid (the first ones met in input order)


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


def read_samples(run: RunView, scan: Scan) -> dict[Any, list[SampleView]]:
    """The picked items read back from the shards: `open_dataset` for a complete run (the model's
    view, including its caches for remote shards), the shard readers directly for a partial one."""
    picks = [p for group in scan.picks.values() for p in group]
    if not picks:
        return {}
    images = _dataset_images(run, picks) if run.manifest is not None else _shard_images(run, picks)
    by_label: dict[Any, list[SampleView]] = {}
    for pick, image in zip(picks, images):
        item = pick.row.item
        index = pick.index if run.manifest is not None else None
        by_label.setdefault(item.label, []).append(SampleView(item.key, item.label, item.uri, pick.row.shard, index, image))
    return dict(sorted(by_label.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def _dataset_images(run: RunView, picks: list[Pick]) -> list[np.ndarray]:
    from .dataset import open_dataset

    for shard in sorted({p.row.shard_index for p in picks}):  # a FIFO in a shard's place would block its open
        check_regular(run.out, run.shards[shard]["path"])
    with open_dataset(run.out.uri, run.out.storage_options) as ds:
        return [item["image"] for item in ds.get_batch([p.index for p in picks])]


def _shard_images(run: RunView, picks: list[Pick]) -> list[np.ndarray]:
    from .dataset import decode_image
    from .formats.base import open_reader

    images: dict[int, np.ndarray] = {}
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
                images[pos] = image if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 \
                    else decode_image(bytes(image))  # fmt: skip
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
