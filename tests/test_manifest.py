"""Manifest, index, records and ledgers as an attacker and a careless user meet them: swapped shards,
paths outside the root, impossible counts, copied datasets, repair; ledgers streamed shard by shard."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert import persist
from convert.config import load_config
from convert.dataset import open_dataset
from convert.orchestrate import run
from convert.ledger import iter_ledger, read_ledger
from convert.manifest import INDEX, MANIFEST, ManifestError, ShardIndex, read_manifest
from convert.shardtable import ShardTable
from convert.specs import ItemResult, ShardRecord, Status
from convert.summary import LedgerTally
from convert.shards import verify
from convert.records import dump_bytes, record_rel_path
from convert.store import open_store
from convert.testing import images as gen

pytestmark = pytest.mark.cluster
QUIET = {"log": lambda m: None}
PER_SHARD = 4
SHARDS = 6


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    gen.write_image_folder(root, {"a": SHARDS * PER_SHARD - 2}, size=(40, 30))
    (root / "a" / "img_9998.jpg").write_bytes(b"not an image")  # two failed items in the ledger
    (root / "a" / "img_9999.jpg").write_bytes(b"still not an image")
    return root


def config(source, out, scheduler, **extra):
    return load_config(
        None,
        {
            "source.uri": str(source),
            "output.uri": str(out),
            "shard.size": PER_SHARD,
            "image.size": 16,
            "cluster.scheduler": scheduler,
            **extra,
        },
    )


@pytest.fixture(scope="module")
def built(source, scheduler, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "out"
    assert run(config(source, out, scheduler), **QUIET).exit_code() == 0
    return out


@pytest.fixture
def out(built, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(built, copy)
    return copy


def cli(*args):
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, timeout=300)


def one_line_error(done, pattern):
    text = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    assert pattern in text, text


def rewrite_index(out: Path, change) -> None:
    """Tamper with index.gz and keep the manifest's digest of it consistent (a careful attacker)."""
    cols = persist.load(str(out / INDEX))
    change(cols)
    blob = dump_bytes(cols)
    (out / INDEX).write_bytes(blob)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["index"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_manifest_holds_aggregates_and_ledgers_stay_with_shards(out):
    manifest = json.loads((out / MANIFEST).read_text())
    assert "shards" not in manifest and "ledger" not in manifest and not (out / "ledger.gz").exists()
    assert manifest["totals"]["by_status"] == {"decode_error": 2, "ok": SHARDS * PER_SHARD - 2}
    rows = list(iter_ledger(open_store(str(out))))
    assert len(rows) == SHARDS * PER_SHARD and len({r.item.key for r in rows}) == len(rows)
    assert [r.shard for r in rows][::PER_SHARD] == [f"shard-{i:05d}" for i in range(SHARDS)]
    bad = list(iter_ledger(open_store(str(out)), status="decode_error"))
    assert [r.item.key for r in bad] == ["a/img_9998.jpg", "a/img_9999.jpg"] and {r.shard for r in bad} == {
        "shard-00005"
    }
    assert read_ledger(open_store(str(out)))["key"] == [r.item.key for r in rows]
    assert open_dataset(str(out)).ledger()["status"].count("ok") == SHARDS * PER_SHARD - 2


def test_swapped_shard_is_rebuilt_and_never_served(out, source, scheduler):
    shards = out / "shards"
    assert (shards / "shard-00004.h5").stat().st_size == (shards / "shard-00003.h5").stat().st_size
    shutil.copy2(shards / "shard-00003.h5", shards / "swap.tmp")  # same size, mtime kept, new inode
    os.replace(shards / "swap.tmp", shards / "shard-00004.h5")
    ds = open_dataset(str(out))
    assert ds[4 * PER_SHARD - 1]["key"].startswith("a/")  # shard 3 still fine
    with pytest.raises(ManifestError, match=r"shard-00004.h5 holds .* of shard 'shard-00003'.*verify --repair"):
        ds[4 * PER_SHARD]
    assert [c.ok for c in verify(open_store(str(out)))] == [True] * 4 + [False, True]
    summary = run(config(source, out, scheduler), **QUIET)
    assert (summary.skipped, summary.converted) == (SHARDS - 1, 1)  # resume rebuilt exactly the swapped one
    assert all(c.ok for c in verify(open_store(str(out))))
    assert open_dataset(str(out))[4 * PER_SHARD]["key"] == "a/img_0016.jpg"


def test_copied_dataset_resumes_by_content(out, source, scheduler):
    summary = run(config(source, out, scheduler), **QUIET)  # `out` is a copy: new inodes and mtimes
    assert (summary.skipped, summary.converted) == (SHARDS, 0)


def test_in_place_edit_keeping_size_and_mtime_is_caught(out, source, scheduler):
    path = out / "shards" / "shard-00002.h5"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # the last block changes; inode, size and mtime do not
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    summary = run(config(source, out, scheduler), **QUIET)
    assert summary.converted == 1 and all(c.ok for c in verify(open_store(str(out))))


def test_paths_outside_the_root_are_refused(out, source, scheduler):
    manifest_text = (out / MANIFEST).read_text()
    rewrite_index(out, lambda c: c["path"].__setitem__(0, "../outside.h5"))
    for args in (("verify", str(out)), ("inspect", str(out))):
        one_line_error(cli(*args), "'../outside.h5' is not a relative path under shards/")
    with pytest.raises(ManifestError, match="not a relative path"):
        open_dataset(str(out))
    (out / MANIFEST).write_text(manifest_text)
    store = open_store(str(out))
    rec = persist.load(io.BytesIO(store.read_bytes(record_rel_path("shard-00001"))))
    rec["path"] = "shards/../../evil/x.h5"
    store.write_bytes(record_rel_path("shard-00001"), dump_bytes(rec))
    with pytest.raises(ManifestError, match=r"shards/\.\./\.\./evil/x\.h5"):
        run(config(source, out, scheduler), **QUIET)  # resume never copies it into a manifest


@pytest.mark.parametrize("value", [-5, 10**12])
def test_impossible_counts_are_refused(out, value):
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["totals"]["ok"] = value
    (out / MANIFEST).write_text(json.dumps(manifest))
    one_line_error(cli("verify", str(out)), "totals disagree with the shard index")
    with pytest.raises(ManifestError):
        open_dataset(str(out))


def test_inflated_but_consistent_counts_fail_verify_and_reads(out):
    extra = 10**9

    def inflate(c):
        c["ok"][0] += extra
        c["count"][0] += extra

    rewrite_index(out, inflate)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["totals"]["ok"] += extra
    manifest["totals"]["items"] += extra
    manifest["totals"]["by_status"]["ok"] += extra
    (out / MANIFEST).write_text(json.dumps(manifest))
    checks = verify(open_store(str(out)))
    assert [(c.ok, c.problem) for c in checks][0] == (False, "counts differ from the shard's record")
    with pytest.raises(ManifestError, match="the index expects"):
        open_dataset(str(out))[0]


def test_verify_repair_rebuilds_exactly_the_failing_shards(out, source, scheduler):
    path = out / "shards" / "shard-00001.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    done = cli("verify", "--repair", str(out))
    assert done.returncode == 1 and "FAIL shard-00001: sha256 mismatch" in done.stdout, done.stdout + done.stderr
    assert "convert-dataset run --source" in done.stdout and not (out / MANIFEST).exists()
    assert not path.exists() and not (out / record_rel_path("shard-00001")).exists()
    summary = run(config(source, out, scheduler), **QUIET)
    assert (summary.skipped, summary.converted) == (SHARDS - 1, 1)
    assert all(c.ok for c in verify(open_store(str(out))))


def test_wave1_manifest_with_inline_shards_still_reads(out):
    store = open_store(str(out))
    manifest = read_manifest(store)
    legacy = {k: v for k, v in json.loads((out / MANIFEST).read_text()).items() if k != "index"}
    legacy.update(version=1, shards=list(manifest["shards"]))
    (out / MANIFEST).write_text(json.dumps(legacy))
    assert len(open_dataset(str(out))) == SHARDS * PER_SHARD - 2
    legacy["shards"][2]["path"] = "/etc/passwd"
    (out / MANIFEST).write_text(json.dumps(legacy))
    one_line_error(cli("inspect", str(out)), "'/etc/passwd' is not a relative path under shards/")


# -- hostile metadata (issue 20): names like paths, FIFOs, the rebuild command, edits in place ------
def rename_shard(cols, i: int, name: str) -> None:
    names = cols["name"].tolist()
    names[i] = name
    cols["name"] = np.array(names, dtype=str)


def test_repair_never_deletes_outside_the_output_for_a_name_that_is_a_path(out, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "evil.record.gz").write_bytes(b"precious")  # shards/../../victim/evil.record.gz from the output
    rewrite_index(out, lambda c: rename_shard(c, 1, "../../victim/evil"))
    shard = out / "shards" / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")  # fails verification: repair would remove its "record"
    done = cli("verify", "--repair", str(out))
    one_line_error(done, "bad shard name '../../victim/evil'")
    assert (victim / "evil.record.gz").read_bytes() == b"precious" and (out / MANIFEST).exists()

    def swap_path(c):
        rename_shard(c, 1, "shard-00001")
        c["path"][2] = "shards/shard-00003.h5"  # another shard's file under this shard's name

    rewrite_index(out, swap_path)
    one_line_error(cli("inspect", str(out)), "not its own file")


def _ledger_of(out: Path) -> subprocess.CompletedProcess[str]:
    code = f"import convert\nprint(len(convert.open_dataset({str(out)!r}).ledger()['key']))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_fifo_in_place_of_a_record_or_shard_never_hangs_a_reader(out, built):
    record = out / record_rel_path("shard-00002")
    record.unlink()
    os.mkfifo(record)  # nobody ever writes to it: a blocking open() would wait forever
    for args in (("inspect", "--failures", str(out)), ("report", "--html", str(out / "r.html"), str(out))):
        one_line_error(cli(*args), "shard-00002.record.gz: record missing or unreadable")
    done = _ledger_of(out)
    assert done.returncode == 1 and "record missing or unreadable" in done.stderr, done.stderr
    done = cli("verify", str(out))  # the shards themselves are fine
    assert done.returncode == 0 and f"{SHARDS}/{SHARDS} shards match" in done.stdout, done.stdout + done.stderr
    record.unlink()
    shutil.copy(built / record_rel_path("shard-00002"), record)
    shard = out / "shards" / "shard-00000.h5"  # the report reads its samples from the first shards
    shard.unlink()
    os.mkfifo(shard)
    done = cli("verify", str(out))
    assert done.returncode == 1 and "FAIL shard-00000: not a regular file" in done.stdout, done.stdout + done.stderr
    one_line_error(cli("report", "--html", str(out / "r.html"), str(out)), "shard-00000.h5 is not a regular file")
    (out / INDEX).unlink()
    os.mkfifo(out / INDEX)
    one_line_error(cli("inspect", str(out)), "index.gz is not a regular file")


def test_shard_table_builds_the_same_index_as_the_records_and_round_trips_it():
    """The client's columns (convert.shardtable) give the index the records would, in plan order
    whatever order shards finish in; an index row read back fills the same columns (resume)."""
    names = [f"shard-{i:05d}" for i in range(4)]
    records = [
        ShardRecord(
            n,
            f"shards/{n}.h5",
            "hdf5",
            2,
            2 - (i % 2),
            i % 2,
            100 + i,
            f"{i:064x}",
            (8, 8, 3) if i else None,
            "raw",
            stages={"fetch": 0.5 * i},
            started=1.0,
            finished=2.0 + i,
            ledger=(
                ItemResult(f"k{i}", "u", None, Status.OK),
                ItemResult(f"x{i}", "u", None, Status.TIMEOUT if i % 2 else Status.OK),
            ),
        )
        for i, n in enumerate(names)
    ]
    table = ShardTable(names, [f"{i:064x}" for i in range(4)])
    for r in reversed(records[1:]):  # out of order, shard 0 never arrives
        table.add(
            r, LedgerTally.of(r.ledger), {"size": r.bytes, "inode": 7, "ctime_ns": 5, "edges": "ab" * 32}, new=True
        )
    built = ShardIndex(table.index_cols()).validate("test")
    assert list(built) == list(ShardIndex.from_summaries([r.summary() for r in records[1:]]))
    assert table.tally().examples == {"timeout": ("x1", "x3")} and table.new_ok() == 4
    again = ShardTable(names, table.fingerprints)
    cols = persist.load(io.BytesIO(dump_bytes(table.index_cols())))
    again.fill_from_index(np.array([1, 2, 3]), cols, np.array([0, 1, 2]))
    assert list(ShardIndex(again.index_cols())) == list(built) and again.identity(2) == table.identity(2)


def test_ledger_columns_stream_as_stored_and_a_fifo_reads_as_missing(out):
    from convert.ledger import iter_ledger_columns

    store = open_store(str(out))
    names = [f"shard-{i:05d}" for i in range(SHARDS)]
    record = out / record_rel_path("shard-00001")
    record.unlink()
    os.mkfifo(record)
    found = dict(iter_ledger_columns(store, names))
    assert list(found) == names and found["shard-00001"] is None
    assert found["shard-00005"]["status"].count("decode_error") == 2 and len(found["shard-00000"]["key"]) == PER_SHARD
