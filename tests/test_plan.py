"""Planner: partitions -> constant-size, deterministic, picklable shard specs; fingerprints; plan file."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import pytest

from convert.config import SourceConfig
from convert.plan import cut_rows, dump_plan, fingerprint, make_specs, read_plan
from convert.sources import Workdir, plan_source, shard_refs
from convert.specs import InputSlice, SourceRef


def _plan(tmp_path: Path, uri: Path | str, size: int, **kw):  # type: ignore[no-untyped-def]
    work = tmp_path / "work"
    return plan_source(SourceConfig(uri=str(uri), **kw), size, Workdir(str(work)))


def _list(tmp_path: Path, n: int) -> Path:
    lst = tmp_path / "urls.txt"
    lst.write_text("".join(f"http://h/{i}.jpg\n" for i in range(n)))
    return lst


def test_shard_sizes_order_and_names(tmp_path: Path) -> None:
    found = _plan(tmp_path, _list(tmp_path, 10), 4)
    assert [len(s) for s in found.specs] == [4, 4, 2]
    assert [s.name for s in found.specs] == ["shard-00000", "shard-00001", "shard-00002"]
    keys = [r.key for s in found.specs for r in shard_refs(s, None)]
    assert keys == [f"{i:06d}-{i}" for i in range(10)]


def test_same_input_same_plan_picklable_and_small(tmp_path: Path) -> None:
    lst = _list(tmp_path, 25_000)
    a, b = _plan(tmp_path, lst, 1000), _plan(tmp_path, lst, 1000)
    assert a.specs == b.specs and len(a.specs) == 25
    assert pickle.loads(pickle.dumps(a.specs)) == a.specs
    assert max(len(pickle.dumps(s)) for s in a.specs) < 1024  # constant size: slices, not items


def test_invalid_shard_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _plan(tmp_path, _list(tmp_path, 3), 0)


def test_cut_rows_spans_files_in_order() -> None:
    groups = cut_rows([("a", 5, "v", 1), ("b", 4, "v", 1)], "cifar", 4)
    assert [[(s.uri, s.start, s.stop, s.first_row) for s in g] for g in groups] == [
        [("a", 0, 4, 0)],
        [("a", 4, 5, 4), ("b", 0, 3, 5)],
        [("b", 3, 4, 8)],
    ]


def _spec(**changes):  # type: ignore[no-untyped-def]
    base = dict(kind="txt", uri="/l.txt", version="10-1", size=10, start=0, stop=10, first_row=0, count=3)
    return make_specs([(InputSlice(**{**base, **changes}),)], SourceRef("urls"))[0]


def test_fingerprint_changes_with_slice_and_settings() -> None:
    spec = _spec()
    s = {"image": {"size": [64, 64], "mode": "RGB"}, "format": "hdf5"}
    reordered = {"format": "hdf5", "image": {"mode": "RGB", "size": [64, 64]}}
    assert list(reordered) != list(s)  # the same settings in another key order give the same fingerprint
    assert fingerprint(spec, s) == fingerprint(spec, reordered)
    for change in ({"version": "10-2"}, {"start": 1}, {"stop": 9}, {"first_row": 5}, {"uri": "/m.txt"}, {"count": 2}):
        assert fingerprint(spec, s) != fingerprint(_spec(**change), s), change
    assert fingerprint(spec, s) != fingerprint(spec, {**s, "format": "lmdb"})


def test_plan_file_is_per_slice_and_round_trips(tmp_path: Path) -> None:
    found = _plan(tmp_path, _list(tmp_path, 5000), 100)
    fps = {s.name: fingerprint(s, {}) for s in found.specs}
    data = dump_plan(found.specs, fps)
    assert read_plan(data) == found.specs
    assert len(data) < 100 * len(found.specs)  # O(shards): a few bytes per slice, no per-item rows


def test_kept_columns_travel_in_the_plan_and_the_fingerprint(tmp_path: Path) -> None:
    from convert.config import load_config
    from convert.plan import output_settings

    lst = tmp_path / "l.csv.gz"
    lst.write_bytes(gzip.compress(b"url,text,sim\n" + b"".join(b"a%d.jpg,t%d,0.%d\n" % (i, i, i) for i in range(50))))
    found = _plan(tmp_path, lst, 10, columns=["sim"])
    source = found.specs[0].source
    assert (source.columns, source.column_types, source.text_limit) == (("text", "sim"), ("string", "string"), 65536)
    assert read_plan(dump_plan(found.specs, {s.name: "" for s in found.specs})) == found.specs  # tuples again
    assert max(len(pickle.dumps(s)) for s in found.specs) < 1024

    def settings(**kw: object) -> dict:  # type: ignore[type-arg]
        over = {"source.uri": str(lst), "output.uri": str(tmp_path / "o"), **kw}
        return output_settings(load_config(None, over).redacted())

    base = settings()
    for change in (
        {"source.columns": "sim"},
        {"source.caption_column": "none"},
        {"source.max_text_bytes": 10},
        {"source.hash_column": "sim"},
        {"fetch.compute_hash": "md5"},
    ):
        assert settings(**change) != base, change
