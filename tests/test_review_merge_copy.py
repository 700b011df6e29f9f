"""Regression tests from the hostile review of `convert-dataset merge --copy`: each failed on the
code it was written against because of one defect (see the docstrings), all fixed since. Real
conversions (threads executor), the real CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convert import persist
from convert.cli import main
from convert.records import dump_bytes
from convert.testing.datasets import converted_folder


_convert = converted_folder


def _pair(tmp: Path) -> tuple[Path, Path]:
    return _convert(tmp, "a", {"cat": 6, "dog": 4}), _convert(tmp, "b", {"eel": 3, "fox": 5}, "lmdb")


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _flip(path: Path, at: int = 3000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_line_error(returncode: int, stderr: str) -> None:
    assert returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_non_regular_source_shard_is_one_line_error(tmp_path, kind):
    """_copy_file opens the source shard without check_regular: a FIFO in its place hangs the
    merge (open() blocks), a directory gives a two-line IsADirectoryError."""
    a, b = _pair(tmp_path)
    shard = a / "shards" / "shard-00001.h5"
    shard.unlink()
    os.mkfifo(shard) if kind == "fifo" else shard.mkdir()
    cmd = [sys.executable, "-m", "convert", "merge", str(a), str(b), "--output", str(tmp_path / "m"), "--copy"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("merge --copy hangs on a FIFO in place of a source shard")
    _one_line_error(done.returncode, done.stderr)
    assert "regular file" in done.stderr
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_rerun_replaces_a_corrupted_copy(tmp_path):
    """The resume skip trusts a copy whose record sha256 and file size match, never its content
    (nor its recorded identity): a copy corrupted in place is kept by every rerun, and
    `verify --repair` refuses copied merges, so the dataset can never be repaired."""
    a, b = _pair(tmp_path)
    dst = tmp_path / "m"
    assert _cli("merge", str(a), str(b), "--output", str(dst), "--copy").exit_code == 0
    _flip(dst / "shards" / "p001-shard-00000.h5")
    assert _cli("verify", str(dst)).exit_code == 1
    result = _cli("merge", str(a), str(b), "--output", str(dst), "--copy")
    assert result.exit_code == 0, result.output
    result = _cli("verify", str(dst))
    assert result.exit_code == 0, result.output  # the rerun kept the corrupted copy


def test_a_failed_rerun_does_not_corrupt_the_published_merge(tmp_path):
    """A rerun after a source was reconverted overwrites copies in place while the old manifest
    stays published; when it then fails, readers of the old merge see shards that no longer match
    its index (verify fails, open_dataset serves the new content silently)."""
    a, b = _pair(tmp_path)
    dst = tmp_path / "m"
    assert _cli("merge", str(a), str(b), "--output", str(dst), "--copy").exit_code == 0
    shutil.rmtree(a)
    a = _convert(tmp_path, "a", {"cat": 4, "dog": 5})  # same shard names, other content
    _flip(a / "shards" / "shard-00001.h5")  # the rerun fails on this one
    result = _cli("merge", str(a), str(b), "--output", str(dst), "--copy")
    assert result.exit_code == 2
    if (dst / "manifest.json").exists():  # either retracted, or still exactly the old merge
        result = _cli("verify", str(dst))
        assert result.exit_code == 0, result.output


def test_a_killed_copy_leaves_no_debris_after_the_rerun(tmp_path):
    """kill -9 mid-copy leaves `<dest>.<uuid>.partial` temps (tens of MB each); the rerun that
    resumes the copy never removes them (inspect lists them as leftovers forever)."""
    a = _convert(tmp_path, "a", {"cat": 30, "dog": 30}, size=768, shard=20)
    b = _convert(tmp_path, "b", {"eel": 30, "fox": 30}, size=768, shard=20)
    dst = tmp_path / "m"
    cmd = [sys.executable, "-m", "convert", "merge", str(a), str(b), "--output", str(dst), "--copy"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if (dst / "shards").is_dir() and any(p.name.endswith(".partial") for p in (dst / "shards").iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.wait()
    if proc.returncode == 0:  # the copy won the race: leave what a killed writer leaves (convert.store.local)
        (dst / "manifest.json").unlink()
        shutil.copyfile(a / "shards" / "shard-00001.h5", dst / "shards" / "p001-shard-00001.h5.0123456789ab.partial")
    assert any(p.name.endswith(".partial") for p in (dst / "shards").iterdir())
    result = _cli("merge", str(a), str(b), "--output", str(dst), "--copy")
    assert result.exit_code == 0, result.output
    assert _cli("verify", str(dst)).exit_code == 0
    left = json.loads(_cli("inspect", str(dst), "--json").stdout)["leftovers"]
    assert left == [], left


def test_a_rerun_with_fewer_source_shards_leaves_no_stale_copies(tmp_path):
    """Copies of shards a source no longer has are never removed by the rerun (unlisted debris)."""
    a, b = _pair(tmp_path)
    dst = tmp_path / "m"
    assert _cli("merge", str(a), str(b), "--output", str(dst), "--copy").exit_code == 0
    shutil.rmtree(a)
    a = _convert(tmp_path, "a", {"cat": 3})  # one shard now
    assert _cli("merge", str(a), str(b), "--output", str(dst), "--copy").exit_code == 0
    left = json.loads(_cli("inspect", str(dst), "--json").stdout)["leftovers"]
    assert left == [], left


def test_a_partial_conversion_is_not_a_merge_target(tmp_path):
    """Only a finished conversion (manifest.json) is refused as output: an interrupted one (plan
    and committed records, no manifest yet) is silently overwritten by a merged manifest."""
    a, b = _pair(tmp_path)
    c = _convert(tmp_path, "c", {"cat": 7})
    (c / "manifest.json").unlink()  # what an interrupted run leaves: plan.gz + committed shards
    (c / "index.gz").unlink()
    result = _cli("merge", str(a), str(b), "--output", str(c), "--copy")
    assert result.exit_code == 2, result.output
    assert not (c / "manifest.json").exists()


def test_a_source_index_naming_its_record_as_the_shard_is_refused(tmp_path):
    """_copied_path keeps whatever follows shards/<origin> in the index path: a source index whose
    path is shards/<origin>.record.gz (its size and sha256 matching that file) is copied to the
    copied record's own path, which then overwrites it: merge exits 0 with a dataset verify fails."""
    a, b = _pair(tmp_path)
    record = (a / "shards" / "shard-00001.record.gz").read_bytes()
    cols = persist.load(io.BytesIO((a / "index.gz").read_bytes()))
    paths = cols["path"].tolist()
    paths[1] = "shards/shard-00001.record.gz"
    cols["path"] = np.array(paths)
    shas = cols["sha256"].tolist()
    shas[1] = hashlib.sha256(record).hexdigest().encode()
    cols["sha256"] = np.array(shas, dtype=cols["sha256"].dtype)
    old = int(cols["bytes"][1])
    cols["bytes"][1] = len(record)
    blob = dump_bytes(cols)
    (a / "index.gz").write_bytes(blob)
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["index"]["sha256"] = hashlib.sha256(blob).hexdigest()
    manifest["totals"]["bytes"] += len(record) - old
    (a / "manifest.json").write_text(json.dumps(manifest))
    dst = tmp_path / "m"
    result = _cli("merge", str(a), str(b), "--output", str(dst), "--copy")
    if result.exit_code == 0:
        check = _cli("verify", str(dst))
        assert check.exit_code == 0, "merge --copy published a dataset verify rejects: " + check.output
    else:
        assert result.exit_code == 2 and "\n" not in result.output.strip()
