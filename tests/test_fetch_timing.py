"""The per-stage clock and the source facts a shard record carries (process_shard run in-process)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from convert.config import load_config
from convert.records import read_record
from convert.store import open_store
from convert.sources import Workdir, plan_source
from convert.testing import images as gen
from convert.timing import StageClock, timed_fetch
from convert.testing.tasks import run_shard


def one_shard(listing: Path, entries: list[str], tmp_path: Path, **settings: object):
    """(spec, config) of a URL list holding `entries`, planned as one shard (the worker reads its rows)."""
    listing.write_text("".join(f"{e}\n" for e in entries))
    cfg = load_config(
        None, {"source.uri": str(listing), "output.uri": str(tmp_path / "out"), "image.size": 8, **settings}
    )
    (spec,) = plan_source(cfg.source, 10_000, Workdir(str(tmp_path / "work"))).specs
    return spec, cfg


def test_clock_sums_laps_from_many_threads():
    clock = StageClock()

    def work():
        for _ in range(1000):
            clock.add("fetch", 3)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t0 = clock.now()
    time.sleep(0.01)
    clock.lap("decode", t0)
    secs = clock.seconds()
    assert list(secs) == ["fetch", "decode"]  # canonical stage order
    assert secs["fetch"] == 8 * 1000 * 3 / 1e9
    assert 0.01 <= secs["decode"] < 1.0


def test_timed_fetch_charges_wall_and_cpu_even_on_error():
    clock = StageClock()

    def fail(_):
        time.sleep(0.02)
        raise OSError("boom")

    try:
        timed_fetch(clock, fail)(1)
    except OSError:
        pass
    secs = clock.seconds()
    assert secs["fetch"] >= 0.02 and secs["fetch_cpu"] < secs["fetch"]


def test_shard_record_has_stages_times_and_source_facts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(gen.jpeg_bytes(90, 70, seed=1))
    (src / "b.png").write_bytes(gen.encode(gen.photo_like(33, 21), "PNG"))
    (src / "bad.jpg").write_bytes(b"not an image at all")
    names = sorted(p.name for p in src.iterdir())
    spec, cfg = one_shard(src / "urls.txt", [str(src / n) for n in names], tmp_path, **{"image.size": 16})
    before = time.time()
    record = run_shard(spec, cfg)
    assert before <= record.started <= record.finished <= time.time()
    for stage in ("fetch", "fetch_cpu", "wait", "decode", "resize", "encode", "write", "verify", "hash", "commit"):
        assert record.stages[stage] >= 0, stage
    assert record.stages["decode"] > 0 and record.stages["fetch"] > 0
    rows = {r.uri.rsplit("/", 1)[1]: r for r in record.ledger}
    assert (rows["a.jpg"].width, rows["a.jpg"].height, rows["a.jpg"].src_format) == (90, 70, "jpeg")
    assert rows["a.jpg"].src_bytes == (src / "a.jpg").stat().st_size
    assert (rows["b.png"].width, rows["b.png"].height, rows["b.png"].src_format) == (33, 21, "png")
    assert rows["bad.jpg"].status.value == "decode_error"
    assert (rows["bad.jpg"].width, rows["bad.jpg"].src_format, rows["bad.jpg"].src_bytes) == (-1, "", 19)
    stored, _ = read_record(open_store(str(tmp_path / "out")), "shard-00000")
    assert stored.stages == record.stages and stored.ledger[0].width == record.ledger[0].width
