"""Views: deterministic splits (fraction/count, seeded, stratified), column filters that read no
image bytes, composition, and small pickles that recompute the same members in another process."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest

from convert import run
from convert.config import load_config
from convert.dataset import open_dataset
from convert.testing import images as gen
from convert.views import View, parse_filter, parse_split, view

CLASSES = {"a": 30, "b": 20, "c": 7}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    gen.write_image_folder(root, CLASSES, size=(24, 20))
    out = tmp_path_factory.mktemp("out")
    cfg = load_config(
        None,
        {"source.uri": str(root), "output.uri": str(out), "image.size": 8, "shard.size": 6, "cluster.kind": "threads"},
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    return str(out)


def _keys(items):
    return [item["key"] for item in items]


@pytest.mark.parametrize("seed", [0, 7, None])
def test_90_10_split_is_disjoint_and_covers_everything(dataset_dir, seed):
    ds = open_dataset(dataset_dir)
    train, val = View(ds, split="train[:90%]", seed=seed), View(ds, split="train[90%:]", seed=seed)
    assert len(train) == round(0.9 * len(ds)) and len(train) + len(val) == len(ds)
    assert set(_keys(train)).isdisjoint(_keys(val))
    assert sorted(_keys(train) + _keys(val)) == sorted(_keys(ds))
    assert _keys(train) == [ds[int(i)]["key"] for i in train.indices]  # members in dataset order
    if seed is None:
        assert train.indices.tolist() == list(range(len(train)))


def test_seeded_split_is_deterministic_and_depends_on_the_seed(dataset_dir):
    ds = open_dataset(dataset_dir)
    a, b, c = (View(ds, split="[:50%]", seed=s).indices for s in (3, 3, 4))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_count_and_range_bounds(dataset_dir):
    ds = open_dataset(dataset_dir)
    n = len(ds)
    assert View(ds, split="train[:10]", seed=None).indices.tolist() == list(range(10))
    assert View(ds, split="[-5:]", seed=None).indices.tolist() == list(range(n - 5, n))
    assert View(ds, split="[10%:20%]", seed=None).indices.tolist() == list(range(round(0.1 * n), round(0.2 * n)))
    assert View(ds, split="[:10]").indices.tolist() != list(range(10))  # seed 0 by default: not the first ten
    assert len(View(ds, split="[:100000]")) == n and len(View(ds, split="train")) == n
    parts = [View(ds, split=f"[{p}%:{p + 10}%]", seed=1).indices for p in range(0, 100, 10)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))  # ten deciles tile the dataset


def test_stratified_split_keeps_label_proportions(dataset_dir):
    ds = open_dataset(dataset_dir)
    labels = Counter(item["label"] for item in ds)
    for split, share in (("[:90%]", 0.9), ("[90%:]", 0.1), ("[:25]", 25 / len(ds))):
        got = Counter(item["label"] for item in View(ds, split=split, seed=5, stratify=True))
        assert all(abs(got[label] - share * count) <= 1 for label, count in labels.items()), (split, got)
    train, val = View(ds, split="[:90%]", seed=5, stratify=True), View(ds, split="[90%:]", seed=5, stratify=True)
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(len(ds)))


@pytest.mark.parametrize("text", ["train[:90]]", "train[a:b]", "train[:150%]", "train[1.5:]", "", "[:90%", "x y"])
def test_a_split_that_does_not_parse_is_one_line_naming_the_syntax(dataset_dir, text):
    with pytest.raises(ValueError) as err:
        View(open_dataset(dataset_dir), split=text)
    message = str(err.value)
    assert "\n" not in message and "NAME[START:STOP]" in message and "train[:90%]" in message


def test_parse_split_and_filter_values():
    split = parse_split("val[10%:-20]")
    assert split.name == "val" and split.resolve(200) == (20, 180)
    conds = parse_filter("width >= 256 and src_format == 'jpeg' and similarity > .3")
    assert [(c.column, c.op, c.value) for c in conds] == [
        ("width", ">=", 256.0),
        ("src_format", "==", "jpeg"),
        ("similarity", ">", 0.3),
    ]


def test_filter_matches_the_columns(dataset_dir):
    ds = open_dataset(dataset_dir)
    ledger = ds.ledger()
    ok = [i for i, s in enumerate(ledger["status"]) if s == "ok"]
    width, label = np.asarray(ledger["width"])[ok], np.asarray(ledger["label"])[ok]
    v = View(ds, filter="width >= 40 and label != 1")
    expected = np.flatnonzero((width >= 40) & (label != 1))
    assert 0 < len(v) < len(ds) and v.indices.tolist() == expected.tolist()
    assert all(item["label"] != 1 for item in v)
    keyed = View(ds, filter="key == 'b/img_0003.jpg'")
    assert _keys(keyed) == ["b/img_0003.jpg"]


def test_filter_over_shards_with_failed_items(tmp_path):
    """Shards whose ledgers hold failed rows: a filter sees only the converted items, in order."""
    src = tmp_path / "src"
    gen.write_image_folder(src, {"a": 7, "b": 5}, size=(24, 20))
    for i, (name, data) in enumerate(sorted(gen.bad_files().items())):
        (src / "ab"[i % 2] / f"bad_{name}").write_bytes(data)
    out = tmp_path / "out"
    cfg = load_config(
        None,
        {"source.uri": str(src), "output.uri": str(out), "image.size": 8, "shard.size": 4, "cluster.kind": "threads"},
    )
    run(cfg, log=lambda m: None)
    ds = open_dataset(str(out))
    assert len(ds) == 12
    ledger = ds.ledger()
    ok = np.asarray(ledger["status"]) == "ok"
    assert (~ok).sum() == 4 and ok[:4].any() and not ok[:4].all()  # the first shard mixes both
    keys, width = np.asarray(ledger["key"])[ok], np.asarray(ledger["width"])[ok]
    v = View(ds, filter="width >= 40")
    assert 0 < len(v) < len(ds) and _keys(v) == keys[width >= 40].tolist()


def test_filter_reads_no_image_bytes(dataset_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    ds = open_dataset(str(copy))
    for shard in (copy / "shards").glob("*.h5"):
        shard.unlink()  # the images are gone; only manifest, index and records remain
    v = View(ds, filter="width < 40", split="[:50%]", seed=0, stratify=True)
    assert len(v) > 0 and v.column("width").max() < 40


@pytest.mark.parametrize(
    "text,why",
    [
        ("width >= ", "does not parse"),
        ("width = 3", "cannot read"),
        ("width >= 3 or label == 1", "does not parse"),
        ("import os", "does not parse"),
        ("__class__ > 1", "no column"),
        ("width > 'x'", "numeric"),
        ("key > 3", "text"),
    ],
)
def test_bad_filters_are_one_line(dataset_dir, text, why):
    with pytest.raises(ValueError, match=why) as err:
        len(View(open_dataset(dataset_dir), filter=text))
    assert "\n" not in str(err.value)


def test_views_compose(dataset_dir):
    ds = open_dataset(dataset_dir)
    small = View(ds, filter="label == 0")
    head = View(small, split="[:5]", seed=None)
    assert _keys(head) == _keys(small)[:5] and all(item["label"] == 0 for item in head)
    again = View(View(ds, split="[:50%]", seed=2), filter="label == 0")
    half = _keys(View(ds, split="[:50%]", seed=2))
    assert _keys(again) == [k for k, item in zip(half, View(ds, split="[:50%]", seed=2)) if item["label"] == 0]
    assert len(again) > 0


def test_iteration_batches_and_indexing_agree(dataset_dir):
    ds = open_dataset(dataset_dir)
    v = View(ds, split="[:80%]", seed=9)
    items = list(v)
    assert _keys(items) == _keys(v.get_batch(range(len(v)))) == [v[i]["key"] for i in range(len(v))]
    assert v[-1]["key"] == items[-1]["key"]
    with pytest.raises(IndexError):
        v[len(v)]
    assert view(ds) is ds


def _members(v):
    return [item["key"] for item in v]


def test_views_pickle_small_and_recompute_the_same_members(dataset_dir):
    ds = open_dataset(dataset_dir)
    v = View(ds, split="train[:90%]", seed=0, stratify=True, filter="width >= 30")
    expected = _members(v)  # indices computed here ...
    extra = len(pickle.dumps(v)) - len(pickle.dumps(ds))
    assert extra < 400, extra  # ... but only the spec travels
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_members, (v,)) == expected


class _Table:
    """A base in the shape `Dataset.column` returns columns: numbers masked where null, text as a list."""

    def __init__(self) -> None:
        self.cols = {
            "similarity": np.ma.masked_array([0.1, 0.5, 0.9, 0.7], mask=[False, False, True, False]),
            "caption": ["a cat", None, "a dog", ""],
        }

    def __len__(self) -> int:
        return 4

    def column(self, name):
        return self.cols[name]

    def get_batch(self, indices):
        return [{"key": str(i)} for i in indices]


def test_nulls_match_no_condition():
    assert View(_Table(), filter="similarity > 0.3").indices.tolist() == [1, 3]
    assert View(_Table(), filter="caption != ''").indices.tolist() == [0, 2]
    assert View(_Table(), filter="caption >= 'a' and similarity < 1").indices.tolist() == [0]


def test_columns_are_cached_per_dataset_version(dataset_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    cache = tmp_path / "cache"
    expected = View(open_dataset(str(copy), cache_dir=str(cache)), filter="width >= 40").indices
    assert list((cache / "columns").glob("*-width.npy")) and list((cache / "columns").glob("*-label.npy"))
    for record in (copy / "shards").glob("*.record.gz"):
        record.unlink()  # the ledger is gone: a second open must use the cached columns
    again = View(open_dataset(str(copy), cache_dir=str(cache)), filter="width >= 40 and label >= 0")
    assert again.indices.tolist() == expected.tolist()
    with pytest.raises(Exception, match="record"):  # without the cache the ledger is needed (and gone)
        len(View(open_dataset(str(copy), cache_dir=str(tmp_path / "empty")), filter="width >= 40"))


@pytest.mark.torch
def test_a_view_in_torch_dataloader_workers(dataset_dir):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    v = View(open_dataset(dataset_dir), split="train[:90%]", seed=0, filter="label != 2")
    keys = []
    for batch in DataLoader(v, batch_size=8, num_workers=2, multiprocessing_context="spawn"):
        assert isinstance(batch["image"], torch.Tensor)
        keys += batch["key"]
    assert keys == _keys(v)


def test_open_dataset_takes_split_and_filter(dataset_dir) -> None:
    """The documented entry point: open_dataset(uri, split=..., filter=...) is a view of the dataset."""
    from convert import open_dataset

    whole = open_dataset(dataset_dir)
    train = open_dataset(dataset_dir, split="train[:80%]", seed=0)
    test = open_dataset(dataset_dir, split="test[80%:]", seed=0)

    def keys(v):
        return {v[i]["key"] for i in range(len(v))}

    assert len(train) + len(test) == len(whole) and not keys(train) & keys(test)
    assert keys(train) | keys(test) == keys(whole)
    assert type(whole).__name__ == "Dataset" and type(train).__name__ == "View"
