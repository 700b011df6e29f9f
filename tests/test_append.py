"""`run --append`: a grown list or prefix converts only what is new, old shards stay byte-identical,
a reader opened before an append keeps reading the old generation, and bad input is one line."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from convert import run
from convert.cli import main
from convert.config import ConfigError, load_config
from convert.dataset import open_dataset
from convert.manifest import read_manifest
from convert.store import open_store
from convert.testing import images as gen

QUIET = {"log": lambda m: None}


def _config(source: str, output: str, append: bool = False, **extra: Any):
    return load_config(
        None,
        {
            "source.uri": source,
            "output.uri": output,
            "image.size": [16, 16],
            "image.resize": "stretch",
            "shard.size": 4,
            "cluster.kind": "threads",
            "run.append": append,
            **extra,
        },
    )


def _images(root: Path, start: int, count: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        p = root / f"img{i:04d}.jpg"
        p.write_bytes(gen.jpeg_bytes(20, 20, seed=i))
        paths.append(str(p))
    return paths


def _shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.h5"))}


def _keys_uris(ds: Any) -> list[tuple[str, str]]:
    return [(ds[i]["key"], ds[i]["key"]) for i in range(len(ds))]


def test_append_twice_to_a_growing_txt_list(tmp_path: Path) -> None:
    lst, out = tmp_path / "urls.txt", tmp_path / "out"
    paths = _images(tmp_path / "img", 0, 18)
    lst.write_text("\n".join(paths[:10]) + "\n")
    assert run(_config(str(lst), str(out)), **QUIET).exit_code() == 0
    first = _shard_digests(out)
    before = open_dataset(str(out))
    old_keys = [before[i]["key"] for i in range(len(before))]

    with lst.open("a") as f:  # grows at its end, with a second list file beside it
        f.write("\n".join(paths[10:14]) + "\n")
    summary = run(_config(str(lst), str(out), append=True), **QUIET)
    assert summary.exit_code() == 0 and summary.skipped == 3 and summary.converted == 2  # rows 10-11, 12-13
    second = _shard_digests(out)
    assert {k: second[k] for k in first} == first  # old shards byte-identical
    with lst.open("a") as f:
        f.write("\n".join(paths[14:18]))  # no final newline this time
    assert run(_config(str(lst), str(out), append=True), **QUIET).exit_code() == 0
    third = _shard_digests(out)
    assert {k: third[k] for k in second} == second

    ds = open_dataset(str(out))
    keys = [ds[i]["key"] for i in range(len(ds))]
    assert len(ds) == 18 and len(set(keys)) == 18 and keys[:10] == old_keys
    manifest = read_manifest(open_store(str(out)))
    assert manifest["generation"] == 3 and [h["items"] for h in manifest["history"]] == [10, 14, 18]
    # the reader opened before the appends still reads the first generation, whole
    assert len(before) == 10 and [before[i]["key"] for i in range(10)] == old_keys
    assert before[9]["image"].shape == (16, 16, 3)


def test_a_new_list_file_is_appended_and_labels_keep_their_ids(tmp_path: Path) -> None:
    lists, out = tmp_path / "lists", tmp_path / "out"
    lists.mkdir()
    paths = _images(tmp_path / "img", 0, 8)
    roots = {"source.allowed_roots": [str(tmp_path / "img")]}  # images outside the lists' folder
    (lists / "a.csv").write_text("url,label\n" + "".join(f"{p},dog\n" for p in paths[:3]) + f"{paths[3]},zebra\n")
    assert run(_config(str(lists), str(out), **roots), **QUIET).exit_code() == 0
    (lists / "0-b.csv").write_text("url,label\n" + "".join(f"{p},cat\n" for p in paths[4:8]))  # sorts first
    assert run(_config(str(lists), str(out), append=True, **roots), **QUIET).exit_code() == 0
    ds = open_dataset(str(out))
    assert ds.label_names == ["dog", "zebra", "cat"]  # old ids unchanged, the new name at the end
    labels = [ds.label_names[ds[i]["label"]] for i in range(len(ds))]
    assert labels == ["dog"] * 3 + ["zebra"] + ["cat"] * 4
    assert len({ds[i]["key"] for i in range(len(ds))}) == 8


def test_a_list_changed_in_the_middle_is_one_line_naming_the_slice(tmp_path: Path) -> None:
    lst, out = tmp_path / "urls.txt", tmp_path / "out"
    paths = _images(tmp_path / "img", 0, 13)
    lst.write_text("\n".join(paths[:12]) + "\n")
    assert run(_config(str(lst), str(out)), **QUIET).exit_code() == 0
    edited = paths[:5] + [paths[12]] + paths[6:12] + paths[:2]
    lst.write_text("\n".join(edited) + "\n")
    before = _shard_digests(out)
    with pytest.raises(ConfigError, match=r"changed in the middle \(first changed slice: shard-00001, rows 4-7\)"):
        run(_config(str(lst), str(out), append=True), **QUIET)
    assert _shard_digests(out) == before and read_manifest(open_store(str(out)))["totals"]["ok"] == 12


def test_append_refuses_other_settings_and_a_plain_rerun_after_an_append(tmp_path: Path) -> None:
    lst, out = tmp_path / "urls.txt", tmp_path / "out"
    paths = _images(tmp_path / "img", 0, 6)
    lst.write_text("\n".join(paths[:4]) + "\n")
    with pytest.raises(ConfigError, match="--append needs a finished dataset"):
        run(_config(str(lst), str(out), append=True), **QUIET)
    assert run(_config(str(lst), str(out)), **QUIET).exit_code() == 0
    with pytest.raises(ConfigError, match=r"other settings \(image.size changed: 16 → 24\)"):
        run(_config(str(lst), str(out), append=True, **{"image.size": [24, 24]}), **QUIET)
    lst.write_text("\n".join(paths) + "\n")
    assert run(_config(str(lst), str(out), append=True), **QUIET).exit_code() == 0
    with pytest.raises(
        ConfigError, match=r"grown by appends \(generation 2, or an append was interrupted\); rerun with --append"
    ):
        run(_config(str(lst), str(out)), **QUIET)
    again = run(_config(str(lst), str(out), append=True), **QUIET)  # nothing new: nothing converted
    assert again.exit_code() == 0 and again.converted == 0 and again.items_ok == 6


def test_cli_append_flag_and_error_line(tmp_path: Path) -> None:
    lst, out = tmp_path / "urls.txt", tmp_path / "out"
    lst.write_text("\n".join(_images(tmp_path / "img", 0, 3)) + "\n")
    args = ["run", "--source", str(lst), "--output", str(out), "--size", "16", "--set", "cluster.kind=threads"]
    result = CliRunner().invoke(main, [*args, "--append"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--append needs a finished dataset" in result.output
    assert CliRunner().invoke(main, args).exit_code == 0
    assert CliRunner().invoke(main, [*args, "--append"]).exit_code == 0


def test_append_to_a_folder_with_new_objects_and_a_lost_one(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _images(src / "a", 0, 5)
    assert run(_config(str(src), str(out)), **QUIET).exit_code() == 0
    first = _shard_digests(out)
    _images(src / "a", 5, 2)
    _images(src / "b", 7, 3)  # a new class
    assert run(_config(str(src), str(out), append=True), **QUIET).exit_code() == 0
    assert {k: _shard_digests(out)[k] for k in first} == first
    ds = open_dataset(str(out))
    keys = sorted(ds[i]["key"] for i in range(len(ds)))
    assert len(ds) == 10 and len(set(keys)) == 10 and ds.label_names == ["a", "b"]
    (src / "a" / "img0002.jpg").unlink()
    with pytest.raises(ConfigError, match=r"lost 1 object\(s\).*first changed slice: shard-00000"):
        run(_config(str(src), str(out), append=True), **QUIET)


@pytest.mark.s3
def test_append_twice_to_a_growing_s3_prefix(s3: Any, tmp_path: Path) -> None:
    fs, opts = s3.filesystem(), s3.storage_options()
    for i in range(6):
        fs.pipe_file(f"test-bucket/in/c/img{i:03d}.jpg", gen.jpeg_bytes(20, 20, seed=i))
    extra = {"source.storage_options": opts, "output.storage_options": opts}
    cfg = lambda append: _config("s3://test-bucket/in", "s3://test-bucket/out", append, **extra)  # noqa: E731
    assert run(cfg(False), **QUIET).exit_code() == 0
    before = open_dataset("s3://test-bucket/out", storage_options=opts, cache_dir=str(tmp_path / "c"))
    shard0 = fs.cat_file("test-bucket/out/shards/shard-00000.h5")
    for n in (3, 5):
        for i in range(n):
            fs.pipe_file(f"test-bucket/in/c/new{n}-{i:03d}.jpg", gen.jpeg_bytes(20, 20, seed=100 + i))
        assert run(cfg(True), **QUIET).exit_code() == 0
    ds = open_dataset("s3://test-bucket/out", storage_options=opts, cache_dir=str(tmp_path / "c"))
    keys = [ds[i]["key"] for i in range(len(ds))]
    assert len(ds) == 14 and len(set(keys)) == 14
    assert fs.cat_file("test-bucket/out/shards/shard-00000.h5") == shard0
    assert len(before) == 6 and before[5]["key"] == keys[5]


def test_rebuild_changed_retires_the_changed_files_shards(tmp_path: Path) -> None:
    lists, out = tmp_path / "lists", tmp_path / "out"
    lists.mkdir()
    paths = _images(tmp_path / "img", 0, 12)
    roots = {"source.allowed_roots": [str(tmp_path / "img")]}
    (lists / "a.txt").write_text("\n".join(paths[:4]) + "\n")
    (lists / "b.txt").write_text("\n".join(paths[4:8]) + "\n")
    assert run(_config(str(lists), str(out), **roots), **QUIET).exit_code() == 0
    kept = _shard_digests(out)["shard-00000.h5"]
    (lists / "b.txt").write_text("\n".join(paths[8:12]) + "\n")  # rewritten, not grown
    with pytest.raises(ConfigError, match="b.txt changed in the middle .first changed slice: shard-00001"):
        run(_config(str(lists), str(out), append=True, **roots), **QUIET)
    cfg = _config(str(lists), str(out), append=True, **roots, **{"run.rebuild_changed": True})
    assert run(cfg, **QUIET).exit_code() == 0
    ds = open_dataset(str(out))
    assert [s["name"] for s in ds.shards] == ["shard-00000", "shard-00002"]
    assert _shard_digests(out)["shard-00000.h5"] == kept and not (out / "shards" / "shard-00001.h5").exists()
    assert len(ds) == 8 and len({ds[i]["key"] for i in range(8)}) == 8


def test_inspect_shows_the_generations(tmp_path: Path) -> None:
    lst, out = tmp_path / "urls.txt", tmp_path / "out"
    paths = _images(tmp_path / "img", 0, 6)
    lst.write_text("\n".join(paths[:4]) + "\n")
    assert run(_config(str(lst), str(out)), **QUIET).exit_code() == 0
    lst.write_text("\n".join(paths) + "\n")
    assert run(_config(str(lst), str(out), append=True), **QUIET).exit_code() == 0
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^  generation (\d+)  \S+  shards (\d+)  items (\d+)$", result.output, re.M)
    assert rows == [("1", "1", "4"), ("2", "2", "6")], result.output
