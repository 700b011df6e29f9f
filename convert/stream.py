"""Streaming engine (no torch): a deterministic per-epoch order split across ranks and workers.

The epoch's order is a pure function of (seed, epoch, shard counts, partition), over the GLOBAL
sequence (not per rank), so any world size and worker count can continue it:
1. shard order: the shards, permuted by `seed` and `epoch` when shuffling;
2. the items of the shards in that order, shuffled inside global blocks of `shuffle_block`
   positions (Mosaic's py1b idea: a block spans a few shards, so reads stay local and memory
   bounded), form one sequence of N positions;
3. after `Part.offset` positions (consumed before an elastic resume; 0 otherwise) T positions are
   read: T = the rest for "exact" (every item once; ranks differ by at most one item), the rest
   minus rest % world for "drop" (every rank the same count), the rest rounded up to a multiple of
   world for "pad" (positions past the end wrap to the start);
4. in batches of B = `Part.batch` (1 when unknown): the epoch's batch j*world + r is rank r's
   batch j, for the F = T // (world*B) full rounds; the last round's rest is split by rank (floor
   split); rank batch j goes to worker j % workers, so a DataLoader taking batches round robin
   yields whole batches and one short last batch (len(loader) is true).
Because position -> item is a function, a worker resumes exactly by skipping its first n
positions, and a checkpoint at a synchronized step (every rank took b batches) has consumed the
first b*world*B positions: `consumed()` gives that offset for a resume with other W', K', B'.

Mixing: `Stream([Source(uri, proportion=0.7), Source(uri2, repeat=2)], epoch_size=N)`. Each source
takes n_s samples per epoch (proportion: that share of epoch_size; repeat: passes over it; choose:
an absolute count; none: one pass), read as passes over its shards in a per-(seed, epoch, source,
pass) shard order and shuffled inside blocks; the sources are interleaved evenly (sample k of source
s sits at fraction (k + u) / n_s of the epoch, u uniform in [0, 1) per sample: jittered, so batches
taken in turn by ranks do not alias a periodic pattern): any contiguous span holds each source's
share within 2 samples, a rank's interleaved batches within a few. That mixed sequence (held as
one int64 array per epoch, 8 bytes a sample) replaces steps 1-2; steps 3-4 are unchanged.

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
Uri = str | Dataset
READ_BATCH = 64  # items per read while streaming (one get_batch)
DEFAULT_BLOCK_SHARDS = 4  # shuffle block: this many shards' worth of items


@dataclass(frozen=True, slots=True)
class Part:
    """Which consumer this is: rank of world, worker of workers (a DataLoader worker); `batch`:
    the batch size its samples are grouped in (workers take whole batches in turn); `offset`: the
    epoch's positions consumed before (an elastic resume's: any world and worker count follow it)."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1
    batch: int = 0
    offset: int = 0

    @property
    def id(self) -> int:
        return self.rank * self.workers + self.worker


@dataclass(frozen=True, slots=True)
class Source:
    """One dataset of a mix (as Mosaic's Stream): `proportion` = its share of the epoch's samples,
    `repeat` = passes over it per epoch (may be fractional), `choose` = an absolute sample count;
    at most one of them (none: one pass)."""

    uri: Uri
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    storage_options: dict[str, Any] | None = None

    def describe(self, k: int) -> str:
        return f"source {k} ({self.uri if isinstance(self.uri, str) else self.uri.uri})"


