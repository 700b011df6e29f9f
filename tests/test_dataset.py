"""Training reader: random access, batches, ordered prefetching iteration, per-process handles."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading

import numpy as np
import pytest

from convert.config import load_config
from convert import run
from convert.dataset import NO_LABEL, Dataset, open_dataset
from convert.fetch.prefetch import THREAD_PREFIX
from convert.manifest import ManifestError
from convert.testing import images as gen

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module", params=["hdf5", "lmdb"])
def dataset_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    gen.write_image_folder(root, {"a": 9, "b": 8}, size=(40, 30))
    (root / "a" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path_factory.mktemp(f"out-{request.param}")
    cfg = load_config(
        None,
        {
            "source.uri": str(root),
            "output.uri": str(out),
            "output.format": request.param,
            "image.size": 16,
            "shard.size": 5,
            "cluster.workers": 1,
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    return str(out)


def _keys(ds, indices):
    return [ds[i]["key"] for i in indices]


def test_len_index_and_bounds(dataset_dir):
    ds = open_dataset(dataset_dir)
    assert len(ds) == 17  # the broken item is in the ledger, not in the index
    assert ds[-1]["key"] == ds[16]["key"] == "b/img_0007.jpg"
    assert ds[0]["image"].shape == (16, 16, 3) and ds[0]["image"].dtype == np.uint8
    with pytest.raises(IndexError):
        ds[17]


def test_get_batch_any_order_with_repeats(dataset_dir):
    ds = open_dataset(dataset_dir)
    indices = [16, 0, 7, 7, 3, 12]
    batch = ds.get_batch(indices)
    assert [b["key"] for b in batch] == _keys(ds, indices)
    for b, i in zip(batch, indices):
        np.testing.assert_array_equal(b["image"], ds[i]["image"])


def test_iteration_is_ordered_and_complete(dataset_dir):
    ds = open_dataset(dataset_dir)
    assert [item["key"] for item in ds] == _keys(ds, range(len(ds)))
    before = {t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)}
    it = iter(ds)
    next(it)
    assert {t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)} - before  # reading ahead
    it.close()  # stopping early must not hang or leak the prefetch threads
    leaked = [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t not in before]
    assert leaked == []


def test_ledger_lists_failures(dataset_dir):
    ledger = open_dataset(dataset_dir).ledger()
    status = dict(zip(ledger["key"], ledger["status"]))
    assert status["a/broken.jpg"] == "decode_error" and len(status) == 18


def _read_keys(args):
    ds, indices = args
    return [ds[i]["key"] for i in indices]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_style_workers(dataset_dir, method):
    ds = open_dataset(dataset_dir)
    ds[0]  # open a handle in the parent first, as a training script would
    assert pickle.loads(pickle.dumps(ds))[3]["key"] == ds[3]["key"]
    with mp.get_context(method).Pool(2) as pool:
        parts = pool.map(_read_keys, [(ds, range(0, 9)), (ds, range(9, 17))])
    assert parts[0] + parts[1] == _keys(ds, range(17))


def test_encoded_shards_decode_on_read(tmp_path):
    root = tmp_path / "src"
    gen.write_image_folder(root, {"x": 4}, size=(40, 30))
    cfg = load_config(
        None,
        {
            "source.uri": str(root),
            "output.uri": str(tmp_path / "out"),
            "image.size": 16,
            "image.encode": "png",
            "cluster.workers": 1,
        },
    )
    run(cfg, log=lambda m: None)
    decoded = open_dataset(str(tmp_path / "out"))[0]["image"]
    raw = open_dataset(str(tmp_path / "out"), decode=False)[0]["image"]
    assert decoded.shape == (16, 16, 3) and isinstance(raw, bytes) and raw.startswith(b"\x89PNG")


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json not found"):
        open_dataset(str(tmp_path))


def test_getitems_is_get_batch_and_labels_collate(dataset_dir):
    ds = open_dataset(dataset_dir)
    indices = [5, 1, 16]
    assert [b["key"] for b in ds.__getitems__(indices)] == _keys(ds, indices)
    assert all(isinstance(ds[i]["label"], int) for i in range(len(ds)))


def test_unlabelled_items_get_no_label(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(3):
        (root / f"img_{i}.jpg").write_bytes(gen.jpeg_bytes(20, 20, seed=i))
    files = sorted(p.name for p in root.iterdir())
    cfg = load_config(
        None,
        {
            "source.uri": str(root),
            "output.uri": str(tmp_path / "out"),
            "image.size": 8,
            "source.labels": "none",
            "cluster.workers": 1,
        },
    )
    run(cfg, log=lambda m: None)
    ds = open_dataset(str(tmp_path / "out"))
    assert len(ds) == len(files) and [ds[i]["label"] for i in range(len(ds))] == [NO_LABEL] * len(ds)


def test_open_shard_readers_are_bounded(dataset_dir):
    ds = Dataset(dataset_dir, max_open_shards=2)
    keys = [ds[i]["key"] for i in range(len(ds))]  # 4 shards of 5 items
    assert len(ds._readers) == 2 and keys == [ds[i]["key"] for i in range(len(ds))]


def test_every_item_carries_its_source_digest(dataset_dir):
    """fetch.compute_hash (sha256 by default) is stored as a column: read by row and whole."""
    import hashlib

    ds = open_dataset(dataset_dir)
    assert [(c.name, c.type) for c in ds.schema] == [("sha256", "string")]
    assert ds.manifest["columns"] == [["sha256", "string"]]
    root = ds.manifest["config"]["source"]["uri"]
    item = ds[3]
    with open(f"{root}/{item['key']}", "rb") as fh:
        assert item["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    column = ds.column("sha256")
    assert len(column) == len(ds) and column[3] == item["sha256"] and ds.read_counts()["image"] == 1


def test_one_size_without_resize_is_stored_fixed(tmp_path):
    """`image.resize: none` over images of one size: the fixed (N, H, W, C) layout, not variable."""
    root = tmp_path / "src"
    for i in range(11):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (root / "ab"[i % 2] / f"{i}.jpg").write_bytes(gen.jpeg_bytes(20, 12, seed=i))
    out = tmp_path / "out"
    cfg = load_config(
        None,
        {
            "source.uri": str(root),
            "output.uri": str(out),
            "image.resize": "none",
            "shard.size": 4,
            "cluster.workers": 1,
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    ds = open_dataset(str(out))
    shapes = {ds._reader(s).image_shape for s in range(len(ds.shards))}
    assert shapes == {(12, 20, 3)} and ds[10]["image"].shape == (12, 20, 3)


def test_a_fifo_in_a_shards_place_is_one_error_not_a_hang(tmp_path) -> None:
    """A shard path from the index that is a FIFO is refused before open (it would block forever)."""
    import os

    from convert import open_dataset, run
    from convert.config import load_config
    from convert.manifest import ManifestError
    from convert.testing import images as gen

    gen.write_image_folder(tmp_path / "src", {"a": 3}, size=(16, 16))
    out = tmp_path / "out"
    cfg = load_config(None, {"source.uri": str(tmp_path / "src"), "output.uri": str(out), "cluster.kind": "threads"})
    assert run(cfg, log=lambda m: None).exit_code() == 0
    ds = open_dataset(str(out))
    shard = out / ds.manifest["shards"][0]["path"]
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(ManifestError, match="regular"):
        open_dataset(str(out))[0]
