"""Mixing datasets in one stream: `Source(uri, proportion=|repeat=|choose=)` + `epoch_size`.

The asked proportions hold (+-1 %) over an epoch read through torch DataLoaders (0 and 2 workers) and
on every rank; ranks are disjoint; the order is a function of (seed, epoch); a mid-epoch resume gives
the rest exactly; a spec that does not sum sensibly is a one-line ValueError naming the source.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from convert.formats.base import Sample
from convert.stream import Part, Source, Stream
from convert.testing.formats import write_dataset

SIZES = {"a": 300, "b": 200, "c": 100}


@pytest.fixture(scope="module")
def uris(tmp_path_factory) -> dict[str, str]:
    """Three small raw HDF5 / LMDB datasets whose keys start with their name."""
    out = {}
    rng = np.random.default_rng(0)
    for (name, n), fmt in zip(SIZES.items(), ["hdf5", "lmdb", "hdf5"]):
        samples = [Sample(f"{name}{i:04d}", i % 3, rng.integers(0, 256, (4, 4, 3), np.uint8), ()) for i in range(n)]
        out[name] = write_dataset(
            Path(tmp_path_factory.mktemp(name)), fmt, samples, 16, image_shape=(4, 4, 3), columns=()
        )
    return out


def _keys(stream: Stream, part: Part | None = None, start: int = 0) -> list[str]:
    return [s["key"] for s in stream.samples(part or Part(), start)]


def _shares(keys: list[str]) -> dict[str, float]:
    counts = Counter(k[0] for k in keys)
    return {name: counts[name] / len(keys) for name in SIZES}


def _mix(uris: dict[str, str], **kw) -> Stream:
    sources = [Source(uris["a"], proportion=0.5), Source(uris["b"], proportion=0.3), Source(uris["c"], proportion=0.2)]
    return Stream(sources, epoch_size=500, **kw)


def test_proportions_hold_on_every_rank_and_ranks_are_disjoint(uris):
    stream = _mix(uris, seed=1, shuffle_block=40)
    assert len(stream) == 500 and stream.sizes == [250, 150, 100]
    parts = [Part(r, 3, w, 2, 8) for r in range(3) for w in range(2)]
    seen = {p: _keys(stream, p) for p in parts}
    every = [k for keys in seen.values() for k in keys]
    assert len(every) == len(set(every)) == 500  # no source is repeated: every item at most once, ranks disjoint
    assert Counter(k[0] for k in every) == {"a": 250, "b": 150, "c": 100}
    for r in range(3):
        shares = _shares([k for p in parts if p.rank == r for k in seen[p]])
        assert all(abs(shares[n] - want) <= 0.03 for n, want in zip(SIZES, (0.5, 0.3, 0.2))), shares
    assert all(stream.count(p) == len(seen[p]) for p in parts)


def test_repeat_and_choose(uris):
    stream = Stream([Source(uris["a"], repeat=2), Source(uris["c"], choose=50), Source(uris["b"], repeat=0.5)])
    keys = _keys(stream)
    counts = Counter(keys)
    assert len(keys) == 600 + 50 + 100 and stream.sizes == [600, 50, 100]
    assert all(counts[f"a{i:04d}"] == 2 for i in range(300))  # two whole passes
    assert sum(1 for k in counts if k[0] == "c") == 50 and all(counts[k] == 1 for k in counts if k[0] in "bc")


def test_order_is_a_function_of_seed_and_epoch(uris):
    first = _keys(_mix(uris, seed=3), Part(1, 2))
    assert first == _keys(_mix(uris, seed=3), Part(1, 2))
    other = _mix(uris, seed=3)
    other.set_epoch(1)
    assert _keys(other, Part(1, 2)) != first
    assert _keys(_mix(uris, seed=4), Part(1, 2)) != first


def test_resume_from_a_position(uris):
    stream, part = _mix(uris, seed=2, shuffle_block=30), Part(0, 2, 1, 2, 8)
    full = _keys(stream, part)
    for k in (0, 1, 29, 30, 77, len(full)):
        assert full[:k] + _keys(stream, part, start=k) == full


@pytest.mark.parametrize(
    "spec, epoch_size, message",
    [
        ([("a", {"proportion": -0.1})], None, "source 0 .*a.*: proportion=-0.1 is negative"),
        ([("a", {"proportion": 0.5, "repeat": 2})], None, "source 0 .*: give one of proportion, repeat, choose"),
        ([("a", {"proportion": 0.7}), ("b", {"proportion": 0.6})], None, "source 0 .*: the proportions sum to 1.3 > 1"),
        ([("a", {"proportion": 0.0}), ("b", {"proportion": 0.0})], 100, "source 0 .*: the proportions sum to 0"),
        ([("a", {"choose": -3})], None, "source 0 .*: choose=-3 is negative"),
        ([("a", {"choose": 400}), ("b", {"proportion": 0.5})], 300, "epoch_size=300 is less than"),
    ],
)
def test_a_mix_that_does_not_sum_is_a_one_line_error(uris, spec, epoch_size, message):
    with pytest.raises(ValueError, match=message) as err:
        Stream([Source(uris[n], **kw) for n, kw in spec], epoch_size=epoch_size)
    assert "\n" not in str(err.value)


def test_proportions_without_epoch_size(uris):
    # a fixed source of 100 samples and 0.75 for the other: an epoch of 400
    stream = Stream([Source(uris["c"]), Source(uris["a"], proportion=0.75)])
    assert stream.sizes == [100, 300] and len(stream) == 400


@pytest.mark.torch
@pytest.mark.parametrize("workers", [0, 2])
def test_torch_loader_mix_proportions_ranks_and_resume(uris, workers, monkeypatch):
    pytest.importorskip("torch")
    from convert.torch import StreamingDataLoader, StreamingDataset

    def loader(rank: int) -> StreamingDataLoader:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        sources = [
            Source(uris["a"], proportion=0.6),
            Source(uris["b"], proportion=0.25),
            Source(uris["c"], proportion=0.15),
        ]
        return StreamingDataLoader(
            StreamingDataset(sources, epoch_size=400, seed=7, shuffle_block=50), batch_size=10, num_workers=workers
        )

    ranks = []
    for rank in range(2):
        batches = [b["key"] for b in loader(rank)]
        assert len(batches) == len(loader(rank)) and all(len(b) == 10 for b in batches)
        ranks.append([k for b in batches for k in b])
        shares = _shares(ranks[-1])  # a rank's interleaved batches: within a few samples of its share
        assert all(abs(shares[n] - want) <= 0.03 for n, want in zip(SIZES, (0.6, 0.25, 0.15))), shares
        head_loader = loader(rank)
        it, head = iter(head_loader), []
        for _ in range(7):
            head += next(it)["key"]
        state = json.loads(json.dumps(head_loader.state_dict()))
        del it
        resumed = loader(rank)
        resumed.load_state_dict(state)
        assert head + [k for b in resumed for k in b["key"]] == ranks[-1]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 400
    shares = _shares(ranks[0] + ranks[1])  # the epoch: the asked proportions (+-1 %)
    assert all(abs(shares[n] - want) <= 0.01 for n, want in zip(SIZES, (0.6, 0.25, 0.15))), shares
