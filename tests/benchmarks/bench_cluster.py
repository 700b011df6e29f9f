"""Scaling and fault cost on this machine (same corpus, same run).

1. images/s with a LocalCluster of 1 worker vs 2 workers;
2. a 20-shard job on real `dask scheduler`/`dask worker` processes: wall time without faults vs
   with one worker SIGKILLed mid-run (its nanny restarts it; the shard re-runs): the time lost.

    python tests/benchmarks/bench_cluster.py [--count 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from distributed import LocalCluster

from convert.config import load_config
from convert import run
from convert.testing.dask import DaskProcesses
from convert.testing.images import write_corpus


def convert(source: Path, out: Path, scheduler: str, shard_size: int) -> float:
    cfg = load_config(
        None,
        {
            "source.uri": str(source),
            "output.uri": str(out),
            "image.size": 64,
            "shard.size": shard_size,
            "cluster.scheduler": scheduler,
            "run.overwrite": True,
        },
    )
    start = time.perf_counter()
    summary = run(cfg, log=lambda m: None)
    assert summary.exit_code() == 0, summary
    return time.perf_counter() - start


def scaling(source: Path, tmp: Path, count: int, shard_size: int) -> None:
    rates = {}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as c:
            rates[workers] = count / convert(source, tmp / f"scale{workers}", c.scheduler_address, shard_size)
    print(
        f"LocalCluster 1 worker: {rates[1]:.0f} img/s; 2 workers: {rates[2]:.0f} img/s; "
        f"speed-up {rates[2] / rates[1]:.2f}x"
    )


def _killed_run(dp: DaskProcesses, source: Path, out: Path, shard_size: int) -> tuple[float, int]:
    """One conversion with a worker SIGKILLed once 5 of 20 shards are committed."""
    killed_at: list[int] = []

    def killer() -> None:
        while len(list((out / "shards").glob("*.record.gz"))) < 5:
            time.sleep(0.02)
        time.sleep(0.05)  # mid-shard
        dp.kill_worker(0)
        killed_at.append(len(list((out / "shards").glob("*.record.gz"))))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    seconds = convert(source, out, dp.address, shard_size)
    thread.join(5)
    dp.wait_for_workers(2)  # the nanny restarted it before the next round
    return seconds, killed_at[0] if killed_at else -1


def kill_cost(source: Path, tmp: Path, shard_size: int, rounds: int = 3) -> None:
    with DaskProcesses(tmp / "dask", workers=2) as dp:
        convert(source, tmp / "warmup", dp.address, shard_size)  # imports and caches in both workers
        clean, killed = [], []
        for i in range(rounds):  # interleaved, median of each
            clean.append(convert(source, tmp / f"clean{i}", dp.address, shard_size))
            killed.append(_killed_run(dp, source, tmp / f"killed{i}", shard_size)[0])
    c, k = statistics.median(clean), statistics.median(killed)
    print(
        f"20-shard job, median of {rounds}: {c:.1f} s clean, {k:.1f} s with one worker SIGKILLed after 5 shards: "
        f"{k - c:+.1f} s lost ({(k - c) / c:+.0%}); runs clean {[round(x, 1) for x in clean]}, "
        f"killed {[round(x, 1) for x in killed]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    shard_size = args.count // 20  # 20 shards
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_corpus(tmp / "src", args.count, 200, 600)
        print(f"corpus: {args.count} JPEGs 200-600 px, 20 shards of {shard_size} -> 64x64 HDF5")
        scaling(tmp / "src", tmp, args.count, shard_size)
        kill_cost(tmp / "src", tmp, shard_size)


if __name__ == "__main__":
    main()
