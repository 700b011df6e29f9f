"""The shard task: decided once on the client, executed by the worker (issue 20: 1, 4).

Regression tests for the review's findings that came from the worker re-deriving decisions: a
folder (or an s3:// prefix) of URL lists lost the local-path rules a single list has; with
source.kind=urls on a folder the allowed root was the folder's parent; a format's options beyond
HDF5's compression never reached writers or the fingerprint. All end to end through convert.run.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

import convert.worker
from convert import run
from convert.config import load_config
from convert.formats import base as formats
from convert.formats.hdf5 import HDF5Reader, HDF5Writer
from convert.ledger import iter_ledger
from convert.sources import Workdir, plan_source
from convert.specs import Status
from convert.store import open_store
from convert.task import TaskMaker
from convert.testing import images as gen

JPEG = gen.jpeg_bytes(24, 24, seed=3)


def _run(source: str, out: Path, **overrides: Any) -> Any:
    cfg = load_config(
        None,
        {
            "source.uri": source,
            "output.uri": str(out),
            "cluster.kind": "threads",
            "shard.size": 4,
            "image.size": 16,
            **overrides,
        },
    )
    return run(cfg, log=lambda m: None)


def _statuses(out: Path) -> dict[str, tuple[Status, str]]:
    return {row.key: (row.status, row.error) for _, row, _ in iter_ledger(open_store(str(out)))}


def _outside(tmp_path: Path) -> Path:
    secret = tmp_path / "elsewhere" / "private.jpg"
    secret.parent.mkdir()
    secret.write_bytes(JPEG)
    return secret


@pytest.mark.parametrize("kind", ["auto", "urls"])
def test_folder_of_lists_refuses_local_paths_outside_it_like_one_list(tmp_path: Path, kind: str) -> None:
    secret = _outside(tmp_path)
    lists = tmp_path / "lists"  # only list files: "auto" takes it as a folder of URL lists
    lists.mkdir()
    inside = lists / "inside.jpg" if kind == "urls" else None
    if inside:
        inside.write_bytes(JPEG)
    rows = (f"{inside.name},in\n" if inside else "") + f"{secret},out\n/etc/hostname,etc\n"
    (lists / "a.csv").write_text("url,key\n" + rows)
    for source, out in ((str(lists), tmp_path / "out-folder"), (str(lists / "a.csv"), tmp_path / "out-file")):
        summary = _run(source, out, **{"source.kind": kind})
        assert summary.exit_code() == 0
        got = _statuses(out)
        assert not inside or got["in"][0] is Status.OK, (source, got)
        for key in ("out", "etc"):  # neither under the list's folder (nor its parent) nor allowed_roots
            assert got[key][0] is Status.BAD_URL and "source.allowed_roots" in got[key][1], (source, key, got)


def test_folder_of_lists_policy_root_is_the_lists_own_folder_not_its_parent(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (tmp_path / "sibling.jpg").write_bytes(JPEG)  # in the parent of the folder: must stay out of reach
    (lists / "a.txt").write_text(f"{tmp_path / 'sibling.jpg'}\n")
    cfg = load_config(None, {"source.uri": str(lists), "source.kind": "urls", "output.uri": str(tmp_path / "o")})
    plan = plan_source(cfg.source, 10, Workdir(str(tmp_path / "work")))
    task = TaskMaker(cfg, plan.kind).task(plan.specs[0])
    assert task.kind == "urls" and task.policies[0].local_roots == (str(lists),)
    assert task.policies[0].allow_local


def test_list_under_an_object_store_prefix_may_name_no_local_files(tmp_path: Path) -> None:
    from convert.specs import InputSlice, ShardSpec, SourceRef

    cfg = load_config(None, {"source.uri": "s3://bucket/lists/", "source.kind": "urls", "output.uri": str(tmp_path)})
    sl = InputSlice("csv", "s3://bucket/lists/a.csv", "etag", 10, 0, 10, 0, 1)
    task = TaskMaker(cfg, "urls").task(ShardSpec(0, "shard-00000", (sl,), SourceRef("urls")))
    assert task.policies[0].allow_local is False


class _ProbeOptions(formats.HDF5Options):
    marker: str = Field("default")


__all__ = ["HDF5Reader", "ProbeWriter"]  # the probe format's reader and writer, looked up in this module


class ProbeWriter(HDF5Writer):
    """An HDF5 writer that records the options its ShardInfo carried (a format with its own option)."""

    seen: list[dict[str, Any]] = []

    def __init__(self, path: str, info: formats.ShardInfo) -> None:
        ProbeWriter.seen.append(dict(info.options))
        super().__init__(path, info)


@pytest.fixture
def probe_format(monkeypatch: pytest.MonkeyPatch) -> str:
    spec = formats.FormatSpec("probe", ".h5", __name__, "ProbeWriter", "HDF5Reader", False, _ProbeOptions)
    monkeypatch.setitem(formats.FORMATS, "probe", spec)
    ProbeWriter.seen.clear()
    return "probe"


def test_a_formats_own_options_reach_its_writer_and_rebuild_on_change(tmp_path: Path, probe_format: str) -> None:
    folder = tmp_path / "imgs"
    gen.write_image_folder(folder, {"a": 3, "b": 2}, size=(20, 20))
    out = tmp_path / "out"
    first = _run(str(folder), out, **{"output.format": probe_format, "output.probe.marker": "one"})
    assert first.exit_code() == 0 and first.converted == first.shards == 2
    assert {s["marker"] for s in ProbeWriter.seen} == {"one"}
    again = _run(str(folder), out, **{"output.format": probe_format, "output.probe.marker": "one"})
    assert again.skipped == 2 and again.converted == 0  # same options: resumed, nothing rebuilt
    ProbeWriter.seen.clear()
    changed = _run(str(folder), out, **{"output.format": probe_format, "output.probe.marker": "two"})
    assert changed.converted == 2 and {s["marker"] for s in ProbeWriter.seen} == {"two"}


def test_shard_task_is_small_and_constant_size(tmp_path: Path) -> None:
    lst = tmp_path / "urls.txt"
    lst.write_text("".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(5000)))
    cfg = load_config(None, {"source.uri": str(lst), "output.uri": str(tmp_path / "o"), "shard.size": 10})
    plan = plan_source(cfg.source, 10, Workdir(str(tmp_path / "work")))
    maker = TaskMaker(cfg.with_absolute_paths(), plan.kind, plan.columns, "run-1234")
    sizes = {len(pickle.dumps(maker.task(spec))) for spec in (plan.specs[0], plan.specs[250], plan.specs[-1])}
    assert max(sizes) < 2048 and max(sizes) - min(sizes) < 16, sizes


def test_worker_module_derives_nothing_from_a_config() -> None:
    """The worker imports no source-kind detection, no config and no config-to-policy logic."""
    tree = ast.parse(Path(convert.worker.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"detect_kind", "resolve_kind", "Config", "FetchConfig", "TaskMaker", "load_config"}
    assert "config" not in modules


def test_digest_of_the_source_bytes_is_in_the_ledger_and_a_change_of_algorithm_rebuilds(tmp_path: Path) -> None:
    import hashlib

    folder = tmp_path / "imgs"
    gen.write_image_folder(folder, {"a": 3, "b": 2}, size=(20, 20))
    out = tmp_path / "out"
    assert _run(str(folder), out).exit_code() == 0
    rows = [row for _, row, _ in iter_ledger(open_store(str(out)))]
    assert rows and all(row.digest == hashlib.sha256(Path(row.uri).read_bytes()).hexdigest() for row in rows)
    lines: list[str] = []
    cfg = load_config(
        None,
        {
            "source.uri": str(folder),
            "output.uri": str(out),
            "cluster.kind": "threads",
            "shard.size": 4,
            "image.size": 16,
            "fetch.compute_hash": "md5",
        },
    )
    summary = run(cfg, log=lines.append)
    assert summary.converted == 2
    assert any("fetch.compute_hash changed: sha256 → md5; 2 shards will be rebuilt" in line for line in lines), lines
    rows = [row for _, row, _ in iter_ledger(open_store(str(out)))]
    assert all(row.digest == hashlib.md5(Path(row.uri).read_bytes()).hexdigest() for row in rows)


def test_caption_column_auto_and_its_resolved_name_make_the_same_shards(tmp_path: Path) -> None:
    """The fingerprint covers the columns as the planner resolved them, not the raw setting."""
    (tmp_path / "a.jpg").write_bytes(JPEG)
    (tmp_path / "list.csv").write_text("url,caption\na.jpg,a cat\n")
    out = tmp_path / "out"
    assert _run(str(tmp_path / "list.csv"), out).converted == 1
    again = _run(str(tmp_path / "list.csv"), out, **{"source.caption_column": "caption"})
    assert again.skipped == 1 and again.converted == 0
    other = _run(str(tmp_path / "list.csv"), out, **{"source.caption_column": "none"})
    assert other.converted == 1  # the caption is no longer kept: the shard changes


def test_a_uniform_resize_none_shard_is_recorded_with_its_fixed_shape(tmp_path: Path) -> None:
    from convert.manifest import read_manifest

    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(gen.jpeg_bytes(20, 12, seed=i))
    out = tmp_path / "out"
    assert _run(str(folder.parent), out, **{"image.resize": "none", "image.size": None}).exit_code() == 0
    shards = read_manifest(open_store(str(out)))["shards"]
    assert [s["image_shape"] for s in shards] == [[12, 20, 3]]
