"""WebDataset export: tars read back through the real `webdataset` library equal `open_dataset`;
an export killed mid-way resumes with every key exactly once; S3 output on the moto server;
the CLI command; the Hugging Face adapter."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from convert import run
from convert.config import load_config
from convert.dataset import open_dataset
from convert.export import ExportError, export_webdataset, sample_members
from convert.testing import images as gen

wds = pytest.importorskip("webdataset")
CLASSES = {"cat": 8, "dog": 7, "eel": 4}


def _convert(tmp_path_factory, fmt: str, encode: str) -> str:
    root = tmp_path_factory.mktemp("src")
    gen.write_image_folder(root, CLASSES, size=(24, 20))
    out = tmp_path_factory.mktemp(f"out-{fmt}-{encode}")
    cfg = load_config(
        None,
        {
            "source.uri": str(root),
            "output.uri": str(out),
            "output.format": fmt,
            "image.size": 12,
            "image.encode": encode,
            "shard.size": 5,
            "cluster.kind": "threads",
        },
    )
    assert run(cfg, log=lambda m: None).exit_code() == 0
    return str(out)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    return _convert(tmp_path_factory, "hdf5", "raw")


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    return _convert(tmp_path_factory, "lmdb", "jpeg")


def _read_wds(folder: Path, decode: str | None = None) -> list[dict]:
    urls = sorted(str(p) for p in Path(folder).glob("*.tar"))
    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return list(pipeline.decode(decode) if decode else pipeline)


def test_raw_export_reads_back_equal_through_webdataset(raw_dir, tmp_path):
    summary = export_webdataset(raw_dir, str(tmp_path / "wds"))
    ds = open_dataset(raw_dir)
    samples = _read_wds(tmp_path / "wds", "rgb8")
    assert summary.tars == len(ds.shards) and summary.written == summary.tars and summary.items == len(ds)
    assert [unquote(s["__key__"]) for s in samples] == [item["key"] for item in ds]
    for sample, item in zip(samples, ds):
        assert np.array_equal(sample["npy"], item["image"]) and sample["cls"] == item["label"]
    index = json.loads((tmp_path / "wds" / "index.wids.json").read_text())
    assert [e["nsamples"] for e in index["shardlist"]] == [s["ok"] for s in ds.shards]


def test_encoded_export_keeps_the_stored_bytes(jpeg_dir, tmp_path):
    export_webdataset(jpeg_dir, str(tmp_path / "wds"), maxcount=4)
    ds = open_dataset(jpeg_dir, decode=False)
    samples = _read_wds(tmp_path / "wds")
    assert len(list((tmp_path / "wds").glob("*.tar"))) == -(-len(ds) // 4)
    assert [unquote(s["__key__"]) for s in samples] == [item["key"] for item in ds]
    assert [s["jpg"] for s in samples] == [item["image"] for item in ds]  # byte for byte
    decoded = _read_wds(tmp_path / "wds", "rgb8")
    assert [int(s["cls"]) for s in decoded] == [item["label"] for item in ds]
    assert decoded[0]["jpg"].shape == open_dataset(jpeg_dir)[0]["image"].shape


def test_raw_pixels_reencoded_as_png_are_lossless(raw_dir, tmp_path):
    export_webdataset(raw_dir, str(tmp_path / "wds"), image_format="png", shard_size=2000)
    ds = open_dataset(raw_dir)
    samples = _read_wds(tmp_path / "wds", "rgb8")
    assert len(list((tmp_path / "wds").glob("*.tar"))) > 1
    assert all(np.array_equal(s["png"], item["image"]) for s, item in zip(samples, ds, strict=True))


def test_caption_goes_to_txt_and_other_columns_to_json(tmp_path):
    item = {
        "image": gen.jpeg_bytes(8, 8),
        "label": 3,
        "key": "dir/photo.v2.jpg",
        "caption": "a cat, on a mat",
        "similarity": np.float32(0.5),
        "width": np.int64(8),
        "tags": None,
    }
    path = tmp_path / "one.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in sample_members(item):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert unquote(sample["__key__"]) == "dir/photo.v2.jpg" and sample["cls"] == 3
    assert sample["txt"] == "a cat, on a mat" and sample["json"] == {"similarity": 0.5, "width": 8, "tags": None}
    for key in ("../../etc/passwd.jpg", "/abs/x", "100%.png"):
        names = [name for name, _ in sample_members(dict(item, key=key))]
        assert not any(".." in n or n.startswith("/") for n in names)
        assert {unquote(n.rsplit(".", 1)[0]) for n in names} == {key}
    unlabelled = dict(item, label=-1)
    assert not any(name.endswith(".cls") for name, _ in sample_members(unlabelled))


_DRIVER = """
import sys, time
from convert.export import export_webdataset
export_webdataset(sys.argv[1], sys.argv[2], maxcount=2, log=lambda m: time.sleep(0.25))
"""


def test_killed_export_resumes_with_every_key_exactly_once(jpeg_dir, tmp_path):
    out = tmp_path / "wds"
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, jpeg_dir, str(out)], env=os.environ.copy())
    deadline = time.monotonic() + 60
    while len(list(out.glob("_export/*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("_export/*.json"))
    assert 3 <= len(done) < 10 and not (out / "index.wids.json").exists()  # stopped mid-way
    first = done[0].name.replace(".json", ".tar")
    before = (out / first).stat().st_mtime_ns
    # What a kill inside a tar leaves: a temp file, or a tar whose marker was not written yet.
    (out / "shard-000004.tar.0123abcd.partial").write_bytes(b"half a tar")
    (out / "shard-000005.tar").write_bytes(b"x" * 512)
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[:1024])  # marker, wrong size
    summary = export_webdataset(jpeg_dir, str(out), maxcount=2)
    ds = open_dataset(jpeg_dir, decode=False)
    keys = [unquote(s["__key__"]) for s in _read_wds(out)]
    assert keys == [item["key"] for item in ds] and len(set(keys)) == len(ds)
    assert 0 < summary.skipped < summary.tars and (out / first).stat().st_mtime_ns == before  # kept, not rewritten
    assert not list(out.glob("*.partial"))
    assert export_webdataset(jpeg_dir, str(out), maxcount=2).written == 0


def test_other_settings_on_the_same_output_are_refused(raw_dir, tmp_path):
    export_webdataset(raw_dir, str(tmp_path / "wds"), maxcount=3)
    with pytest.raises(ExportError, match="other settings.*--overwrite"):
        export_webdataset(raw_dir, str(tmp_path / "wds"), maxcount=4)
    export_webdataset(raw_dir, str(tmp_path / "wds"), maxcount=8, overwrite=True)
    keys = [unquote(s["__key__"]) for s in _read_wds(tmp_path / "wds")]
    assert keys == [item["key"] for item in open_dataset(raw_dir)]  # no tar of the old export is left


def test_cli_export_and_bad_input(jpeg_dir, tmp_path):
    cmd = [sys.executable, "-m", "convert", "export", jpeg_dir, "--to", "webdataset", str(tmp_path / "wds")]
    done = subprocess.run(cmd + ["--maxcount", "6"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "exported 19 items" in done.stderr and len(_read_wds(tmp_path / "wds")) == 19
    bad = subprocess.run(cmd + ["--shard-size", "lots"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --shard-size 'lots': expected bytes or a size like '1GB' or '512MiB'"
    ]


@pytest.mark.s3
def test_s3_output_reads_back_and_resumes(jpeg_dir, tmp_path, s3):
    opts = s3.storage_options()
    first = export_webdataset(jpeg_dir, "s3://test-bucket/wds", maxcount=5, output_options=opts)
    fs = s3.filesystem()
    local = tmp_path / "copy"
    local.mkdir()
    for path in fs.glob("test-bucket/wds/*.tar"):
        (local / path.rsplit("/", 1)[-1]).write_bytes(fs.cat_file(path))
    ds = open_dataset(jpeg_dir, decode=False)
    samples = _read_wds(local)
    assert [unquote(s["__key__"]) for s in samples] == [item["key"] for item in ds]
    assert [s["jpg"] for s in samples] == [item["image"] for item in ds]
    assert first.written == 4 and fs.exists("test-bucket/wds/index.wids.json")
    fs.rm_file("test-bucket/wds/_export/shard-000002.json")  # as if killed before this marker
    again = export_webdataset(jpeg_dir, "s3://test-bucket/wds", maxcount=5, output_options=opts)
    assert (again.written, again.skipped) == (1, 3)


def test_hugging_face_iterable_dataset_streams_the_items(raw_dir):
    pytest.importorskip("datasets")
    from convert.hf import to_iterable_dataset

    ds = open_dataset(raw_dir)
    hf = to_iterable_dataset(raw_dir)
    items = list(hf)
    assert [x["key"] for x in items] == [x["key"] for x in ds] and [x["label"] for x in items] == [
        x["label"] for x in ds
    ]
    assert all(np.array_equal(np.asarray(a["image"]), b["image"]) for a, b in zip(items, ds))
    val = list(to_iterable_dataset(raw_dir, split="[90%:]", seed=0))
    assert len(val) == len(ds) - round(0.9 * len(ds))


def test_wids_random_access_through_the_written_index(jpeg_dir, tmp_path):
    wids = pytest.importorskip("wids")  # a separate package (pip install wids), not part of webdataset 1.x
    export_webdataset(jpeg_dir, str(tmp_path / "wds"), maxcount=6)
    ds = open_dataset(jpeg_dir)
    indexed = wids.ShardListDataset(str(tmp_path / "wds" / "index.wids.json"), cache_dir=str(tmp_path / "cache"))
    assert len(indexed) == len(ds)
    for i in (0, 7, len(ds) - 1):
        sample = indexed[i]
        assert unquote(sample["__key__"]) == ds[i]["key"] and int(sample[".cls"]) == ds[i]["label"]
        assert np.asarray(sample[".jpg"].convert("RGB")).shape == ds[i]["image"].shape
