"""What a rerun may trust, and how a repair is rerun: edits in place with the mtime put back, records
whose identity cannot prove the commit, and the `verify --repair` command pasted into a shell."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from convert import persist
from convert.config import load_config
from convert.orchestrate import run
from convert.records import dump_bytes, proves_commit, record_rel_path
from convert.shards import verify
from convert.store import open_store
from convert.testing import images as gen

QUIET = {"log": lambda m: None}
PER_SHARD = 8
SIZE = 128  # raw 128x128x3 x 8 items: ~400 KB shards, more than the 2 x 64 KiB the edge hash covers


def settings(source: Path, out: Path) -> dict:
    return {
        "source.uri": str(source),
        "output.uri": str(out),
        "shard.size": PER_SHARD,
        "image.size": SIZE,
        "cluster.kind": "threads",
        "source.kind": "folder",
        "source.labels": "none",
        "output.hdf5.compression": "lzf",
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    source = tmp_path_factory.mktemp("trust") / "my photos"  # a space: the rebuild command must quote it
    gen.write_image_folder(source, {"cats": 2 * PER_SHARD, "dogs": PER_SHARD}, size=(140, 130))
    return source


@pytest.fixture
def built(source, tmp_path):
    """(source, a fresh output): built in place, so its records hold the identities of these very files."""
    out = tmp_path / "out"
    assert run(load_config(None, settings(source, out)), **QUIET).exit_code() == 0
    return source, out


@pytest.fixture
def out(built):
    return built[1]


def rerun(source: Path, out: Path):
    return run(load_config(None, settings(source, out)), **QUIET)


def edit_middle(path: Path) -> None:
    """Flip one byte in the middle of the file and put its atime/mtime back (touch -r, utime)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_edit_in_the_middle_with_mtime_restored_is_rebuilt(built, out):
    store = open_store(str(out))
    for name in ("shard-00000", "shard-00001", "shard-00002"):  # the fast path holds for an untouched output
        rec = persist.load(io.BytesIO(store.read_bytes(record_rel_path(name))))
        assert proves_commit(store, rec["path"], rec["identity"]), rec["identity"]
    shard = out / "shards" / "shard-00001.h5"
    assert shard.stat().st_size > 3 * 64 * 2**10
    edit_middle(shard)
    summary = rerun(built[0], out)
    assert (summary.skipped, summary.converted) == (2, 1)
    assert all(c.ok for c in verify(open_store(str(out))))


def test_identity_that_cannot_prove_the_commit_is_rehashed(built, out):
    """A record without the change time (older versions), or with whole-second timestamps (a
    filesystem with coarse times), cannot prove the file is the committed one: resume re-hashes it."""
    store = open_store(str(out))
    for name, ctime in (("shard-00000", None), ("shard-00002", 1_700_000_000 * 10**9)):
        rec = persist.load(io.BytesIO(store.read_bytes(record_rel_path(name))))
        if ctime is None:
            rec["identity"].pop("ctime_ns")
        else:
            rec["identity"]["ctime_ns"] = ctime
        assert not proves_commit(store, rec["path"], rec["identity"])
        store.write_bytes(record_rel_path(name), dump_bytes(rec))
        edit_middle(out / "shards" / f"{name}.h5")
    summary = rerun(built[0], out)
    assert (summary.skipped, summary.converted) == (1, 2)


def test_repair_command_is_quoted_and_rebuilds_exactly_the_failing_shard(built, out):
    shard = out / "shards" / "shard-00002.h5"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    done = subprocess.run(
        [sys.executable, "-m", "convert", "verify", "--repair", str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    command = done.stdout.strip().splitlines()[-1]
    argv = shlex.split(command)
    assert argv[:2] == ["convert-dataset", "run"] and argv[argv.index("--source") + 1] == str(built[0])
    sets = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a}
    assert sets["source.kind"] == '"folder"' and sets["source.labels"] == '"none"'
    assert sets["output.options.hdf5.compression"] == '"lzf"'
    rebuilt = subprocess.run(
        [sys.executable, "-m", "convert", *argv[1:], "--set", "cluster.kind=threads"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "(2 already committed, 1 to convert)" in rebuilt.stderr, rebuilt.stderr
    assert all(c.ok for c in verify(open_store(str(out))))


def test_a_crafted_setting_cannot_break_out_of_the_repair_command(out, tmp_path):
    tmp_path = tmp_path / "shell"
    tmp_path.mkdir()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["image"]["mode"] = "RGB' ; touch PWNED ; echo '"
    (out / "manifest.json").write_text(json.dumps(manifest))
    shard = out / "shards" / "shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    done = subprocess.run(
        [sys.executable, "-m", "convert", "verify", "--repair", str(out)], capture_output=True, text=True, timeout=120
    )
    command = done.stdout.strip().splitlines()[-1]
    assert command.startswith("convert-dataset run "), done.stdout
    shown = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + command[len("convert-dataset ") :]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert not (tmp_path / "PWNED").exists()
    assert shown.stdout.splitlines() == shlex.split(command)[1:]
    assert "image.mode=\"RGB' ; touch PWNED ; echo '\"" in shown.stdout.splitlines()


def _garble_records(out: Path) -> None:
    for record in (out / "shards").glob("*.record.gz"):
        record.write_bytes(b"not a record")


def test_rerun_of_a_finished_output_trusts_the_index_without_reading_records(built, out):
    """The index carries each shard's fingerprint, file identity and counts: a rerun of a finished
    output decides from one listing (records unreadable here, so any record read would rebuild)."""
    _garble_records(out)
    summary = rerun(built[0], out)
    assert (summary.skipped, summary.converted, summary.items_ok) == (3, 0, 3 * PER_SHARD)


def test_shards_the_index_does_not_vouch_for_are_checked_from_their_records(built, out):
    """After an interrupted run (manifest retracted, one shard rebuilt since the index was written)
    the stale row costs a record read, never a wrong skip; the next index vouches for it again."""
    (out / "manifest.json").unlink()
    shard = out / "shards" / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes())  # a new file: new inode and ctime, same bytes
    summary = rerun(built[0], out)
    assert (summary.skipped, summary.converted) == (3, 0)  # its record proves it by the full sha256
    edit_middle(out / "shards" / "shard-00002.h5")
    summary = rerun(built[0], out)
    assert (summary.skipped, summary.converted) == (2, 1)
    _garble_records(out)
    assert rerun(built[0], out).skipped == 3
