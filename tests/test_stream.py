"""NumPy streaming engine: the per-epoch order, its split over ranks x workers, resume by position."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from convert import run
from convert.config import load_config
from convert.dataset import open_dataset
from convert.stream import Part, Stream
from convert.testing import images as gen

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module", params=["hdf5", "lmdb"])
def dataset_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    gen.write_image_folder(root, {"a": 23, "b": 20, "c": 14}, size=(24, 20))
    out = tmp_path_factory.mktemp(f"out-{request.param}")
    cfg = load_config(
        None,
        {
            "source.uri": str(root),
            "output.uri": str(out),
            "output.format": request.param,
            "image.size": 8,
            "shard.size": 6,
            "cluster.workers": 1,
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    return str(out)


def _keys(stream: Stream, part: Part, start: int = 0) -> list[str]:
    return [s["key"] for s in stream.samples(part, start)]


@pytest.mark.parametrize("partition", ["exact", "drop", "pad"])
def test_ranks_and_workers_split_an_epoch(dataset_dir, partition):
    stream = Stream(dataset_dir, seed=3, partition=partition, shuffle_block=10)
    all_keys = [open_dataset(dataset_dir)[i]["key"] for i in range(len(stream))]  # 57 items
    parts = [Part(r, 2, w, 3) for r in range(2) for w in range(3)]
    seen = {p: _keys(stream, p) for p in parts}
    counts = Counter(k for keys in seen.values() for k in keys)
    per_rank = [sum(len(seen[p]) for p in parts if p.rank == r) for r in range(2)]
    if partition == "exact":
        assert counts == Counter(all_keys)  # every item exactly once
        assert abs(per_rank[0] - per_rank[1]) <= 1
    elif partition == "drop":
        assert set(counts.values()) == {1} and len(counts) == len(all_keys) - 1 and per_rank == [28, 28]
    else:
        assert set(counts) == set(all_keys) and sum(counts.values()) == 58 and per_rank == [29, 29]
    assert all(stream.count(p) == len(seen[p]) for p in parts)


def test_order_is_a_function_of_seed_and_epoch(dataset_dir):
    part = Part(1, 2, 0, 2)
    a, b = Stream(dataset_dir, seed=5), Stream(dataset_dir, seed=5)
    first = _keys(a, part)
    assert first == _keys(b, part)
    a.set_epoch(1)
    assert _keys(a, part) != first and sorted(_keys(a, part)) != []
    assert _keys(Stream(dataset_dir, seed=6), part) != first
    ordered = Stream(dataset_dir, shuffle=False)
    ds = open_dataset(dataset_dir)
    assert _keys(ordered, Part()) == [ds[i]["key"] for i in range(len(ds))]


def test_resume_from_a_position_continues_exactly(dataset_dir):
    stream, part = Stream(dataset_dir, seed=1, shuffle_block=7), Part(0, 1, 1, 2)
    full = _keys(stream, part)
    for k in (0, 1, 6, 7, 13, len(full) - 1, len(full)):
        assert full[:k] + _keys(stream, part, start=k) == full


def test_numpy_batches(dataset_dir):
    stream = Stream(dataset_dir, seed=0)
    batches = list(stream.batches(16))
    assert [len(b["key"]) for b in batches] == [16, 16, 16, 9]
    assert batches[0]["image"].shape == (16, 8, 8, 3) and batches[0]["image"].dtype == np.uint8
    assert batches[0]["label"].dtype == np.int64
    ds = open_dataset(dataset_dir)
    by_key = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    for b in batches:
        for key, image, label in zip(b["key"], b["image"], b["label"]):
            np.testing.assert_array_equal(image, by_key[key]["image"])
            assert label == by_key[key]["label"]
    assert [len(b["key"]) for b in stream.batches(16, drop_last=True)] == [16, 16, 16]


@pytest.mark.parametrize("size", [4, 5, 64])
def test_workers_take_whole_batches_in_turn(dataset_dir, size):
    """Part.batch: taken round robin (as a DataLoader does), every batch but the last is whole."""
    stream = Stream(dataset_dir, seed=5, shuffle_block=9)
    parts = [Part(0, 1, w, 3, size) for w in range(3)]
    keys = [_keys(stream, p) for p in parts]
    assert [len(k) for k in keys] == [stream.count(p) for p in parts]
    batches = [[k[i : i + size] for i in range(0, len(k), size)] for k in keys]
    merged = [b for turn in range(max(map(len, batches))) for bs in batches if turn < len(bs) for b in [bs[turn]]]
    assert all(len(b) == size for b in merged[:-1]) and len(merged) == -(-len(stream) // size)
    assert sorted(k for b in merged for k in b) == sorted(
        open_dataset(dataset_dir)[i]["key"] for i in range(len(stream))
    )
    assert _keys(stream, parts[1], start=3) == keys[1][3:]  # resume by position
