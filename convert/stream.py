"""Streaming engine (no torch): a deterministic per-epoch order split across ranks and workers.

The epoch's order is a pure function of (seed, epoch, shard counts, partition):
1. shard order: the shards, permuted by `seed` and `epoch` when shuffling;
2. the items of the shards in that order form one sequence of T positions; T = N for the
   "exact" rule (every item once; ranks differ by at most one item), T = N - N % world for "drop"
   (the last N % world positions of the epoch's order are skipped; every rank the same count), and
   T = N rounded up to a multiple of world for "pad" (the first positions are repeated);
3. rank r takes the contiguous span [T*r//world, T*(r+1)//world). Its workers split it in whole
   batches when the batch size is known (`Part.batch`: StreamingDataLoader sets it): batch j of
   the rank goes to worker j % workers, so a DataLoader taking batches round robin yields whole
   batches and one short last batch (len(loader) is true); else worker w takes the contiguous
   sub-span of its own (same floor split), so each reads few shards;
4. within a worker's span, items are shuffled inside blocks of `shuffle_block` positions (Mosaic's
   py1b idea: a block spans a few shards, so reads stay local and memory stays bounded).
Because position -> item is a function, a worker resumes exactly by skipping its first n positions.

`Stream(uri).batches(256)` is the NumPy/JAX entry; `convert.torch.StreamingDataset` wraps it.
Batches hold the stored columns too (`collate`): strings as lists, numbers as arrays, and for each
column `c` a bool mask `c_null` (a null's value is "", NaN, 0 or False).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .dataset import Dataset, read_ahead
from .formats.columns import FILL, NUMPY
from .specs import Column

PARTITIONS = ("exact", "drop", "pad")
READ_BATCH = 64  # items per read while streaming (one get_batch)
DEFAULT_BLOCK_SHARDS = 4  # shuffle block: this many shards' worth of items


@dataclass(frozen=True, slots=True)
class Part:
    """Which consumer this is: rank of world, worker of workers (a DataLoader worker); `batch`:
    the batch size its samples are grouped in (> 1: workers take whole batches in turn)."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1
    batch: int = 0

    @property
    def id(self) -> int:
        return self.rank * self.workers + self.worker


def _span(total: int, parts: int, part: int) -> tuple[int, int]:
    return total * part // parts, total * (part + 1) // parts


