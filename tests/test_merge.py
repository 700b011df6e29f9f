"""`convert-dataset merge`: an HDF5 and an LMDB dataset made by real conversions, merged by the
real CLI; every item once with its label name, columns united, verify over the parts, and the
bad inputs as one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convert.cli import main
from convert.dataset import open_dataset
from convert.merge import MergeError, merge_datasets
from convert.testing.datasets import converted_folder


def _convert(tmp: Path, name: str, classes: dict[str, int], fmt: str, size: int = 8) -> str:
    return str(converted_folder(tmp, name, classes, fmt, size))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    a = _convert(tmp, "a", {"cat": 6, "dog": 4}, "hdf5")
    b = _convert(tmp, "b", {"dog": 3, "eel": 5}, "lmdb")
    return tmp, a, b


def _merge(*args: str):
    return CliRunner().invoke(main, ["merge", *args])


def test_merge_of_an_hdf5_and_an_lmdb_dataset(pair):
    tmp, a, b = pair
    dst = str(tmp / "m")
    result = _merge(a, b, "--output", dst, "--prefix-keys")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp / "m" / "manifest.json").read_text())
    assert manifest["format"] == "mixed" and [p["uri"] for p in manifest["parts"]] == ["../a", "../b"]
    assert not (tmp / "m" / "shards").exists()  # nothing copied
    ds = open_dataset(dst)
    assert ds.label_names == ["cat", "dog", "eel"]
    expected = []
    for part, uri in (("a", a), ("b", b)):
        src = open_dataset(uri)
        expected += [(f"{part}/{it['key']}", src.label_names[it["label"]]) for it in src]
    got = [(it["key"], ds.label_names[it["label"]]) for it in ds]
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    assert CliRunner().invoke(main, ["verify", dst]).exit_code == 0


def test_verify_fails_on_a_corrupted_referenced_shard(pair, tmp_path):
    tmp, a, b = pair
    a2, b2 = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a, a2)
    shutil.copytree(b, b2)
    dst = str(tmp_path / "m")
    assert _merge(str(a2), str(b2), "--output", dst, "--prefix-keys").exit_code == 0
    shard = sorted((b2 / "shards").glob("*.lmdb"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", dst])
    assert result.exit_code == 1 and "sha256 mismatch" in result.output
    repair = CliRunner().invoke(main, ["verify", dst, "--repair"])  # the shards are the sources': not removed
    assert repair.exit_code == 1 and "does not apply to a merged dataset" in repair.output
    assert shard.exists() and (Path(dst) / "manifest.json").exists()
    shard.unlink()
    assert "missing" in CliRunner().invoke(main, ["verify", dst]).output


def test_duplicate_keys_are_one_line_error(pair, tmp_path):
    _, a, _ = pair
    a2 = tmp_path / "a2"
    shutil.copytree(a, a2)
    result = _merge(a, str(a2), "--output", str(tmp_path / "m"))
    assert result.exit_code != 0
    line = result.output.strip()
    assert "\n" not in line and "--prefix-keys" in line and "Traceback" not in result.output


def test_different_raw_shapes_are_one_line_error(pair, tmp_path):
    tmp, a, _ = pair
    c = _convert(tmp_path, "c", {"cat": 3}, "hdf5", size=12)
    dst = tmp_path.parent / f"{tmp_path.name}-m"
    result = _merge(a, c, "--output", str(dst), "--prefix-keys")
    assert result.exit_code != 0 and "--allow-mixed-shapes" in result.output and "\n" not in result.output.strip()


def test_views_and_a_rewritten_source(pair, tmp_path):
    tmp, a, b = pair
    a2, b2 = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a, a2)
    shutil.copytree(b, b2)
    dst = str(tmp_path / "m")
    assert _merge(str(a2), str(b2), "--output", dst, "--prefix-keys").exit_code == 0
    ds = open_dataset(dst, split="[:50%]", stratify=True)
    assert len(ds) == round(0.5 * len(open_dataset(dst)))
    manifest = json.loads((b2 / "manifest.json").read_text())
    manifest["index"]["sha256"] = "0" * 64
    (b2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="part 'b'.*rerun `convert-dataset merge`"):
        open_dataset(dst)


def _items(ds) -> dict[str, tuple[str, bytes]]:
    """key -> (label name, image bytes) of every item: what a reader of the dataset sees."""
    return {it["key"]: (ds.label_names[it["label"]], np.asarray(it["image"]).tobytes()) for it in ds}


def _expected(sources: dict[str, str]) -> dict[str, tuple[str, bytes]]:
    return {f"{part}/{k}": v for part, uri in sources.items() for k, v in _items(open_dataset(uri)).items()}


def test_copy_merge_is_self_contained(pair, tmp_path):
    tmp, a, b = pair
    a2, b2 = tmp_path / "src" / "a", tmp_path / "src" / "b"
    shutil.copytree(a, a2)
    shutil.copytree(b, b2)
    expected = _expected({"a": str(a2), "b": str(b2)})
    dst = tmp_path / "m"
    result = _merge(str(a2), str(b2), "--output", str(dst), "--prefix-keys", "--copy")
    assert result.exit_code == 0, result.output
    manifest = json.loads((dst / "manifest.json").read_text())
    assert [p["uri"] for p in manifest["parts"]] == [None, None]
    copied = sorted(p.name for p in (dst / "shards").iterdir())
    assert any(n.startswith("p001-") and n.endswith(".h5") for n in copied)
    assert any(n.startswith("p002-") and n.endswith(".lmdb") for n in copied)
    shutil.rmtree(tmp_path / "src")  # the copy needs nothing of its sources
    ds = open_dataset(str(dst))
    assert ds.label_names == ["cat", "dog", "eel"] and _items(ds) == expected
    assert CliRunner().invoke(main, ["verify", str(dst)]).exit_code == 0


def test_copy_merge_checks_each_source_shard_and_resumes(pair, tmp_path):
    tmp, a, b = pair
    a2, b2 = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a, a2)
    shutil.copytree(b, b2)
    dst = tmp_path / "out" / "m"
    bad = sorted((b2 / "shards").glob("*.lmdb"))[0]
    good = bad.read_bytes()
    data = bytearray(good)
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    result = _merge(str(a2), str(b2), "--output", str(dst), "--prefix-keys", "--copy")
    assert result.exit_code == 2 and "verify --repair" in result.output and bad.name in result.output
    assert "\n" not in result.output.strip() and "Traceback" not in result.output
    assert not (dst / "manifest.json").exists()  # nothing published
    assert not any(p.name.endswith(bad.name) for p in (dst / "shards").iterdir())  # the bad copy discarded
    before = {p.name: p.stat().st_mtime_ns for p in (dst / "shards").iterdir()}
    assert before  # the other shards were copied ...
    bad.write_bytes(good)
    result = _merge(str(a2), str(b2), "--output", str(dst), "--prefix-keys", "--copy")
    assert result.exit_code == 0, result.output
    after = {p.name: p.stat().st_mtime_ns for p in (dst / "shards").iterdir()}
    assert {n: after[n] for n in before} == before  # ... and a rerun kept them
    assert _items(open_dataset(str(dst))) == _expected({"a": str(a2), "b": str(b2)})


def test_a_source_on_another_store_needs_copy(pair, s3):
    tmp, a, b = pair
    opts = s3.storage_options()
    dst = "s3://test-bucket/merged"
    with pytest.raises(MergeError, match="pass --copy"):
        merge_datasets([a, b], dst, prefix_keys=True, storage_options=opts)
    merge_datasets([a, b], dst, prefix_keys=True, copy=True, storage_options=opts)
    ds = open_dataset(dst, storage_options=opts, cache_dir=str(tmp / "cache"))
    assert _items(ds) == _expected({"a": a, "b": b})


def test_verify_repair_of_a_copied_merge_recopies_the_failing_shard(pair, tmp_path):
    tmp, a, b = pair
    dst = tmp_path / "m"
    assert _merge(a, b, "--output", str(dst), "--prefix-keys", "--copy").exit_code == 0
    copy = sorted((dst / "shards").glob("p002-*.lmdb"))[0]
    data = bytearray(copy.read_bytes())
    data[100] ^= 0xFF
    copy.write_bytes(bytes(data))
    repair = CliRunner().invoke(main, ["verify", str(dst), "--repair"])
    assert repair.exit_code == 1 and "removed 1 failing copies" in repair.output, repair.output
    command = repair.output.strip().splitlines()[-1].split()
    assert command[:2] == ["convert-dataset", "merge"] and "--copy" in command and "--prefix-keys" in command
    assert not copy.exists() and not (dst / "manifest.json").exists()
    assert _merge(*command[2:]).exit_code == 0
    assert CliRunner().invoke(main, ["verify", str(dst)]).exit_code == 0
    assert _items(open_dataset(str(dst))) == _expected({"a": a, "b": b})


@pytest.mark.parametrize("copy", [False, True])
def test_inspect_failures_and_report_of_a_merge(tmp_path, copy):
    """The ledger of a merge is its parts' (referenced or copied), keys as its readers show them."""
    roots = [
        str(converted_folder(tmp_path, name, {cls: 4}, shard=3, extra={f"{cls}/bad.jpg": b"nope"}))
        for name, cls in (("a", "cat"), ("b", "dog"))
    ]
    dst = str(tmp_path / "m")
    assert _merge(*roots, "--output", dst, "--prefix-keys", *(["--copy"] if copy else [])).exit_code == 0
    result = CliRunner().invoke(main, ["inspect", dst, "--failures"])
    assert result.exit_code == 0, result.output
    keys = sorted(line.split("\t")[0] for line in result.output.strip().splitlines())
    assert keys == ["a/cat/bad.jpg", "b/dog/bad.jpg"]
    report = CliRunner().invoke(main, ["report", dst, "--html", str(tmp_path / "r.html")])
    assert report.exit_code == 0, report.output
    assert "bad.jpg" in (tmp_path / "r.html").read_text()