def mix_sizes(sources: Sequence[Source], lengths: Sequence[int], epoch_size: int | None) -> list[int]:
    """Samples per epoch of each source; a spec that does not sum sensibly is a one-line ValueError."""
    fixed: dict[int, float] = {}
    props: dict[int, float] = {}
    for k, (src, n) in enumerate(zip(sources, lengths)):
        given = {a: v for a in ("proportion", "repeat", "choose") if (v := getattr(src, a)) is not None}
        if len(given) > 1:
            raise ValueError(f"{src.describe(k)}: give one of proportion, repeat, choose (got {', '.join(given)})")
        if any(not np.isfinite(v) for v in given.values()):
            raise ValueError(
                f"{src.describe(k)}: {', '.join(f'{a}={v}' for a, v in given.items())} is not a finite number"
            )
        if any(v < 0 for v in given.values()):
            raise ValueError(f"{src.describe(k)}: {', '.join(f'{a}={v}' for a, v in given.items())} is negative")
        if src.proportion is not None:
            props[k] = float(src.proportion)
        else:
            fixed[k] = (
                float(src.choose) if src.choose is not None else (src.repeat if src.repeat is not None else 1.0) * n
            )
    if epoch_size is not None and epoch_size < 0:
        raise ValueError(f"epoch_size={epoch_size} is negative")
    total_p, total_fixed = sum(props.values()), sum(fixed.values())
    if props and total_p == 0:
        raise ValueError(f"{sources[min(props)].describe(min(props))}: the proportions sum to 0")
    if epoch_size is None:
        if total_p > 1 + 1e-9:
            raise ValueError(
                f"{sources[min(props)].describe(min(props))}: the proportions sum to {total_p:g} > 1; "
                "lower them or set epoch_size"
            )
        if props and total_fixed == 0:  # proportions only: an epoch as long as the sources together
            epoch_size = int(sum(lengths))
        elif props and total_p >= 1 - 1e-9:
            raise ValueError(
                f"{sources[min(props)].describe(min(props))}: the proportions sum to 1 and other "
                "sources have fixed sizes; set epoch_size"
            )
        else:
            epoch_size = round(total_fixed / (1 - total_p)) if props else round(total_fixed)
    want = dict(fixed)
    if props:
        rest = epoch_size - total_fixed
        if rest < 0:
            raise ValueError(f"epoch_size={epoch_size} is less than the fixed sources' {total_fixed:g} samples")
        want.update({k: p / total_p * rest for k, p in props.items()})
    elif total_fixed > 0:  # fixed sizes only: scaled to epoch_size
        want = {k: v * epoch_size / total_fixed for k, v in fixed.items()}
    return _round_to(np.array([want[k] for k in range(len(sources))]), epoch_size)


def _round_to(values: np.ndarray, total: int) -> list[int]:
    """Integers summing to round(sum) (or `total`), each within one of its value (largest remainder)."""
    target = int(round(values.sum())) if abs(values.sum() - total) > 0.5 else int(total)
    base = np.floor(values).astype(np.int64)
    extra = target - int(base.sum())
    if extra > 0:
        base[np.argsort(-(values - base), kind="stable")[:extra]] += 1
    return base.tolist()


def _span(total: int, parts: int, part: int) -> tuple[int, int]:
    return total * part // parts, total * (part + 1) // parts


