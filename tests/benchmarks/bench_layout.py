"""Process x thread x fetch-concurrency layout of the default LocalCluster, on 1 and 2 cores.

Whole-process wall time of `convert-dataset run` (URL list over loopback nginx -> 64x64 HDF5),
pinned with `taskset` to the first N cores, for each layout; the default layout (what
`cluster.workers` / `cluster.threads_per_worker` / `fetch.threads` give when unset) is the
baseline of each core count, so the table says whether the default is the best choice here.

    flock /work/wt/bench.lock python tests/benchmarks/bench_layout.py --list /tmp/urls5k.csv [--repeat 2]

The list must point at a running static server (tests/benchmarks/bench_pipeline.py starts one;
any nginx on 127.0.0.1 serving the corpus will do).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

LAYOUTS = [  # (worker processes, threads per worker, fetch concurrency per shard); None = default
    (None, None, None),
    (1, 1, 16),
    (1, 2, 16),
    (2, 1, 4),
    (2, 1, 64),
    (2, 2, 16),
    (4, 1, 16),
]


def _cmd(source: str, out: str, layout: tuple[int | None, ...]) -> list[str]:
    workers, threads, fetch = layout
    sets = ["fetch.allow_private_networks=true"]
    if workers:
        sets.append(f"cluster.workers={workers}")
    if threads:
        sets.append(f"cluster.threads_per_worker={threads}")
    if fetch:
        sets.append(f"fetch.threads={fetch}")
    return [sys.executable, "-m", "convert", "run", "--source", source, "--output", out, "--size", "64",
            "--shard-size", "250", "--overwrite", *[f"--set={s}" for s in sets]]  # fmt: skip


def timed(cmd: list[str], cores: int) -> float:
    pinned = ["taskset", "-c", ",".join(map(str, sorted(os.sched_getaffinity(0))[:cores])), *cmd]
    start = time.perf_counter()
    proc = subprocess.run(pinned, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--list", required=True, help="URL list (csv with a url column, or txt)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cores", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    with open(args.list) as f:
        n = sum(1 for line in f if line.strip()) - (1 if args.list.endswith(".csv") else 0)
    out = tempfile.mkdtemp(prefix="bench-layout-")
    try:
        for cores in args.cores:
            if cores > len(os.sched_getaffinity(0)):
                continue
            print(f"{cores} core(s), {n} URLs, whole-process img/s (median of {args.repeat}); ratio vs the default:")
            base = None
            for layout in LAYOUTS:
                rates = []
                for _ in range(args.repeat):
                    shutil.rmtree(out, ignore_errors=True)
                    rates.append(n / timed(_cmd(args.list, out, layout), cores))
                rate = statistics.median(rates)
                base = base or rate
                name = "default" if layout == (None, None, None) else "%s proc x %s thr x %s fetch" % layout
                print(f"  {name:28s} {rate:7.0f} img/s  {rate / base:5.2f}x", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
