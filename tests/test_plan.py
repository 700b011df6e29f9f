"""Planner: pure, deterministic, order-preserving, picklable specs."""

from __future__ import annotations

import pickle

import pytest

from convert.plan import fingerprint, plan_shards
from convert.specs import ItemRef


def refs(n):
    return [ItemRef(f"k{i}", f"/data/{i}.jpg", i % 3) for i in range(n)]


def test_shard_sizes_order_and_names():
    specs = plan_shards(refs(10), 4)
    assert [len(s) for s in specs] == [4, 4, 2]
    assert [s.name for s in specs] == ["shard-00000", "shard-00001", "shard-00002"]
    assert [r.key for s in specs for r in s.items] == [f"k{i}" for i in range(10)]


def test_same_input_same_plan_and_picklable():
    a, b = plan_shards(refs(25), 7), plan_shards(refs(25), 7)
    assert a == b
    assert pickle.loads(pickle.dumps(a)) == a


def test_empty_and_invalid():
    assert plan_shards([], 5) == []
    with pytest.raises(ValueError):
        plan_shards(refs(3), 0)


def test_fingerprint_changes_with_items_and_settings():
    spec = plan_shards(refs(5), 5)[0]
    other = plan_shards(refs(6)[1:], 5)[0]
    s = {"image": {"size": [64, 64]}, "format": "hdf5"}
    assert fingerprint(spec, s) == fingerprint(spec, dict(s))
    assert fingerprint(spec, s) != fingerprint(other, s)
    assert fingerprint(spec, s) != fingerprint(spec, {**s, "format": "lmdb"})
