"""End to end: real sources -> real Dask cluster -> HDF5/LMDB shards -> manifest -> reader.

Most tests share one LocalCluster through its scheduler address (cheap runs); the CLI test and
`test_default_local_cluster` exercise the embedded default cluster.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from convert.config import load_config
from convert.dataset import open_dataset
from convert import run
from convert.ledger import read_ledger
from convert.manifest import read_manifest
from convert.shards import verify
from convert.store import open_store
from convert.testing import images as gen
from convert.testing.cifar import write_cifar10

pytestmark = pytest.mark.cluster

SIZE = (24, 32)  # H, W


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def make_config(source, output, scheduler=None, **overrides):
    base = {
        "source.uri": str(source),
        "output.uri": str(output),
        "image.size": list(SIZE),
        "image.resize": "stretch",
        "image.draft": False,
        "shard.size": 7,
        "fetch.threads": 4,
        "cluster.task_retries": 1,
        "fetch.allow_private_networks": True,  # the test servers are on 127.0.0.1
    }
    if scheduler:
        base["cluster.scheduler"] = scheduler
    base.update(overrides)
    return load_config(None, base)


def reference(path_or_bytes, size=SIZE, draft=False) -> np.ndarray:
    """Independent Pillow computation of the stretch transform."""
    data = Path(path_or_bytes).read_bytes() if not isinstance(path_or_bytes, bytes) else path_or_bytes
    img = Image.open(io.BytesIO(data))
    if draft:
        img.draft("RGB", (size[1], size[0]))
    img = ImageOps.exif_transpose(img).convert("RGB")
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    paths = gen.write_image_folder(root, {"ant": 6, "bee": 7, "cow": 5}, size=(80, 60))
    return root, paths


@pytest.mark.parametrize("fmt", ["hdf5", "lmdb"])
def test_folder_pixels_labels_keys_exact(folder, scheduler, tmp_path, fmt):
    root, paths = folder
    summary = run(make_config(root, tmp_path / "out", scheduler, **{"output.format": fmt}), log=lambda m: None)
    assert summary.exit_code() == 0 and summary.items_ok == len(paths) and summary.shards == 3
    ds = open_dataset(str(tmp_path / "out"))
    assert len(ds) == len(paths) and ds.label_names == ["ant", "bee", "cow"]
    for i, path in enumerate(paths):
        item = ds[i]
        assert item["key"] == f"{path.parent.name}/{path.name}"
        assert item["label"] == ["ant", "bee", "cow"].index(path.parent.name)
        np.testing.assert_array_equal(item["image"], reference(path))
    assert [c.ok for c in verify(open_store(str(tmp_path / "out")))] == [True] * 3


def test_draft_stays_close_to_full_decode(folder, scheduler, tmp_path):
    root, paths = folder
    cfg = make_config(root, tmp_path / "out", scheduler, **{"image.draft": True, "image.size": [16, 16]})
    run(cfg, log=lambda m: None)
    ds = open_dataset(str(tmp_path / "out"))
    errors = [
        np.abs(ds[i]["image"].astype(int) - reference(p, (16, 16)).astype(int)).mean() for i, p in enumerate(paths)
    ]
    assert max(errors) < 6.0


def test_url_list_bad_items_become_ledger_statuses(scheduler, http_server, tmp_path):
    files = {f"good{i}.jpg": gen.jpeg_bytes(70 + i, 50, seed=i) for i in range(4)}
    files.update(gen.bad_files())
    files["bomb.png"] = gen.bomb_png(3000)
    files["flaky.jpg"] = gen.jpeg_bytes(64, 64, seed=99)
    files["hung.jpg"] = gen.jpeg_bytes(64, 64, seed=98)
    for name, data in files.items():
        http_server.put(name, data)
    http_server.fault("flaky.jpg", statuses=[500, 200])
    http_server.fault("hung.jpg", hang=20)
    names = list(files) + ["missing.jpg"]
    with open(tmp_path / "urls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "label", "key"])
        for i, name in enumerate(names):
            w.writerow([http_server.url_for(name), i % 2, name])
    cfg = make_config(
        tmp_path / "urls.csv",
        tmp_path / "out",
        scheduler,
        **{
            "output.format": "lmdb",
            "image.max_pixels": 1_000_000,
            "fetch.timeout": 1.0,
            "fetch.retries": 1,
            "fetch.backoff": 0.05,
        },
    )
    summary = run(cfg, log=lambda m: None)
    assert summary.exit_code() == 0 and summary.exit_code(fail_on_item_errors=True) == 3
    ledger = read_ledger(open_store(str(tmp_path / "out")))
    status = dict(zip(ledger["key"], ledger["status"]))
    assert sorted(status) == sorted(names)  # every input item exactly once
    expected = {
        "zero.jpg": "decode_error",
        "text.jpg": "decode_error",
        "truncated.jpg": "decode_error",
        "corrupt.jpg": "decode_error",
        "bomb.png": "decompression_bomb",
        "missing.jpg": "not_found",
        "flaky.jpg": "ok",
        "hung.jpg": "timeout",
    }
    expected.update({f"good{i}.jpg": "ok" for i in range(4)})
    assert status == expected
    assert http_server.hits("missing.jpg") == 1  # permanent errors are not retried
    ds = open_dataset(str(tmp_path / "out"))
    assert [ds[i]["key"] for i in range(len(ds))] == [n for n in names if expected[n] == "ok"]
    np.testing.assert_array_equal(ds[len(ds) - 1]["image"], reference(files["flaky.jpg"]))


def test_cifar_to_hdf5(scheduler, tmp_path):
    batches = write_cifar10(tmp_path, per_batch=6, batches=2, test=4)
    cfg = make_config(
        tmp_path / "cifar-10-batches-py", tmp_path / "out", scheduler, **{"image.size": [32, 32], "shard.size": 5}
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    ds = open_dataset(str(tmp_path / "out"))
    expected = [(img, lab) for name in sorted(batches) for img, lab in zip(*batches[name])]
    assert len(ds) == len(expected) == 16
    for i, (img, label) in enumerate(expected):
        np.testing.assert_array_equal(ds[i]["image"], img)
        assert ds[i]["label"] == label
    assert ds.label_names[:2] == ["airplane", "automobile"]


def test_verify_detects_flipped_byte_and_resume_rebuilds_only_missing(folder, scheduler, tmp_path):
    root, _ = folder
    out = tmp_path / "out"
    cfg = make_config(root, out, scheduler)
    run(cfg, log=lambda m: None)
    shards = sorted((out / "shards").glob("*.h5"))
    before = {p.name: p.read_bytes() for p in shards}
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0x01
    shards[1].write_bytes(bytes(data))
    assert [c.ok for c in verify(open_store(str(out)))] == [True, False, True]
    shards[1].unlink()
    summary = run(cfg, log=lambda m: None)
    assert (summary.skipped, summary.converted) == (2, 1)
    assert {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.h5"))} == before
    assert (out / "shards" / shards[0].name).stat().st_mtime_ns == mtimes[shards[0].name]
    assert all(c.ok for c in verify(open_store(str(out))))


def test_changed_settings_are_not_resumed(folder, scheduler, tmp_path):
    root, _ = folder
    run(make_config(root, tmp_path / "out", scheduler), log=lambda m: None)
    summary = run(make_config(root, tmp_path / "out", scheduler, **{"image.size": [8, 8]}), log=lambda m: None)
    assert summary.skipped == 0 and summary.converted == 3
    assert open_dataset(str(tmp_path / "out"))[0]["image"].shape == (8, 8, 3)


def test_failed_shard_is_reported_and_others_complete(folder, scheduler, tmp_path):
    root, paths = folder
    out = tmp_path / "out"
    (out / "shards" / "shard-00001.h5").mkdir(parents=True)  # the final name is unusable
    (out / "shards" / "shard-00001.h5" / "blocker").write_text("x")
    summary = run(make_config(root, out, scheduler), log=lambda m: None)
    assert list(summary.failed_shards) == ["shard-00001"] and summary.exit_code() == 1
    manifest = read_manifest(open_store(str(out)))
    assert manifest["complete"] is False and "shard-00001" in manifest["failed_shards"]
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00002"]
    ledger = read_ledger(open_store(str(out)))
    assert len(ledger["key"]) == len(paths) and ledger["status"].count("shard_failed") == 7
    assert len(open_dataset(str(out))) == len(paths) - 7


def test_default_local_cluster(folder, tmp_path):
    root, paths = folder
    cfg = make_config(
        root, tmp_path / "out", **{"cluster.kind": "local", "cluster.workers": 1, "output.format": "lmdb"}
    )
    summary = run(cfg, log=lambda m: None)
    assert summary.exit_code() == 0 and summary.items_ok == len(paths)
    assert "LocalCluster" in summary.cluster


def test_plan_is_persisted_without_pickle(folder, scheduler, tmp_path):
    from convert import persist

    root, paths = folder
    run(make_config(root, tmp_path / "out", scheduler), log=lambda m: None)
    from convert.plan import read_plan
    from convert.sources import shard_refs

    plan = persist.load(str(tmp_path / "out" / "plan.gz"))
    assert plan["shards"] == ["shard-00000", "shard-00001", "shard-00002"]
    assert len(plan["shard"]) == 3  # one row per slice (O(shards)), not one per item
    specs = read_plan((tmp_path / "out" / "plan.gz").read_bytes())
    refs = [ref for spec in specs for ref in shard_refs(spec, None)]
    assert [r.key for r in refs] == [f"{p.parent.name}/{p.name}" for p in paths]
    assert [len(s) for s in specs] == [7, 7, len(paths) - 14]
