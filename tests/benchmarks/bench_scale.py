"""Internet scale: client / scheduler / worker memory, planning time and throughput against N.

    flock /work/wt/bench.lock python tests/benchmarks/bench_scale.py [--full 10000,100000,1000000]
                                                                    [--plan 10000000] [--workers 2]

Full runs: N tiny 32x32 JPEGs (100 distinct files, URLs made unique by a query) from a local static
server (nginx if installed), converted by `python -m convert run` against a real `dask scheduler` and
`dask worker` processes, so each process's RSS is sampled on its own (psutil, process trees, every
0.2 s). Plan-only: `python -m convert plan` on an N-line .txt list and an N-row parquet list.
Also: manifest bytes and the seconds of `inspect`, `verify` and `open_dataset` on the result.
Ratios are against the same run's smallest N (other jobs on the machine shift absolute figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import serve  # noqa: E402

from convert.testing import images as gen  # noqa: E402
from convert.testing.dask import DaskProcesses  # noqa: E402

URL_TEMPLATE = "{base}/img/{j:03d}.jpg?n={i:012d}&s=bench-scale-xx"  # ~63 characters, like the lists


class PeakRSS:
    """Peak resident memory (MB) of process trees, sampled in a thread."""

    def __init__(self, tree: bool = True, **roots: int) -> None:
        self.roots, self.tree = roots, tree  # tree=False: each root process alone (not its LocalCluster workers)
        self.peak = {name: 0.0 for name in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree_mb(self, pid: int) -> float:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)] if self.tree else [proc]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.roots.items():
                self.peak[name] = max(self.peak[name], self._tree_mb(pid))
            time.sleep(0.2)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_txt(path: Path, n: int, base: str) -> None:
    with open(path, "w") as f:
        for start in range(0, n, 100_000):
            f.write(
                "".join(
                    URL_TEMPLATE.format(base=base, j=i % 100, i=i) + "\n" for i in range(start, min(n, start + 100_000))
                )
            )


def write_parquet(path: Path, n: int, base: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("url", pa.string()), ("label", pa.int64())])) as w:
        for start in range(0, n, 1_000_000):
            rows = range(start, min(n, start + 1_000_000))
            w.write_table(
                pa.table(
                    {
                        "url": [URL_TEMPLATE.format(base=base, j=i % 100, i=i) for i in rows],
                        "label": [i % 1000 for i in rows],
                    }
                ),
                row_group_size=100_000,
            )


def timed(
    args: list[str], tree: bool = True, **roots: int
) -> tuple[float, subprocess.CompletedProcess[str], dict[str, float]]:
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(tree, client=proc.pid, **roots) as rss:
        out, err = proc.communicate()
    seconds = time.perf_counter() - start
    return seconds, subprocess.CompletedProcess(args, proc.returncode, out, err), rss.peak


def plan_only(lst: Path) -> dict[str, float]:
    seconds, res, peak = timed(
        [
            sys.executable,
            "-m",
            "convert",
            "plan",
            "--source",
            str(lst),
            "--output",
            "/tmp/unused",
            "--shard-size",
            "1000",
            "--json",
        ]
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    return {
        "items": report["items"],
        "shards": report["shards"],
        "plan_s": report["seconds"],
        "wall_s": seconds,
        "client_mb": peak["client"],
    }


def full_run(n: int, base: str, tmp: Path, workers: int) -> dict[str, float]:
    lst = tmp / f"urls-{n}.txt"
    write_txt(lst, n, base)
    out = tmp / f"out-{n}"
    with DaskProcesses(
        tmp / f"dask-{n}", workers=workers, worker_args=("--nthreads", "1", "--memory-limit", "2GB")
    ) as dp:
        args = [
            sys.executable,
            "-m",
            "convert",
            "run",
            "--source",
            str(lst),
            "--output",
            str(out),
            "--scheduler",
            dp.address,
            "--shard-size",
            "1000",
            "--threads",
            "16",
            "--size",
            "32",
            "--set",
            "fetch.allowed_schemes=[http]",
            "--set",
            "image.encode=raw",
            "--set",
            "fetch.allow_private_networks=true",
        ]  # the server is on loopback: opt in
        seconds, res, peak = timed(
            args, scheduler=dp.procs[0].pid, **{f"worker{i}": p.pid for i, p in enumerate(dp.procs[1:])}
        )
    assert res.returncode == 0, res.stderr[-3000:]
    rate = float(res.stderr.split(" images/s)")[0].rsplit("(", 1)[-1])
    result = {
        "items": n,
        "run_s": seconds,
        "items_per_s": rate,
        "client_mb": peak["client"],
        "scheduler_mb": peak["scheduler"],
        "worker_mb": max(v for k, v in peak.items() if k.startswith("worker")),
        "manifest_bytes": (out / "manifest.json").stat().st_size,
    }
    for name, cmd in (("inspect_s", ["inspect", str(out), "--json"]), ("verify_s", ["verify", str(out)])):
        t, res, _ = timed([sys.executable, "-m", "convert", *cmd])
        assert res.returncode == 0, res.stderr
        result[name] = t
    t, res, _ = timed(
        [sys.executable, "-c", f"import convert; ds = convert.open_dataset({str(out)!r}); print(len(ds))"]
    )
    assert res.returncode == 0 and int(res.stdout) == n, res.stderr
    result["open_dataset_s"] = t
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", default="10000,100000,1000000", help="N for full runs (comma-separated)")
    parser.add_argument("--plan", default="1000000,10000000", help="N for plan-only runs")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        www = tmp / "www"
        for j in range(100):
            path = www / "img" / f"{j:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(
                gen.jpeg_bytes(32, 32, seed=j)
                if "seed" in gen.jpeg_bytes.__code__.co_varnames
                else gen.jpeg_bytes(32, 32)
            )
        server, base, server_name = serve(www)
        print(f"server: {server_name}; {os.cpu_count()} CPUs (shared with other jobs)")
        try:
            for n in [int(x) for x in args.plan.split(",") if x]:
                txt, pq_path = tmp / f"plan-{n}.txt", tmp / f"plan-{n}.parquet"
                write_txt(txt, n, base)
                write_parquet(pq_path, n, base)
                for kind, path in (("txt", txt), ("parquet", pq_path)):
                    r = plan_only(path)
                    print(
                        f"plan {kind:8s} N={n:>9,}: {r['plan_s']:6.1f} s planning ({r['wall_s']:5.1f} s wall), "
                        f"client peak {r['client_mb']:6.0f} MB, {r['shards']} shards"
                    )
                txt.unlink()
                pq_path.unlink()
            results = []
            for n in [int(x) for x in args.full.split(",") if x]:
                r = full_run(n, base, tmp, args.workers)
                results.append(r)
                print(
                    f"run N={n:>9,}: {r['items_per_s']:7.0f} items/s, client {r['client_mb']:5.0f} MB, scheduler "
                    f"{r['scheduler_mb']:5.0f} MB, worker {r['worker_mb']:5.0f} MB, manifest {r['manifest_bytes']:>10,} B, "
                    f"inspect {r['inspect_s']:.1f} s, verify {r['verify_s']:.1f} s, open {r['open_dataset_s']:.1f} s",
                    flush=True,
                )
            if len(results) > 1:
                first, last = results[0], results[-1]
                print(
                    f"client RSS N={last['items']:,} / N={first['items']:,}: {last['client_mb'] / first['client_mb']:.2f} "
                    f"(target <= 1.3)"
                )
                prev = results[-2]
                print(
                    f"items/s N={last['items']:,} / N={prev['items']:,}: {last['items_per_s'] / prev['items_per_s']:.2f} "
                    f"(target >= 0.9)"
                )
        finally:
            server.terminate() if server_name.startswith("nginx") else server.stdin.close()
            server.wait(10)


if __name__ == "__main__":
    main()
