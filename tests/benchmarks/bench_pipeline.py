"""Pipeline throughput and where the CPU goes: JPEGs over loopback HTTP (nginx) and from a folder -> 64x64 HDF5.

Prints, all measured in this run on the same corpus:
1. single-core decode+resize rates of each decoder path (the baselines);
2. the CPU account per image of one URL-list run on a LocalCluster: worker-side stages from the shard
   records (convert.timing), process CPU of the client (+ in-process scheduler), nannies and workers,
   cluster start-up, Dask/task overhead (worker CPU not inside a stage) and idle core time;
3. whole-process wall time (start-up included) of `convert-dataset run` vs img2dataset on the same URL
   list, interleaved pairs, medians (img2dataset from --img2dataset, e.g. a venv under /tmp);
4. local folder -> HDF5 against cores x the fastest single-core rate (issue 21: >= 0.9);
5. peak RSS per worker for --rss-counts items (a URL list cycling through the corpus).

    flock /work/wt/bench.lock python tests/benchmarks/bench_pipeline.py [--count 5000] [--pairs 3]
        [--img2dataset /tmp/i2d-venv/bin/img2dataset] [--rss-counts 10000 100000]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask
import psutil
from distributed import Client, LocalCluster

from convert.executor.dask_executor import QUIET_LOGS
from convert.store import open_store
from convert.config import load_config
from convert import run
from convert.records import read_record
from convert.testing.images import write_corpus
from convert.transform import transform

OPEN = {"fetch.allow_private_networks": True}  # nginx is on 127.0.0.1: the benchmark opts in


def single_core_rates(paths: list[Path], size: int) -> dict[str, float]:
    """Images per CPU-second of decode + resize on one core, from in-memory bytes, per decoder."""
    blobs = [p.read_bytes() for p in paths]
    rates = {}
    for decoder in ("pillow", "simplejpeg"):
        try:
            cfg = load_config(
                None, {"source.uri": "x", "output.uri": "y", "image.size": size, "image.decoder": decoder}
            ).image
        except Exception:  # noqa: BLE001 - decoder not installed / not known to this version
            continue
        transform(blobs[0], cfg)
        start = time.process_time()
        for blob in blobs:
            transform(blob, cfg)
        rates[decoder] = len(blobs) / (time.process_time() - start)
    return rates


NGINX_CONF = """daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; keepalive_requests 100000;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{ listen 127.0.0.1:{port}; root {root}; }} }}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(root: Path) -> tuple[subprocess.Popen[str], str, str]:
    """A static HTTP/1.1 keep-alive server in its own process: nginx if installed, else ours."""
    if shutil.which("nginx"):
        port, tmp = _free_port(), root.parent
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, root=root))
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)], stdin=subprocess.PIPE, text=True)
        time.sleep(0.5)
        return proc, f"http://127.0.0.1:{port}", "nginx (1 worker process)"
    proc = subprocess.Popen(
        [sys.executable, "-m", "convert.testing.http", str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip(), "convert.testing.http (Python, threaded)"


def _cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write_list(path: Path, base_url: str, names: list[str], count: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url"])
        w.writerows([f"{base_url}/{names[i % len(names)]}"] for i in range(count))


def cpu_account(
    source: str, out: Path, size: int, workers: int, overrides: dict, server: psutil.Process
) -> dict[str, float]:
    """One run on a fresh LocalCluster; per-image milliseconds of every stage and process."""
    servers = [server, *server.children(recursive=True)]
    wall0, client_cpu0 = time.perf_counter(), _self_cpu()
    with dask.config.set(QUIET_LOGS):  # the settings of the clusters `run` starts (no profiler, short logs)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None)
    client = Client(cluster)
    startup = time.perf_counter() - wall0
    worker_pids = set(client.run(os.getpid).values())
    kids = psutil.Process().children(recursive=True)
    before = {p.pid: _cpu(p) for p in kids}
    client_before, server_before = _self_cpu(), sum(map(_cpu, servers))
    t0 = time.perf_counter()
    cfg = load_config(
        None,
        {
            "source.uri": source,
            "output.uri": str(out),
            "image.size": size,
            "shard.size": 250,
            "cluster.scheduler": cluster.scheduler_address,
            "run.overwrite": True,
            **overrides,
        },
    )
    summary = run(cfg, log=lambda m: None)
    run_wall = time.perf_counter() - t0
    assert summary.exit_code() == 0 and summary.items_failed == 0, summary
    after = {p.pid: _cpu(p) for p in kids}
    client_run, server_cpu = _self_cpu() - client_before, sum(map(_cpu, servers)) - server_before
    client.close()
    cluster.close()
    total_wall = time.perf_counter() - wall0
    n = summary.items_ok
    stages: dict[str, float] = {}
    shard_wall = 0.0
    for i in range(summary.shards):
        found = read_record(open_store(str(out)), f"shard-{i:05d}")
        if found:
            shard_wall += found[0].finished - found[0].started
            for k, v in found[0].stages.items():
                stages[k] = stages.get(k, 0.0) + v
    worker_cpu = sum(after[p] - before[p] for p in after if p in worker_pids)
    nanny_cpu = sum(after[p] - before[p] for p in after if p not in worker_pids)
    busy = sum(stages.get(k, 0.0) for k in ("fetch_cpu", "convert_cpu", "verify", "hash", "commit"))
    ms = {f"worker {k}": v * 1e3 / n for k, v in stages.items()}
    ms.update(
        {
            "worker process CPU (all)": worker_cpu * 1e3 / n,
            "Dask/task overhead (worker CPU outside stages)": (worker_cpu - busy) * 1e3 / n,
            "client + scheduler CPU (during run)": client_run * 1e3 / n,
            "client CPU incl. cluster start-up/teardown": (_self_cpu() - client_cpu0) * 1e3 / n,
            "nanny processes CPU": nanny_cpu * 1e3 / n,
            "HTTP server CPU (nginx)": server_cpu * 1e3 / n,
            "idle/other load (cores x wall - all CPU above)": max(
                0.0, workers * run_wall - worker_cpu - client_run - nanny_cpu - server_cpu
            )
            * 1e3
            / n,
            "hash re-read, % of shard wall time": 100 * stages.get("hash", 0.0) / max(shard_wall, 1e-9),
            "cluster start-up wall (s)": startup,
            "run wall (s)": run_wall,
            "whole wall (s)": total_wall,
            "img/s (run only)": n / run_wall,
        }
    )
    return ms


def local_steady_rate(source: str, out: Path, size: int, workers: int) -> float:
    """img/s of run() on an already running LocalCluster (the wave-1 measure: no start-up)."""
    with (
        dask.config.set(QUIET_LOGS),
        LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as c,
    ):
        cfg = load_config(
            None,
            {
                "source.uri": source,
                "output.uri": str(out),
                "image.size": size,
                "shard.size": 250,
                "cluster.scheduler": c.scheduler_address,
                "run.overwrite": True,
            },
        )
        return run(cfg, log=lambda m: None).images_per_second


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def ours_cmd(source: str, out: Path, size: int, extra: list[str] = ()) -> list[str]:
    sets = [f"--set={k}={str(v).lower()}" for k, v in OPEN.items()]
    return [
        sys.executable,
        "-m",
        "convert",
        "run",
        "--source",
        source,
        "--output",
        str(out),
        "--size",
        str(size),
        "--shard-size",
        "250",
        "--overwrite",
        *sets,
        *extra,
    ]


def i2d_cmd(exe: str, url_txt: Path, out: Path, size: int, workers: int) -> list[str]:
    return [
        exe,
        f"--url_list={url_txt}",
        "--input_format=txt",
        f"--output_folder={out}",
        "--output_format=files",
        f"--image_size={size}",
        "--resize_mode=center_crop",
        f"--processes_count={workers}",
        "--thread_count=32",
        "--number_sample_per_shard=250",
        "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]


def compare(args, root: Path, url_csv: Path, url_txt: Path, n: int) -> None:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    ours, theirs = [], []
    for i in range(args.pairs):
        ours.append(n / timed(ours_cmd(str(url_csv), root / "cmp-ours", args.size)))
        shutil.rmtree(root / "cmp-i2d", ignore_errors=True)
        theirs.append(n / timed(i2d_cmd(args.img2dataset, url_txt, root / "cmp-i2d", args.size, args.workers), env))
        print(f"  pair {i + 1}: convert {ours[-1]:6.0f} img/s, img2dataset {theirs[-1]:6.0f} img/s", flush=True)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(
        f"whole-process, URL list over loopback, median of {args.pairs} interleaved pairs: convert {a:.0f} img/s vs "
        f"img2dataset {b:.0f} img/s = {a / b:.2f}x (target >= 3.5x, issue 21: {'met' if a / b >= 3.5 else 'MISSED'})"
    )


def rss_runs(args, root: Path, base_url: str, names: list[str]) -> None:
    """Peak RSS per worker (VmHWM) at each of --rss-counts items and the ratio to the first count:
    checkpoints of one run on the product's own LocalCluster (bench_rss.py, which also probes why)."""
    from bench_rss import one_run  # here, not on top: bench_rss imports this module

    settings = {
        "counts": args.rss_counts,
        "size": args.size,
        "shard_size": 1000,
        "set": {"cluster.workers": args.workers},
        "probe": False,
        "tracemalloc": False,
        "trim": False,
    }
    one_run(argparse.Namespace(**settings), root, base_url, names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--img2dataset", default=shutil.which("img2dataset") or "/tmp/i2d-venv/bin/img2dataset")
    parser.add_argument("--rss-counts", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--skip", nargs="*", default=[], choices=["account", "compare", "local", "rss"])
    parser.add_argument("--account-backends", nargs="*", default=["urllib3", "curl"], help="fetch.backend values")
    parser.add_argument("--corpus", type=Path, default=None, help="reuse (or create) the JPEG corpus in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        www = root / "www"
        if args.corpus is not None:
            if len(list(args.corpus.glob("*.jpg"))) != args.count:
                shutil.rmtree(args.corpus, ignore_errors=True)
                write_corpus(args.corpus, args.count, 200, 600)
            www.symlink_to(args.corpus.resolve())
        paths = sorted(www.glob("*.jpg")) if args.corpus is not None else write_corpus(www, args.count, 200, 600)
        print(
            f"corpus: {args.count} JPEGs 200-600 px, mean {sum(p.stat().st_size for p in paths) / len(paths) / 1e3:.0f} kB "
            f"(generated in {time.perf_counter() - t0:.0f} s); {args.workers} cores"
        )
        rates = single_core_rates(paths[:500], args.size)
        best = max(rates, key=rates.get)
        print(
            "single-core decode+resize: "
            + ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items())
            + f" (fastest: {best})"
        )
        server, url, server_name = serve(root / "www")
        print(f"static server: {server_name}", flush=True)
        names = [p.name for p in paths]
        try:
            url_csv, url_txt = root / "urls.csv", root / "urls.txt"
            write_list(url_csv, url, names, len(names))
            url_txt.write_text("".join(f"{url}/{n}\n" for n in names))
            if "account" not in args.skip:
                print("CPU account per image (ms), URL list -> HDF5, per HTTP backend (urllib3 = the previous path):")
                accts = {
                    b: cpu_account(
                        str(url_csv),
                        root / "acct",
                        args.size,
                        args.workers,
                        {**OPEN, "fetch.backend": b},
                        psutil.Process(server.pid),
                    )
                    for b in args.account_backends
                }
                print(f"  {'':52s} " + " ".join(f"{b:>9s}" for b in accts))
                for k in next(iter(accts.values())):
                    print(f"  {k:52s} " + " ".join(f"{a.get(k, float('nan')):9.3f}" for a in accts.values()))
            if "compare" not in args.skip and os.path.exists(args.img2dataset):
                compare(args, root, url_csv, url_txt, len(names))
            if "local" not in args.skip:
                ceiling = args.workers * rates[best]  # issue 21: cores x the per-core decode+resize rate
                whole = len(names) / timed(ours_cmd(str(www.resolve()), root / "local-out", args.size))
                steady = local_steady_rate(str(www.resolve()), root / "local-out", args.size, args.workers)
                for what, rate in (("whole process", whole), ("running cluster, excl. start-up", steady)):
                    print(
                        f"local folder -> HDF5, {what}: {rate:.0f} img/s = {rate / ceiling:.2f} x ("
                        f"{args.workers} cores x {rates[best]:.0f} single-core {best}) (target >= 0.9, issue 21: "
                        f"{'met' if rate >= 0.9 * ceiling else 'MISSED'})",
                        flush=True,
                    )
            if "rss" not in args.skip:
                rss_runs(args, root, url, names)
        finally:
            server.terminate() if server_name.startswith("nginx") else server.stdin.close()
            server.wait(10)


if __name__ == "__main__":
    main()
