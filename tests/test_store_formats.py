"""Formats own their options and files: config sections validated by the format, the wave-1 keys,
sidecars from the registry, format names from the registry, and a directory-shaped format that
plugs in with one FORMATS entry (no change to the store, records or manifest)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest

from convert.config import ConfigError, load_config
from convert.dataset import open_dataset
from convert.formats.base import FORMATS, FormatOptions, FormatSpec, LazyShardReader, Sample, ShardInfo
from convert.orchestrate import run
from convert.shards import leftovers, verify
from convert.store import open_store
from convert.testing import images as gen


def cfg(**extra: Any):
    return load_config(None, {"source.uri": "src", "output.uri": "out", **extra})


def test_format_sections_and_the_wave1_keys():
    assert cfg(**{"output.compression": "gzip", "output.compression_level": 7}).output.options == {
        "hdf5": {"compression": "gzip", "compression_level": 7}
    }
    new = cfg(**{"output.hdf5.compression": "lzf"})
    assert (new.output.compression, new.output.compression_level) == ("lzf", 4)
    dumped = new.redacted()["output"]  # the fingerprint reads these two, as in wave 1
    assert (dumped["compression"], dumped["compression_level"]) == ("lzf", 4)
    assert cfg(**{"output.format": "lmdb", "output.hdf5.compression": "gzip"}).output.compression == "none"
    for bad, named in (
        ({"output.hdf5.compression": "zstd"}, "output.hdf5.compression"),
        ({"output.lmdb.compression": "gzip"}, "output.lmdb.compression"),
        ({"output.hdf5.level": 3}, "output.hdf5.level"),
        ({"output.format": "zarr"}, "unknown format 'zarr'; expected one of ['hdf5', 'lmdb']"),
    ):
        with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
            cfg(**bad)


def test_sidecars_and_names_come_from_the_registry():
    assert FORMATS["lmdb"].sidecars == ("-lock",) and FORMATS["hdf5"].sidecars == ()
    done = subprocess.run([sys.executable, "-m", "convert", "run", "--help"], capture_output=True, text=True)
    assert "[hdf5|lmdb]" in done.stdout.replace("\n", "").replace(" ", "")


# -- a directory-shaped format (one .npy per image), registered for one test -------------------
class NpyDirWriter:
    def __init__(self, path: str, info: ShardInfo) -> None:
        self.path, self.info, self.rows = path, info, []
        os.makedirs(os.path.join(path, "images"))

    def write_batch(self, samples: Sequence[Sample]) -> None:
        for s in samples:
            np.save(os.path.join(self.path, "images", f"{len(self.rows):06d}.npy"), s.data)
            self.rows.append([s.key, s.label])

    def close(self) -> None:
        meta = {"rows": self.rows, "attrs": self.info.attrs, "encoding": self.info.encoding}
        Path(self.path, "meta.json").write_text(json.dumps(meta))

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class NpyDirReader(LazyShardReader[dict]):
    def _open(self) -> dict:
        meta = json.loads(Path(self._source, "meta.json").read_text())
        self._encoding, self._layout, self._image_shape = meta["encoding"], "variable", None
        self._count, self._attrs = len(meta["rows"]), meta["attrs"]
        self._keys, self._labels = [r[0] for r in meta["rows"]], [r[1] for r in meta["rows"]]
        return meta

    def _close(self, handle: dict) -> None:
        pass

    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        self._opened()
        return [self._row(i, np.load(os.path.join(self._source, "images", f"{i:06d}.npy"))) for i in indices]


@pytest.fixture
def npydir(monkeypatch):
    spec = FormatSpec("npydir", ".npyd", __name__, "NpyDirWriter", "NpyDirReader", True, FormatOptions, directory=True)
    monkeypatch.setitem(FORMATS, "npydir", spec)
    return spec


@pytest.mark.cluster
def test_a_directory_shaped_format_plugs_in(npydir, tmp_path):
    from distributed import LocalCluster

    gen.write_image_folder(tmp_path / "src", {"a": 5, "b": 4}, size=(30, 20))
    reference = tmp_path / "ref"
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:  # shares FORMATS
        settings = {
            "source.uri": str(tmp_path / "src"),
            "shard.size": 4,
            "image.size": 12,
            "cluster.scheduler": cluster.scheduler_address,
            "cluster.shared_filesystem": True,
        }
        out = tmp_path / "out"
        summary = run(load_config(None, {**settings, "output.uri": str(out), "output.format": "npydir"}), log=print)
        assert summary.exit_code() == 0 and summary.shards == 3
        assert run(load_config(None, {**settings, "output.uri": str(reference)}), log=print).exit_code() == 0
        assert (out / "shards" / "shard-00000.npyd" / "meta.json").is_file()
        store = open_store(str(out))
        assert all(c.ok for c in verify(store)) and leftovers(store) == []
        again = run(load_config(None, {**settings, "output.uri": str(out), "output.format": "npydir"}), log=print)
        assert (again.skipped, again.converted) == (3, 0)  # resume trusts the directories by their tree digest
        np.save(out / "shards" / "shard-00001.npyd" / "images" / "000000.npy", np.zeros((12, 12, 3), np.uint8))
        assert [c.ok for c in verify(store)] == [True, False, True]
        again = run(load_config(None, {**settings, "output.uri": str(out), "output.format": "npydir"}), log=print)
        assert (again.skipped, again.converted) == (2, 1)
    ours, ref = open_dataset(str(out)), open_dataset(str(reference))
    assert len(ours) == len(ref) == 9
    for x, y in zip(ours, ref):
        assert (x["key"], x["label"]) == (y["key"], y["label"])
        np.testing.assert_array_equal(x["image"], y["image"])
