"""PyTorch streaming reader (optional extra `torch`): `StreamingDataset` + `StreamingDataLoader`.

    ds = StreamingDataset("s3://bucket/out", shuffle=True, seed=0, cache_limit="10GB")
    loader = StreamingDataLoader(ds, batch_size=256, num_workers=2)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader: ...           # {"image": (B,H,W,C) uint8, "label": (B,), "key": [...],
                                           #  "caption": [...], "caption_null": (B,) bool, ...}
        state = loader.state_dict()        # any time mid-epoch: save it with the checkpoint
    loader.load_state_dict(state)          # after a restart: continues with the next unseen item

The order and the split over `torch.distributed` ranks and DataLoader workers are those of
`convert.stream` (a pure function of seed, epoch, world size and worker count; see its docstring
for the "exact" / "drop" / "pad" rules for uneven splits). Encoded shards are decoded in the
workers; remote shards stream into the bounded local cache (`cache_dir`, `cache_limit`).
Elastic resume: a StreamingDataLoader state taken with world size W and K workers resumes with any
W' and K'. The epoch's order is one global sequence that ranks take in interleaved whole batches, so
a state records the batches its rank took; every rank having taken as many (a synchronized step,
as DDP training steps are), the first `batches * W * batch_size` positions are consumed and the new
ranks split the rest (`Part.offset`; each remaining item once under "exact"; "drop"/"pad" apply
their rule to the rest). Same W and K: each worker continues exactly where it was. A state of
another dataset or generation, or another seed, is refused. `persistent_workers` is not
supported by StreamingDataLoader (a worker's position is set when it starts).

Workers take whole batches in turn (the loader's or the dataset's batch size), so every batch but
the epoch's last is full and `len(loader)` is the number of batches yielded, in every partition
mode. Stored columns collate like `convert.stream.collate`: strings to list[str], numbers to
tensors (int64, float64, bool), and each column `c` adds a bool tensor `c_null`; a null's value is
"" (string), NaN (float64), 0 (int64) or False (bool). StreamingDataLoader's workers send the
columns' numbers as NumPy (`ColumnCollate`; a tensor each would cost a shared-memory segment per
batch) and it makes them tensors in the main process.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .stream import Part, Source, Stream, fill_nulls

__all__ = ["Source", "StreamingDataLoader", "StreamingDataset"]

_TAG = "_stream"  # (worker, position) carried from a worker to StreamingDataLoader, then removed


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class StreamingDataset(IterableDataset):  # type: ignore[type-arg]
    """Shuffled, rank- and worker-partitioned stream of a converted dataset.

    Yields {"image": uint8 tensor HWC (CHW with chw=True), "label": int (-1 unlabelled), "key": str},
    or with `batch_size` whole batches collated in the worker (use DataLoader(batch_size=None)).
    `transform(sample) -> sample` runs in the worker on the NumPy sample before tensor conversion.
    `columns`: the stored columns to read (None = all, [] = images, labels and keys only).
    A list of `Source(uri, proportion=|repeat=|choose=)` mixes datasets (`epoch_size`: samples per
    epoch; see `convert.stream`); labels stay each source's own, the columns are those all share.
    """

    def __init__(
        self,
        uri: str | Sequence[Source],
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | str | None = "10GB",
        *,
        storage_options: dict[str, Any] | None = None,
        shuffle_block: int | None = None,
        partition: str = "exact",
        prefetch_shards: int = 2,
        chw: bool = False,
        drop_last: bool = False,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        columns: Sequence[str] | None = None,
        epoch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.stream = Stream(
            uri,
            storage_options,
            shuffle=shuffle,
            seed=seed,
            shuffle_block=shuffle_block,
            partition=partition,
            cache_dir=cache_dir,
            cache_limit=cache_limit,
            prefetch_shards=prefetch_shards,
            transform=transform,
            columns=columns,
            epoch_size=epoch_size,
        )
        self.batch_size, self.chw, self.drop_last = batch_size, chw, drop_last
        self.tag = False  # StreamingDataLoader turns position tags on
        self.loader_batch = 0  # the batch size of the DataLoader batching these samples (StreamingDataLoader)
        self.rotate = 0  # logical worker = (DataLoader worker id + rotate) % workers; see StreamingDataLoader
        self._resume: dict[int, int] = {}  # worker -> positions to skip, for the next iteration
        self._consumed: dict[int, int] = {}  # in-process iteration (num_workers=0) progress
        self._rank_world = _rank_world()
        self.offset = 0  # global positions of the epoch consumed before an elastic resume

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (call on every rank before iterating); clears a resume position."""
        if epoch != self.stream.epoch:
            self._resume, self._consumed, self.offset = {}, {}, 0
        self.stream.set_epoch(epoch)
        self._rank_world = _rank_world()

    def part(self) -> Part:
        info = get_worker_info()
        # a DataLoader worker (spawned, or forked from a process group) may not see the process
        # group: it uses the rank and world size its parent saw when it made the dataset or loader
        rank, world = _rank_world() if info is None else self._rank_world
        workers = info.num_workers if info else 1
        batch = self.batch_size or self.loader_batch
        return Part(rank, world, ((info.id if info else 0) + self.rotate) % workers, workers, batch, self.offset)

    def __len__(self) -> int:
        """Samples (or batches, with batch_size) of this rank per epoch."""
        rank, world = _rank_world()
        n = self.stream.rank_count(Part(rank, world, offset=self.offset))
        return n if self.batch_size is None else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        part = self.part()  # read the resume position now, not at the generator's first step
        start = self._resume.get(part.worker, 0)
        self._resume = {}
        return self._generate(part, start)

    def _generate(self, part: Part, start: int) -> Iterator[Any]:
        if self.batch_size is None:
            schema = self.stream.dataset.schema
            for pos, sample in enumerate(self.stream.samples(part, start), start + 1):
                self._consumed[part.worker] = pos
                yield self._tensors(fill_nulls(sample, schema), part.worker, pos)
        else:
            pos = start
            for batch in self.stream.batches(self.batch_size, part, start, self.drop_last):
                pos += len(batch["key"])
                self._consumed[part.worker] = pos
                yield self._tensors(batch, part.worker, pos)

    def _tensors(self, sample: dict[str, Any], worker: int, pos: int) -> dict[str, Any]:
        out = dict(sample)
        image = out.get("image")
        if isinstance(image, np.ndarray):
            t = torch.from_numpy(image)
            out["image"] = t.movedim(-1, -3).contiguous() if self.chw else t
        keep = self._column_names() if self.tag else frozenset()  # StreamingDataLoader makes those tensors
        for name, value in out.items():  # labels and number columns of a batch
            if name != "image" and name not in keep and isinstance(value, np.ndarray) and value.dtype != object:
                out[name] = torch.from_numpy(value)
        if self.tag:
            out[_TAG] = (worker, pos)
        return out

    def _column_names(self) -> frozenset[str]:
        """The stored columns' names and their `_null` masks."""
        found = self.__dict__.get("_names")
        if found is None:
            names = [c.name for c in self.stream.dataset.schema]
            found = self.__dict__["_names"] = frozenset(names + [f"{n}_null" for n in names])
        return found

    def state_dict(self) -> dict[str, Any]:
        """Progress of in-process iteration (num_workers=0); with workers use StreamingDataLoader's."""
        rank, world = _rank_world()
        return {
            "epoch": self.epoch,
            "seed": self.stream.seed,
            "rank": rank,
            "world": world,
            "workers": 1,
            "consumed": dict(self._consumed),
            "offset": self.offset,
            "dataset": self.stream.identity(),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """A state of another dataset (generation) or seed cannot resume here: one-line ValueError."""
        mine = self.stream.identity()
        if state.get("dataset", mine) != mine:
            raise ValueError(f"cannot resume: the checkpoint is of {state['dataset']}, this dataset is {mine}")
        if state["seed"] != self.stream.seed:
            raise ValueError(f"cannot resume: the checkpoint has seed {state['seed']}, this run {self.stream.seed}")

    def load_state_dict(self, state: dict[str, Any], workers: int = 1) -> None:
        """Continue from `state` at the next iteration: each worker skips what it already yielded."""
        self.check_state(state)
        rank, world = _rank_world()
        if (state["world"], state["workers"], state["seed"]) != (world, workers, self.stream.seed):
            raise ValueError(
                f"cannot resume: state is for world size {state['world']}, {state['workers']} workers, "
                f"seed {state['seed']}; this run has {world}, {workers}, {self.stream.seed}"
            )
        if state["rank"] != rank:
            raise ValueError(f"cannot resume: state was saved by rank {state['rank']}, this is rank {rank}")
        self.stream.set_epoch(state["epoch"])
        self.offset = int(state.get("offset", 0))
        self._consumed = {int(w): int(n) for w, n in state["consumed"].items()}
        self._resume = dict(self._consumed)


class ColumnCollate:
    """default_collate, except for the stored columns: strings stay lists, numbers become NumPy
    arrays, made tensors by StreamingDataLoader in the main process. A worker sends each tensor
    through its own shared-memory segment; a column's few hundred values pickle inline far cheaper
    (four small tensors per batch cost an epoch ~20 %)."""

    def __init__(self, columns: frozenset[str]) -> None:
        self.columns = columns

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        out = default_collate([{k: v for k, v in s.items() if k not in self.columns} for s in samples])
        for name in samples[0]:
            if name in self.columns:
                values = [s[name] for s in samples]
                out[name] = values if isinstance(values[0], str) else np.asarray(values)
        return {k: out[k] for k in samples[0]}


class StreamingDataLoader(DataLoader):  # type: ignore[type-arg]
    """A DataLoader over a StreamingDataset that can save and restore its position mid-epoch."""

    def __init__(self, dataset: StreamingDataset, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("StreamingDataLoader does not support persistent_workers (positions are set per epoch)")
        if dataset.batch_size is not None:
            kwargs.setdefault("batch_size", None)
        elif not args and dataset.stream.dataset.schema:
            kwargs.setdefault("collate_fn", ColumnCollate(dataset._column_names()))
        super().__init__(dataset, *args, **kwargs)
        dataset.tag = True
        dataset.loader_batch = self.batch_size or 0
        self._consumed: dict[int, int] = {}
        self._epoch = dataset.epoch
        self._batches = 0  # batches taken this epoch
        self._complete = False  # the epoch ran to its end: the next iteration starts it afresh

    def __iter__(self) -> Iterator[Any]:
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        if ds.epoch != self._epoch or self._complete:
            self._consumed, self._epoch, self._batches, ds.offset = {}, ds.epoch, 0, 0
        self._complete = False
        # copied into the workers as they start. A DataLoader takes batches from its workers round
        # robin starting at worker 0: rotating the logical workers by the batches already taken
        # makes a resumed epoch continue in the same interleaving as an uninterrupted one.
        ds._resume, ds.rotate = dict(self._consumed), self._batches % max(1, self.num_workers)
        ds.loader_batch = self.batch_size or 0
        ds._rank_world = _rank_world()
        iterator = super().__iter__()
        ds._resume, ds.rotate = {}, 0
        for batch in iterator:
            tag = batch.pop(_TAG)
            workers, positions = (tag[0], tag[1]) if isinstance(tag, (list, tuple)) else (tag[:, 0], tag[:, 1])
            for w, p in zip(
                torch.as_tensor(workers).reshape(-1).tolist(), torch.as_tensor(positions).reshape(-1).tolist()
            ):
                self._consumed[w] = max(self._consumed.get(w, 0), p)
            for name, value in batch.items():  # the columns' numbers, sent as NumPy (ColumnCollate)
                if isinstance(value, np.ndarray) and value.dtype != object:
                    batch[name] = torch.from_numpy(value)
            self._batches += 1
            yield batch
        self._complete = True

    def state_dict(self) -> dict[str, Any]:
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        rank, world = _rank_world()
        return {
            "epoch": self._epoch,
            "seed": ds.stream.seed,
            "rank": rank,
            "world": world,
            "workers": max(1, self.num_workers),
            "consumed": dict(self._consumed),
            "batches": self._batches,
            "batch_size": ds.batch_size or self.batch_size or 0,
            "offset": ds.offset,
            "dataset": ds.stream.identity(),
        }

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Continue from `state`: exactly where each worker was (same world size and workers), else
        from the global position every rank had reached (elastic resume; see the module docstring).
        A list of every rank's states (gathered) is checked to be of one synchronized step."""
        ds: StreamingDataset = self.dataset  # type: ignore[assignment]
        if not isinstance(state, dict):
            state = _one_step(list(state), *_rank_world())
        ds.check_state(state)
        if (state["world"], state["workers"]) != (_rank_world()[1], max(1, self.num_workers)):
            old = Part(
                0,
                int(state["world"]),
                0,
                int(state["workers"]),
                max(1, int(state.get("batch_size") or 1)),
                int(state.get("offset", 0)),
            )
            ds.set_epoch(state["epoch"])
            ds.offset = ds.stream.consumed(old, int(state.get("batches", 0)))
            ds._resume, ds._consumed = {}, {}
            self._consumed, self._epoch, self._batches, self._complete = {}, ds.epoch, 0, False
            return
        size, saved = ds.batch_size or self.batch_size or 0, state.get("batch_size")
        if self.num_workers > 1 and saved is not None and saved != size:  # workers own batches of that size
            raise ValueError(f"cannot resume: state is for batch size {saved}, this loader has {size}")
        ds.load_state_dict(state, workers=max(1, self.num_workers))
        self._consumed, self._epoch = dict(ds._resume), ds.epoch
        self._batches, self._complete = int(state.get("batches", 0)), False


def _one_step(states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
    """This rank's state of a list of every old rank's (its own when the world size is the same),
    after checking they are of one epoch and one synchronized step."""
    if not states:
        raise ValueError("cannot resume: an empty list of states")
    steps = sorted({(int(s["epoch"]), int(s.get("batches", 0))) for s in states})
    if len(steps) > 1:
        raise ValueError(
            f"cannot resume: the ranks' states are at different (epoch, batches) {steps}; "
            "take the checkpoint at a synchronized step"
        )
    by_rank = {int(s["rank"]): s for s in states}
    return by_rank.get(rank, states[0]) if world == int(states[0]["world"]) else states[0]
