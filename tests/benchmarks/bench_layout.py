"""Process x thread x fetch-concurrency layout of the default LocalCluster, on 1 and 2 cores.

Whole-process wall time of `convert-dataset run` (URL list over loopback nginx -> 64x64 HDF5),
pinned with `taskset` to the first N cores, for each layout; the default layout (what
`cluster.workers` / `cluster.threads_per_worker` / `fetch.threads` give when unset) is the
baseline of each core count, so the table says whether the default is the best choice here.

    flock /work/wt/bench.lock python tests/benchmarks/bench_layout.py --list /tmp/urls5k.csv [--repeat 2]

The list must point at a running static server (tests/benchmarks/bench_pipeline.py starts one;
any nginx on 127.0.0.1 serving the corpus will do).

Local folder mode (issue 21 item 3): local folder -> 64x64 HDF5 on an already running LocalCluster
of N single-thread workers pinned to N cores, against N x the per-core decode+resize rate of the same
images measured in the same child (CPU time, fastest decoder), for each `--code` checkout (e.g. main
as the before-figure) and each per-shard decode thread count; runs interleaved, medians printed:

    flock /tmp/bench.lock python tests/benchmarks/bench_layout.py --folder /tmp/corpus6k --code /work/main . \
        --decode-threads 1 2 3 --cores 1 2 4 --repeat 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    return [
        sys.executable,
        "-m",
        "convert",
        "run",
        "--source",
        source,
        "--output",
        out,
        "--size",
        "64",
        "--shard-size",
        "250",
        "--overwrite",
        *[f"--set={s}" for s in sets],
    ]


def timed(cmd: list[str], cores: int) -> float:
    pinned = ["taskset", "-c", ",".join(map(str, sorted(os.sched_getaffinity(0))[:cores])), *cmd]
    start = time.perf_counter()
    proc = subprocess.run(pinned, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return time.perf_counter() - start


def folder_child(folder: str, cores: int, decode_threads: int | None) -> None:
    """In a child pinned to `cores` cores, with PYTHONPATH at the code under test: print
    `img/s per-core-rate` of one folder run on a running cluster (cluster start-up excluded)."""
    import dask
    from distributed import Client, LocalCluster

    from bench_pipeline import single_core_rates
    from convert import run
    from convert.config import load_config
    from convert.executor.dask_executor import QUIET_LOGS

    paths = sorted(Path(folder).glob("*.jpg"))
    out = tempfile.mkdtemp(prefix="bench-folder-")
    try:
        with (
            dask.config.set(QUIET_LOGS),
            LocalCluster(n_workers=cores, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            if decode_threads is not None:
                client.run(_set_decode_threads, decode_threads)
            cfg = load_config(
                None,
                {
                    "source.uri": folder,
                    "output.uri": out,
                    "image.size": 64,
                    "shard.size": 250,
                    "cluster.scheduler": cluster.scheduler_address,
                    "run.overwrite": True,
                },
            )
            rate = run(cfg, log=lambda m: None).images_per_second
        per_core = max(single_core_rates(paths[:400], 64).values())
        with multiprocessing.get_context("fork").Pool(cores) as pool:
            parallel = sum(pool.map(_wall_rate, [[str(p) for p in paths[i:1600:cores]] for i in range(cores)]))
        print(f"{rate} {per_core} {parallel}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _wall_rate(paths: list[str]) -> float:
    """img/s, wall time, of in-memory decode+resize of `paths` on this process (one core's share now)."""
    from convert.config import load_config
    from convert.transform import transform

    cfg = load_config(None, {"source.uri": "x", "output.uri": "y", "image.size": 64}).image
    blobs = [Path(p).read_bytes() for p in paths]
    start = time.perf_counter()
    for blob in blobs:
        transform(blob, cfg)
    return len(blobs) / (time.perf_counter() - start)


def _set_decode_threads(n: int) -> None:
    import convert.worker

    convert.worker.DECODE_THREADS = n


def folder_main(args: argparse.Namespace) -> None:
    """Interleaved runs of every (cores, code, decode threads) variant; medians and ratios."""
    here = os.path.dirname(os.path.abspath(__file__))
    if len(list(Path(args.folder).glob("*.jpg"))) < args.count:
        from convert.testing.images import write_corpus

        shutil.rmtree(args.folder, ignore_errors=True)
        write_corpus(args.folder, args.count, 200, 600)
    variants = [
        (c, code, k)
        for c in args.cores
        if c <= len(os.sched_getaffinity(0)) or args.oversubscribe
        for code in args.code
        for k in ([None] if "main" in code else args.decode_threads)
    ]
    found: dict[tuple, list[tuple[float, float, float]]] = {v: [] for v in variants}
    for rep in range(args.repeat):
        for v in variants:
            cores, code, k = v
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(code), here])}
            cpus = ",".join(str(c % len(os.sched_getaffinity(0))) for c in range(cores))  # > cores: shares them
            cmd = [
                "taskset",
                "-c",
                cpus,
                sys.executable,
                os.path.abspath(__file__),
                "--folder",
                args.folder,
                "--child",
                str(cores),
                str(k or 0),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"child failed: {proc.stderr[-1500:]}")
            rate, per_core, parallel = map(float, proc.stdout.split()[-3:])
            found[v].append((rate, per_core, parallel))
            print(
                f"  rep {rep + 1} {cores} core(s) {code} threads={k}: {rate:.0f} img/s, per-core {per_core:.0f} "
                f"(CPU time) = {rate / (cores * per_core):.2f}x; {cores} decode processes now {parallel:.0f} img/s "
                f"(wall) = {rate / parallel:.2f}x; load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    print(
        f"local folder -> 64x64 HDF5, {args.count} JPEGs, running cluster, median of {args.repeat} interleaved runs "
        f"(load average now {os.getloadavg()}):"
    )
    for v, runs in found.items():
        cores, code, k = v
        ratio = statistics.median(r / (cores * p) for r, p, _ in runs)
        wall = statistics.median(r / q for r, _, q in runs)
        rate, per_core = statistics.median(r for r, _, _ in runs), statistics.median(p for _, p, _ in runs)
        print(
            f"  {cores} core(s) {code:12s} decode threads {k or '-':>2}: {rate:6.0f} img/s = {ratio:.2f}x of {cores} x "
            f"{per_core:.0f} per core (CPU time; target >= 0.9: {'met' if ratio >= 0.9 else 'MISSED'}); "
            f"{wall:.2f}x of {cores} decode processes in the same run (wall)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--list", help="URL list (csv with a url column, or txt)")
    parser.add_argument("--folder", help="local folder mode: a JPEG corpus folder (created with --count if short)")
    parser.add_argument("--count", type=int, default=6000)
    parser.add_argument("--code", nargs="*", default=["."], help="checkouts to compare (PYTHONPATH of each child)")
    parser.add_argument("--decode-threads", type=int, nargs="*", default=[2])
    parser.add_argument("--oversubscribe", action="store_true", help="core counts above this machine's share cores")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cores", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    if args.child:
        return folder_child(args.folder, args.child[0], args.child[1] or None)
    if args.folder:
        return folder_main(args)
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