class Stream:
    """Epoch-ordered samples or NumPy batches of one converted dataset, for one consumer `Part`."""

    def __init__(
        self,
        uri: Uri | Sequence[Source],
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
        epoch_size: int | None = None,
    ) -> None:
        if partition not in PARTITIONS:
            raise ValueError(f"partition {partition!r}: expected one of {PARTITIONS}")
        mixing = not isinstance(uri, (str, Dataset))
        given: list[Any] = list(uri) if mixing else [Source(uri, storage_options=storage_options)]  # type: ignore[arg-type]
        if not given or not all(isinstance(src, Source) for src in given):
            raise ValueError("Stream: give a URI, a Dataset or a non-empty list of convert.stream.Source")
        sources: list[Source] = given

        def open_one(src: Source, cols: Sequence[str] | None) -> Dataset:
            if isinstance(src.uri, Dataset):
                return src.uri
            return Dataset(
                src.uri,
                src.storage_options or storage_options,
                cache_dir=cache_dir,
                decode=decode,
                download=True,
                cache_limit=cache_limit,
                columns=cols,
            )

        self.datasets = [open_one(src, columns) for src in sources]
        if mixing:  # the columns every source has (same name and type), so batches collate
            common = set.intersection(*({(c.name, c.type) for c in d.schema} for d in self.datasets))
            names = [c.name for c in self.datasets[0].schema if (c.name, c.type) in common]
            if any(len(d.schema) != len(names) for d in self.datasets):
                self.datasets = [open_one(src, names) for src in sources]
        self.dataset = self.datasets[0]
        for d in self.datasets:
            d.cache.prefetch_depth = prefetch_shards
        self.shuffle, self.seed, self.partition, self.transform = shuffle, seed, partition, transform
        self.counts = np.asarray(self.dataset.shards.cols["ok"], np.int64)
        lengths = [len(d) for d in self.datasets]
        self.sizes = mix_sizes(sources, lengths, epoch_size) if mixing else None
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # global id = offset + index
        mean = int(self.counts.mean()) if self.counts.size else 1
        self.shuffle_block = max(1, shuffle_block or DEFAULT_BLOCK_SHARDS * mean)
        self.epoch = 0
        self._mixed: tuple[int, np.ndarray] | None = None  # (epoch, mixed sequence of global ids)
        self._starts: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, sequence starts, dataset starts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def identity(self) -> str:
        """Which dataset generation(s) this reads (a checkpoint of another cannot resume here)."""
        return " + ".join(
            f"index {str((d.manifest.get('index') or {}).get('sha256', 'inline'))[:12]} "
            f"generation {d.manifest.get('generation', 0)}"
            for d in self.datasets
        )

    def __len__(self) -> int:
        """Samples in an epoch before the rank split (a mix: the sum of its sources' sizes)."""
        return sum(self.sizes) if self.sizes is not None else len(self.dataset)

    # -- the order ------------------------------------------------------------------------
    def _shard_order(self) -> np.ndarray:
        n = self.counts.size
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch, 0]).permutation(n)

    def _mixed_sequence(self) -> np.ndarray:
        """The epoch's mixed sequence of global ids: each source's passes, interleaved evenly."""
        if self._mixed is not None and self._mixed[0] == self.epoch:
            return self._mixed[1]
        assert self.sizes is not None
        ids, keys = [], []
        for s, (d, n) in enumerate(zip(self.datasets, self.sizes)):
            counts = np.asarray(d.shards.cols["ok"], np.int64)
            starts = np.array([d.shard_start(k) for k in range(counts.size)], np.int64)
            seq: list[np.ndarray] = []
            p = 0
            while sum(x.size for x in seq) < n and len(d):
                order = np.arange(counts.size)
                if self.shuffle:
                    order = np.random.default_rng([self.seed, self.epoch, 4, s, p]).permutation(counts.size)
                one = np.concatenate([np.arange(starts[k], starts[k] + counts[k], dtype=np.int64) for k in order])
                seq.append(self._block_shuffle(one, [s, p]))
                p += 1
            ids.append(self.offsets[s] + np.concatenate(seq or [np.zeros(0, np.int64)])[:n])
            u = np.random.default_rng([self.seed, self.epoch, 5, s]).random(n) if self.shuffle else 0.5
            keys.append((np.arange(n) + u) / max(n, 1))
        mixed = np.concatenate(ids)[np.argsort(np.concatenate(keys), kind="stable")]
        self._mixed = (self.epoch, mixed)
        return mixed

    def _shard_starts(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shards in order: where each starts in the sequence and in the dataset (cached)."""
        if self._starts is None or self._starts[0] != self.epoch:
            order = self._shard_order()
            seq_starts = np.concatenate([[0], np.cumsum(self.counts[order])])
            ds_starts = np.array([self.dataset.shard_start(int(k)) for k in order], np.int64)
            self._starts = (self.epoch, seq_starts, ds_starts)
        return self._starts[1], self._starts[2]

    def _block_shuffle(self, seq: np.ndarray, key: list[int]) -> np.ndarray:
        """`seq` shuffled inside blocks of `shuffle_block` (a source of a mix: the mix then keeps
        its proportions in every span of the epoch)."""
        if not self.shuffle:
            return seq
        out, block = seq.copy(), self.shuffle_block
        for b, lo in enumerate(range(0, seq.size, block)):
            part = out[lo : lo + block]
            out[lo : lo + block] = part[
                np.random.default_rng([self.seed, self.epoch, 6, *key, b]).permutation(part.size)
            ]
        return out

    def epoch_total(self, world: int, offset: int = 0) -> int:
        """Positions read after the first `offset` (an elastic resume's), by the partition rule."""
        n = len(self) - offset
        if self.partition == "drop":
            return n - n % world
        if self.partition == "pad":
            return -(-n // world) * world
        return n

    def _layout(self, part: Part) -> tuple[int, int, int, int]:
        """(batch B, full rounds F of world x B positions, this rank's [lo, hi) of the last round's rest)."""
        size = max(1, part.batch)
        total = self.epoch_total(part.world, part.offset)
        rounds = total // (part.world * size)
        lo, hi = _span(total - rounds * part.world * size, part.world, part.rank)
        return size, rounds, lo, hi

    def rank_count(self, part: Part) -> int:
        """How many samples this consumer's rank reads per epoch (the same for every batch size)."""
        size, rounds, lo, hi = self._layout(part)
        return rounds * size + hi - lo

    def count(self, part: Part) -> int:
        """How many samples this consumer reads per epoch."""
        size, rounds, lo, hi = self._layout(part)
        batches = rounds + (hi > lo)
        mine = len(range(part.worker, batches, part.workers))
        short = hi > lo and (batches - 1) % part.workers == part.worker
        return mine * size - (size - (hi - lo) if short else 0)

    def consumed(self, part: Part, batches: int) -> int:
        """Global positions consumed (offset included) when every rank has taken `batches` batches."""
        size, rounds, _, _ = self._layout(part)
        total = self.epoch_total(part.world, part.offset)
        return part.offset + (batches * part.world * size if batches <= rounds else total)

    def positions(self, part: Part, lo: int, hi: int) -> np.ndarray:
        """Global positions of this consumer's samples lo..hi-1: rank batch j is the epoch's batch
        j * world + rank (the last round's rest split by rank), taken by worker j % workers."""
        size, rounds, rest_lo, _ = self._layout(part)
        wb, off = np.divmod(np.arange(lo, hi, dtype=np.int64), size)
        j = wb * part.workers + part.worker
        pos = np.where(
            j < rounds, (j * part.world + part.rank) * size + off, rounds * part.world * size + rest_lo + off
        )
        return part.offset + pos

    def items(self, pos: np.ndarray, perms: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """Dataset (a mix: global) ids at global positions `pos`: the sequence of shards (or the mix)
        shuffled inside blocks of `shuffle_block` positions; "pad" positions past the end wrap."""
        n = len(self)
        pos = pos % max(n, 1)
        if self.shuffle and pos.size and self.sizes is None:  # (a mix shuffles each source before mixing)
            perms = {} if perms is None else perms
            block = self.shuffle_block
            k = pos // block
            for b in np.unique(k).tolist():
                if b not in perms:
                    if len(perms) > 8:
                        perms.clear()
                    size = min(block, n - b * block)
                    perms[b] = np.random.default_rng([self.seed, self.epoch, 1, b]).permutation(size)
                sel = k == b
                pos = np.where(sel, b * block + perms[b][np.where(sel, pos - b * block, 0)], pos)
        if self.sizes is not None:
            return self._mixed_sequence()[pos]
        seq_starts, ds_starts = self._shard_starts()
        j = np.searchsorted(seq_starts, pos, side="right") - 1
        return ds_starts[j] + (pos - seq_starts[j])

    def indices(self, part: Part, start: int = 0) -> Iterator[np.ndarray]:
        """Dataset indices this consumer reads, from its `start`-th on, a shuffle block's worth at a time."""
        count, block = self.count(part), self.shuffle_block
        perms: dict[int, np.ndarray] = {}
        for lo in range(start, count, block):
            yield self.items(self.positions(part, lo, min(lo + block, count)), perms)

    # -- reading --------------------------------------------------------------------------
    def samples(self, part: Part = Part(), start: int = 0) -> Iterator[dict[str, Any]]:
        """The consumer's samples in epoch order from position `start`, read ahead in the background."""
        return read_ahead(self._reads(part, start), self._read)

    def batches(
        self, batch_size: int, part: Part = Part(), start: int = 0, drop_last: bool = False
    ) -> Iterator[dict[str, Any]]:
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
        items: list[Any]
        if self.sizes is None:
            items = self.dataset.get_batch(idx.tolist())
        else:  # global ids: one read per source, back in the mixed order
            src = np.searchsorted(self.offsets, idx, side="right") - 1
            items = [None] * idx.size
            for s in np.unique(src).tolist():
                where = np.flatnonzero(src == s)
                for i, item in zip(where.tolist(), self.datasets[s].get_batch((idx[where] - self.offsets[s]).tolist())):
                    items[i] = item
        return [self.transform(item) for item in items] if self.transform else items

    def _reads(self, part: Part, start: int) -> Iterator[np.ndarray]:
        """Read batches of indices; entering a block, remote shards of it and the next are fetched ahead."""
        blocks = self.indices(part, start)
        current, upcoming = next(blocks, None), next(blocks, None)
        while current is not None:
            if self.sizes is None and not self.dataset.is_local:  # (a mix's sources fetch on demand)
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
