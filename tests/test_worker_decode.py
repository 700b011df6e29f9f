"""Local folders decode on the shard's prefetch threads (convert.worker, "grouped" mode): the stored
pixels, their order, per-item failures, the stage account and Ctrl-C are as before, the decode just
runs off the converting thread (issue 21: local folders at the decode ceiling)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import convert.worker as worker
from convert.config import load_config
from convert.fetch import prefetch
from convert.fetch.prefetch import THREAD_PREFIX
from convert.formats.base import open_reader
from convert.sources import Workdir, plan_source
from convert.specs import Status
from convert.testing.images import jpeg_bytes
from convert.testing.tasks import run_shard
from convert.transform import transform

WAIT = 10.0


def _folder_shard(tmp_path: Path, count: int, corrupt: tuple[int, ...] = ()):
    """(spec, config) of one shard over a folder of `count` JPEGs (the `corrupt` ones truncated)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(count):
        data = jpeg_bytes(40 + i % 7 * 9, 30 + i % 5 * 11, seed=i)
        (src / f"{i:03d}.jpg").write_bytes(data[:60] if i in corrupt else data)
    cfg = load_config(None, {"source.uri": str(src), "output.uri": str(tmp_path / "out"), "image.size": 16})
    (spec,) = plan_source(cfg.source, 10_000, Workdir(str(tmp_path / "work"))).specs
    return spec, cfg, src


def _stored(out: Path, record) -> list[tuple[str, np.ndarray]]:
    reader = open_reader("hdf5", str(out / record.path))
    try:
        return [(s["key"], s["image"]) for s in (reader.get(i) for i in range(len(reader)))]
    finally:
        reader.close()


def test_a_folder_shard_stores_every_file_decoded_in_order_and_failures_as_rows(tmp_path: Path) -> None:
    spec, cfg, src = _folder_shard(tmp_path, 45, corrupt=(3, 30))  # 45: groups of 8 and a short last one
    record = run_shard(spec, cfg)
    files = sorted(src.glob("*.jpg"))
    assert [Path(row.uri).name for row in record.ledger] == [p.name for p in files]  # the plan's order
    assert [row.status for row in record.ledger if row.status is not Status.OK] == [Status.DECODE_ERROR] * 2
    assert record.ledger[3].status is Status.DECODE_ERROR and record.ledger[30].status is Status.DECODE_ERROR
    stored = _stored(tmp_path / "out", record)
    ok = [(row.key, p) for row, p in zip(record.ledger, files) if row.ok]
    assert [key for key, _ in stored] == [key for key, _ in ok]
    for (_, pixels), (_, path) in zip(stored, ok):
        assert np.array_equal(pixels, transform(path.read_bytes(), cfg.image))  # what transform() gives, exactly


def test_folder_decodes_run_on_the_decode_threads_and_stay_in_the_stage_account(tmp_path, monkeypatch) -> None:
    spec, cfg, _ = _folder_shard(tmp_path, 40)
    threads: set[str] = set()
    real, cpu, lock = worker.transform, [0], threading.Lock()

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        start = time.thread_time_ns()
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                cpu[0] += time.thread_time_ns() - start

    monkeypatch.setattr(worker, "transform", spy)
    record = run_shard(spec, cfg)
    assert record.ok == 40
    assert threads and all(name.startswith(THREAD_PREFIX) for name in threads)  # not the converting thread
    assert len(threads) <= worker.DECODE_THREADS
    for stage in ("fetch", "fetch_cpu", "wait", "decode", "resize", "write", "convert_cpu"):
        assert record.stages[stage] > 0, stage  # decode CPU on the pool still counts as convert_cpu
    assert record.stages["convert_cpu"] >= cpu[0] / 1e9 * 0.99  # the decode threads' CPU is in convert_cpu


def test_ctrl_c_during_a_folder_decode_leaves_the_shard_at_once_with_no_thread_left(tmp_path, monkeypatch) -> None:
    spec, cfg, _ = _folder_shard(tmp_path, 40)
    real, calls = worker.transform, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 12:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(worker, "transform", interrupted)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_shard(spec, cfg)
    assert time.monotonic() - start < WAIT
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
    assert not list((tmp_path / "out").rglob("*.h5"))  # nothing published


def test_prefetch_threads_caps_concurrent_work_while_depth_results_are_queued() -> None:
    lock, active, peak = threading.Lock(), [0], [0]

    def work(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return i * 2

    results = list(prefetch(range(20), work, depth=6, threads=2))
    assert [r.value for r in results] == [i * 2 for i in range(20)]
    assert peak[0] == 2
    with pytest.raises(ValueError, match="threads"):
        list(prefetch(range(3), work, threads=0))