class Stream:
    """Epoch-ordered samples or NumPy batches of one converted dataset, for one consumer `Part`."""

    def __init__(
        self,
        uri: str | Dataset,
        storage_options: dict[str, Any] | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_block: int | None = None,
        partition: str = "exact",
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | str | None = None,
        prefetch_shards: int = 2,
        decode: bool = True,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        columns: Sequence[str] | None = None,
    ) -> None:
        if partition not in PARTITIONS:
            raise ValueError(f"partition {partition!r}: expected one of {PARTITIONS}")
        if isinstance(uri, Dataset):
            self.dataset = uri
        else:  # remote shards are streamed whole into the bounded cache
            self.dataset = Dataset(uri, storage_options, cache_dir=cache_dir, decode=decode,
                                   download=True, cache_limit=cache_limit, columns=columns)  # fmt: skip
        self.dataset.cache.prefetch_depth = prefetch_shards
        self.shuffle, self.seed, self.partition, self.transform = shuffle, seed, partition, transform
        self.counts = np.asarray(self.dataset.shards.cols["ok"], np.int64)
        mean = int(self.counts.mean()) if self.counts.size else 1
        self.shuffle_block = max(1, shuffle_block or DEFAULT_BLOCK_SHARDS * mean)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    # -- the order ------------------------------------------------------------------------
    def _shard_order(self) -> np.ndarray:
        n = self.counts.size
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch, 0]).permutation(n)

    def epoch_total(self, world: int) -> int:
        n = int(self.counts.sum())
        if self.partition == "drop":
            return n - n % world
        if self.partition == "pad":
            return -(-n // world) * world
        return n

    def span(self, part: Part) -> tuple[int, int]:
        """This consumer's rank's [start, end) positions in the epoch's sequence."""
        return _span(self.epoch_total(part.world), part.world, part.rank)

    def count(self, part: Part) -> int:
        """How many samples this consumer reads per epoch."""
        lo, hi = self.span(part)
        n, size, workers = hi - lo, part.batch, part.workers
        if size > 1 and workers > 1:
            full, rem = divmod(n, size)
            batches = full + (rem > 0)
            mine = len(range(part.worker, batches, workers))
            short = rem > 0 and (batches - 1) % workers == part.worker
            return mine * size - (size - rem if short else 0)
        a, b = _span(n, workers, part.worker)
        return b - a

    def positions(self, part: Part, lo: int, hi: int) -> np.ndarray:
        """Positions in the epoch's sequence of this consumer's samples lo..hi-1."""
        start, end = self.span(part)
        p = np.arange(lo, hi, dtype=np.int64)
        if part.batch > 1 and part.workers > 1:
            blk, off = np.divmod(p, part.batch)
            return start + (blk * part.workers + part.worker) * part.batch + off
        return start + _span(end - start, part.workers, part.worker)[0] + p

    def indices(self, part: Part, start: int = 0) -> Iterator[np.ndarray]:
        """Dataset indices this consumer reads, from its `start`-th on, one shuffle block at a time."""
        order = self._shard_order()
        seq_starts = np.concatenate([[0], np.cumsum(self.counts[order])])
        ds_starts = np.array([self.dataset.shard_start(int(s)) for s in order], np.int64)
        n = int(seq_starts[-1])
        count, block = self.count(part), self.shuffle_block
        for k, lo in enumerate(range(0, count, block)):
            hi = min(lo + block, count)
            if hi <= start:
                continue
            pos = self.positions(part, lo, hi) % max(n, 1)  # "pad": positions past the end wrap to the start
            j = np.searchsorted(seq_starts, pos, side="right") - 1
            idx = ds_starts[j] + (pos - seq_starts[j])
            if self.shuffle:
                idx = idx[np.random.default_rng([self.seed, self.epoch, 1, part.rank, part.worker, k]).permutation(idx.size)]
            yield idx[max(0, start - lo) :]

    # -- reading --------------------------------------------------------------------------
    def samples(self, part: Part = Part(), start: int = 0) -> Iterator[dict[str, Any]]:
        """The consumer's samples in epoch order from position `start`, read ahead in the background."""
        return read_ahead(self._reads(part, start), self._read)

    def batches(self, batch_size: int, part: Part = Part(), start: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, Any]]:  # fmt: skip
        """NumPy batches {"image": (B, H, W, C) uint8, "label": (B,) int64, "key": list[str],
        <string column>: list[str], <number column>: (B,) array, "<column>_null": (B,) bool}."""
        batch: list[dict[str, Any]] = []
        schema = self.dataset.schema
        for sample in self.samples(part, start):
            batch.append(sample)
            if len(batch) == batch_size:
                yield collate(batch, schema)
                batch = []
        if batch and not drop_last:
            yield collate(batch, schema)

    def _read(self, idx: np.ndarray) -> list[Any]:
        items = self.dataset.get_batch(idx.tolist())
        return [self.transform(item) for item in items] if self.transform else items

    def _reads(self, part: Part, start: int) -> Iterator[np.ndarray]:
        """Read batches of indices; entering a block, remote shards of it and the next are fetched ahead."""
        blocks = self.indices(part, start)
        current, upcoming = next(blocks, None), next(blocks, None)
        while current is not None:
            if not self.dataset.is_local:
                self.dataset.cache.prefetch(self._shards_of(current, upcoming))
            yield from _chunks(current, READ_BATCH)
            current, upcoming = upcoming, next(blocks, None)

    def _shards_of(self, *blocks: np.ndarray | None) -> list[dict[str, Any]]:
        """Shards in order of first use by the read batches of `blocks`."""
        seen: dict[int, None] = {}
        for idx in blocks:
            if idx is not None:
                for i in idx.tolist():
                    seen.setdefault(self.dataset.locate(i)[0], None)
        return [self.dataset.shards[s] for s in seen]


def _chunks(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for lo in range(0, idx.size, size):
        yield idx[lo : lo + size]


def collate(samples: list[dict[str, Any]], schema: tuple[Column, ...] = ()) -> dict[str, Any]:
    """Stack same-shape images and labels into arrays; columns of `schema` as `collate_column`;
    other fields become lists."""
    out: dict[str, Any] = {}
    types = {c.name: c.type for c in schema}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if name in types:
            out.update(collate_column(name, types[name], values))
        elif isinstance(values[0], np.ndarray) and all(v.shape == values[0].shape for v in values):
            out[name] = np.stack(values)
        elif isinstance(values[0], (int, np.integer)):
            out[name] = np.asarray(values, np.int64)
        else:
            out[name] = values
    return out


def collate_column(name: str, kind: str, values: list[Any]) -> dict[str, Any]:
    """{name: list[str] or (B,) array with nulls filled ("", NaN, 0, False), name_null: (B,) bool}."""
    nulls = np.fromiter((v is None for v in values), np.bool_, len(values))
    fill = FILL[kind]
    filled = [fill if v is None else v for v in values]
    return {name: filled if kind == "string" else np.asarray(filled, NUMPY[kind]), f"{name}_null": nulls}


def fill_nulls(sample: dict[str, Any], schema: tuple[Column, ...]) -> dict[str, Any]:
    """One sample as a batch of one would hold it: nulls filled, plus each column's `_null` flag
    (so a DataLoader's default collate stacks every column)."""
    out = dict(sample)
    for col in schema:
        if col.name in out:
            value = out[col.name]
            out[col.name] = FILL[col.type] if value is None else value
            out[f"{col.name}_null"] = value is None
    return out
