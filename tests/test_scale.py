"""Internet scale: several list files, a bounded executor, shard failures that are not item facts,
--retry-failed, config sanity and secrets that never reach disk - with real files, real HTTP servers
and the in-process executor (the Dask executor is exercised by test_pipeline / test_faults)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from convert import run
from convert.store import open_store
from convert.config import ConfigError, SourceConfig, load_config
from convert.executor import open_executor
from convert.executor.threads import ThreadExecutor
from convert.ledger import read_ledger
from convert.manifest import read_manifest
from convert.submit import execute
from convert.redact import redact_options, redact_text, redact_url
from convert.sources import SourceError, Workdir, plan_source, shard_refs
from convert.testing import images as gen
from convert.testing.tasks import run_shard, shard_task
from convert.worker import ShardError


def _plan(tmp_path: Path, uri: str, size: int, **kw):  # type: ignore[no-untyped-def]
    return plan_source(SourceConfig(uri=uri, **kw), size, Workdir(str(tmp_path / "work")))


def _config(source: Path | str, out: Path, **extra):  # type: ignore[no-untyped-def]
    base = {
        "source.uri": str(source),
        "output.uri": str(out),
        "image.size": [16, 16],
        "image.resize": "stretch",
        "shard.size": 3,
        "fetch.threads": 2,
        "cluster.kind": "threads",
        "cluster.workers": 2,
        "cluster.task_retries": 0,
        "fetch.allow_private_networks": True,
    }  # (test servers: 127.0.0.1)
    return load_config(None, {**base, **extra})


def test_folder_of_three_list_files(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.txt").write_text("http://h/a0.jpg\nhttp://h/a1.jpg\n")
    (lists / "b.csv").write_text("url,label\nrel/b0.jpg,dog\nrel/b1.jpg,cat\nrel/b2.jpg,dog\n")
    pq.write_table(pa.table({"url": ["http://h/c0.jpg"], "label": ["ant"]}), lists / "c.parquet")
    (lists / "README.md").write_text("not a list")
    found = _plan(tmp_path, str(lists), 2)
    assert (found.kind, found.partitions, found.items) == ("urls", 3, 6)
    assert found.label_names == ["ant", "cat", "dog"]
    shards = [[(r.key, r.uri, r.label) for r in shard_refs(s, None, None)] for s in found.specs]
    assert shards == [  # shards never span list files; row indices (derived keys) run on across them
        [("000000-a0", "http://h/a0.jpg", None), ("000001-a1", "http://h/a1.jpg", None)],
        [("000002-b0", f"{lists}/rel/b0.jpg", 2), ("000003-b1", f"{lists}/rel/b1.jpg", 1)],
        [("000004-b2", f"{lists}/rel/b2.jpg", 2)],
        [("000005-c0", "http://h/c0.jpg", 0)],
    ]
    assert _plan(tmp_path, f"{lists}/*.txt", 2).items == 2


def test_duplicate_explicit_keys_across_shards_are_refused(tmp_path: Path) -> None:
    lst = tmp_path / "k.csv"
    lst.write_text("url,key\n" + "".join(f"http://h/{i}.jpg,k{i}\n" for i in range(10)) + "http://h/x.jpg,k3\n")
    with pytest.raises(SourceError, match=r"duplicate keys 'k3'"):
        _plan(tmp_path, str(lst), 4)


def test_process_shard_fails_when_its_input_changed(tmp_path: Path) -> None:
    lst = tmp_path / "urls.txt"
    lst.write_text("".join(f"http://127.0.0.1:9/{i}.jpg\n" for i in range(6)))
    config = _config(lst, tmp_path / "out")
    spec = _plan(tmp_path, str(lst), 3).specs[1]
    lst.write_text(lst.read_text() + "http://127.0.0.1:9/6.jpg\n")  # appended after planning
    with pytest.raises(ShardError, match=r"shard-00001: .*changed since planning"):
        run_shard(spec, config)
    assert not list((tmp_path / "out" / "shards").glob("shard-00001*"))  # nothing published


def test_thread_executor_runs_a_conversion_with_bounded_submission(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    gen.write_image_folder(root, {"a": 20, "b": 19}, size=(20, 20))
    summary = run(_config(root, tmp_path / "out"), log=lambda m: None)
    assert (summary.shards, summary.items_ok, summary.exit_code()) == (13, 39, 0)
    assert "ThreadExecutor" in summary.cluster
    config = _config(root, tmp_path / "again", **{"shard.size": 1})
    specs = _plan(tmp_path, str(root), 1).specs
    seen: list[int] = []
    with ThreadExecutor(1) as ex:
        tasks = (shard_task(spec, config) for spec in specs)
        execute(ex, tasks, len(specs), 39, 0, lambda record: None, {}, lambda p: seen.append(ex.in_flight))
    assert len(seen) == 39 and max(seen) <= 4 and seen[-1] == 0  # <= 4 x 1 thread queued at any time


def test_retry_failed_rebuilds_shards_with_transient_failures(http_server, tmp_path: Path) -> None:
    names = [f"{i}.jpg" for i in range(6)]
    for name in names:
        http_server.put(name, gen.jpeg_bytes(20, 20))
    http_server.fault("/4.jpg", statuses=[503] * 20)
    http_server.fault("/1.jpg", statuses=[404] * 20)
    lst = tmp_path / "urls.txt"
    lst.write_text("".join(f"{http_server.url}/{n}\n" for n in names))
    cfg = dict(**{"fetch.retries": 0, "fetch.allowed_schemes": ["http"]})
    first = run(_config(lst, tmp_path / "out", **cfg), log=lambda m: None)
    assert first.by_status == {"ok": 4, "http_error": 1, "not_found": 1}
    http_server.clear_faults()
    again = run(_config(lst, tmp_path / "out", **cfg), log=lambda m: None)
    assert (again.skipped, again.converted) == (2, 0)  # a plain rerun trusts committed shards
    retried = run(_config(lst, tmp_path / "out", **cfg, **{"run.retry_failed": ["http_error"]}), log=lambda m: None)
    assert (retried.skipped, retried.converted) == (1, 1)  # only shard-00001 (the 503) is rebuilt
    assert retried.by_status == {"ok": 5, "not_found": 1}


def test_prefetch_above_worker_memory_is_a_config_error(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    gen.write_image_folder(root, {"a": 2}, size=(20, 20))
    config = _config(
        root,
        tmp_path / "out",
        **{
            "cluster.kind": "local",
            "cluster.workers": 1,
            "cluster.memory_limit": "300MB",
            "fetch.prefetch_bytes": 8_000_000_000,
        },
    )
    with pytest.raises(ConfigError, match=r"fetch.prefetch_bytes=8000000000 .* worker memory limit 300000000"):
        run(config, log=lambda m: None)


def test_redaction_rule() -> None:
    url = "https://user:pw@h:8/a/b.jpg?X-Amz-Signature=abc&x=1&access_token=t&X-Goog-Signature=g&sig=s#frag"
    assert (
        redact_url(url)
        == "https://h:8/a/b.jpg?X-Amz-Signature=***&x=1&access_token=***&X-Goog-Signature=***&sig=***#frag"
    )
    assert redact_url("/data/a.jpg") == "/data/a.jpg" and redact_url("s3://b/k") == "s3://b/k"
    assert redact_options({"key": "AK", "client_kwargs": {"endpoint_url": "http://x"}, "token": "t"}) == {
        "key": "***",
        "client_kwargs": {"endpoint_url": "http://x"},
        "token": "***",
    }
    assert redact_text("failed: http://u:p@h/x?token=T (retry)") == "failed: http://h/x?token=*** (retry)"


def test_secrets_in_urls_never_reach_stored_files(http_server, tmp_path: Path) -> None:
    http_server.put("a.jpg", gen.jpeg_bytes(20, 20))
    secret = "S3CR3T-VALUE"
    lst = tmp_path / "urls.txt"
    lst.write_text(
        f"{http_server.url.replace('://', f'://user:{secret}@')}/a.jpg?token={secret}&sig={secret}\n"
        f"{http_server.url}/missing.jpg?X-Amz-Signature={secret}\n"
    )
    out = tmp_path / "out"
    summary = run(_config(lst, out, **{"fetch.allowed_schemes": ["http"]}), log=lambda m: None)
    assert summary.by_status == {"ok": 1, "not_found": 1}
    stored = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.endswith(".h5"))
    import gzip

    texts = [gzip.decompress(p.read_bytes()) for p in out.rglob("*.gz")]
    assert all(secret.encode() not in blob for blob in [stored, *texts])
    ledger = read_ledger(open_store(str(out)))
    assert ledger["uri"][0].endswith("/a.jpg?token=***&sig=***") and "user" not in ledger["uri"][0]
    manifest = read_manifest(open_store(str(out)))  # "shards" is the columnar ShardIndex now
    assert json.dumps({**manifest, "shards": list(manifest["shards"])}).count(secret) == 0
    assert secret not in (out / "manifest.json").read_text() and read_manifest(open_store(str(out)))["complete"]


def test_specs_cross_to_workers_small(tmp_path: Path) -> None:
    lst = tmp_path / "urls.txt"
    lst.write_text("".join(f"https://example.com/some/long/path/{i:08d}.jpg\n" for i in range(20_000)))
    specs = _plan(tmp_path, str(lst), 1000).specs
    assert len(specs) == 20 and max(len(pickle.dumps(s)) for s in specs) < 1024
    with open_executor(
        load_config(None, {"source.uri": "x", "output.uri": "y", "cluster.kind": "threads"}).cluster
    ) as ex:
        assert ex.slots() == 2 and ex.in_flight == 0


@pytest.fixture
def full_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 64 KiB tmpfs (needs root and a mount-capable environment, else the test is skipped)."""
    import subprocess

    mnt = tmp_path / "full"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode
    ):
        pytest.skip("cannot mount a small tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.cluster
def test_disk_full_is_one_line_naming_the_output(full_disk: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "imgs"
    gen.write_image_folder(root, {"a": 12}, size=(80, 80))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convert",
            "run",
            "--source",
            str(root),
            "--output",
            str(full_disk / "out"),
            "--size",
            "64",
            "--shard-size",
            "4",
            "--workers",
            "1",
            "--set",
            "cluster.task_retries=0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Compute Failed" not in result.stderr, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error")]
    assert errors == [
        f"error: output {full_disk}/out: No space left on device while writing shard-00000; free space "
        "there or set output.uri to a volume with room, then rerun to resume"
    ]


@pytest.mark.s3
def test_s3_prefix_listed_in_parallel_equals_local_listing(s3, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    gen.write_image_folder(root, {"ant": 3, "bee": 2, "cow.x": 2, "cow": 1}, size=(8, 8))
    (root / "bee" / "deep").mkdir()
    (root / "bee" / "deep" / "z.png").write_bytes(gen.jpeg_bytes(8, 8))
    fs = s3.filesystem()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"test-bucket/tree/{path.relative_to(root).as_posix()}", path.read_bytes())
    remote = plan_source(
        SourceConfig(uri="s3://test-bucket/tree", storage_options=s3.storage_options()),
        3,
        Workdir(str(tmp_path / "w1")),
    )
    local = _plan(tmp_path, str(root), 3)
    assert (remote.items, remote.partitions, remote.label_names) == (local.items, local.partitions, local.label_names)

    def rows(found, prefix):  # type: ignore[no-untyped-def]
        return [
            (r.key, r.label, r.uri.removeprefix(prefix))
            for s in found.specs
            for r in shard_refs(s, s3.storage_options())
        ]

    assert rows(remote, "s3://test-bucket/tree") == rows(local, str(root))
    assert local.partitions == 4 and local.label_names == ["ant", "bee", "cow", "cow.x"]


@pytest.mark.slow
def test_plan_command_on_millions_of_rows(tmp_path: Path) -> None:
    """A 2,000,000-row parquet list and a 1,000,000-line txt list, planned by `convert-dataset plan`."""
    import subprocess
    import sys

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    urls = [f"https://example.com/img/{i:08d}.jpg" for i in range(2_000_000)]
    pq.write_table(
        pa.table({"url": urls, "label": [i % 1000 for i in range(len(urls))]}),
        tmp_path / "big.parquet",
        row_group_size=250_000,
    )
    (tmp_path / "big.txt").write_text("\n".join(urls[:1_000_000]) + "\n")
    for name, items in (("big.parquet", 2_000_000), ("big.txt", 1_000_000)):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "convert",
                "plan",
                "--source",
                str(tmp_path / name),
                "--output",
                str(tmp_path / "unused"),
                "--shard-size",
                "1000",
                "--json",
                "--samples",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert (report["items"], report["shards"], report["partitions"]) == (items, items // 1000, 1)
        assert [s["key"] for s in report["samples"]] == ["000000-00000000", "000001-00000001", "000002-00000002"]
    assert not (tmp_path / "unused").exists()  # plan writes nothing to the output


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(3600)
def test_200k_items_kill_client_and_rerun_every_item_once(tmp_path: Path) -> None:
    """200,000 tiny images through a real HTTP server: SIGKILL the client mid-run, rerun, and the
    ledger holds every item exactly once, all ok."""
    import signal
    import subprocess
    import sys
    import time

    from convert.testing.http import StaticServer

    www = tmp_path / "www"
    for j in range(50):
        (www / "i").mkdir(parents=True, exist_ok=True)
        (www / "i" / f"{j}.jpg").write_bytes(gen.jpeg_bytes(8, 8, seed=j))
    n = 200_000
    with StaticServer(root=www) as server:
        lst = tmp_path / "urls.txt"
        lst.write_text("".join(f"{server.url}/i/{i % 50}.jpg?n={i}\n" for i in range(n)))
        out = tmp_path / "out"
        args = [
            sys.executable,
            "-m",
            "convert",
            "run",
            "--source",
            str(lst),
            "--output",
            str(out),
            "--size",
            "8",
            "--shard-size",
            "2000",
            "--threads",
            "16",
            "--set",
            "fetch.allowed_schemes=[http]",
            "--set",
            "fetch.allow_private_networks=true",
        ]
        first = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        deadline = time.monotonic() + 900
        while len(list((out / "shards").glob("*.record.gz"))) < 10:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(60)
        rerun = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ledger = read_ledger(open_store(str(out)))
    assert len(ledger["key"]) == n and len(set(ledger["key"])) == n
    assert set(ledger["status"]) == {"ok"}


def test_plan_command_lists_partitions_items_shards_and_samples(tmp_path: Path) -> None:
    import subprocess
    import sys

    gen.write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 2}, size=(8, 8))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "convert",
            "plan",
            "--source",
            str(tmp_path / "imgs"),
            "--shard-size",
            "2",
            "--json",
            "--samples",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["kind"], report["partitions"], report["items"], report["shards"], report["labels"]) == (
        "folder",
        2,
        5,
        3,
        2,
    )
    assert [(s["key"], s["label"]) for s in report["samples"]] == [
        ("cat/img_0000.jpg", 0),
        ("cat/img_0001.jpg", 0),
        ("cat/img_0002.jpg", 0),
    ]
    assert not (tmp_path / "imgs" / "partitions").exists()  # nothing written beside the source
