"""Pipeline throughput: a generated JPEG corpus over loopback HTTP -> 64x64 RGB HDF5 and LMDB.

Prints images/s for each format with a LocalCluster sized to this machine, next to the baseline
measured in the same run: this machine's single-core Pillow draft-decode+resize rate on the same
bytes (aim: conversion >= 0.6 x cores x that rate), plus peak RSS per worker process.

    python tests/benchmarks/bench_pipeline.py            # 5,000 images of 200-600 px
    python tests/benchmarks/bench_pipeline.py --count 500
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from convert.config import load_config
from convert import run
from convert.testing.images import write_corpus
from convert.transform import transform


def single_core_rate(paths: list[Path], size: int) -> float:
    """Images/s of decode (with draft) + resize on one core, from in-memory bytes."""
    cfg = load_config(None, {"source.uri": "x", "output.uri": "y", "image.size": size}).image
    blobs = [p.read_bytes() for p in paths]
    start = time.process_time()
    for blob in blobs:
        transform(blob, cfg)
    return len(blobs) / (time.process_time() - start)


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
    proc = subprocess.Popen([sys.executable, "-m", "convert.testing.http", str(root)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    return proc, proc.stdout.readline().strip(), "convert.testing.http (Python, threaded)"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert_once(source: str, out: Path, fmt: str, size: int, workers: int, threads: int) -> tuple[float, list[float]]:
    with LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        cfg = load_config(None, {"source.uri": source, "output.uri": str(out), "output.format": fmt,
                                 "image.size": size, "shard.size": 250, "fetch.threads": threads, "cluster.scheduler": cluster.scheduler_address,
                                 "run.overwrite": True})  # fmt: skip
        summary = run(cfg, log=lambda m: None)
        assert summary.exit_code() == 0 and summary.items_failed == 0, summary
        with Client(cluster) as client:
            rss = list(client.run(peak_rss_mb).values())
    return summary.images_per_second, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--threads", type=int, default=16, help="fetch.threads (concurrent fetches per shard)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = write_corpus(root / "www", args.count, 200, 600)
        print(f"corpus: {args.count} JPEGs 200-600 px, {sum(p.stat().st_size for p in paths) / 2**20:.0f} MiB "
              f"(generated in {time.perf_counter() - t0:.0f} s)")  # fmt: skip
        base = single_core_rate(paths[:500], args.size)
        target = 0.6 * args.workers * base
        print(f"baseline: single-core draft decode+resize {base:.0f} img/s; target 0.6 x {args.workers} cores = {target:.0f} img/s")
        server, url, server_name = serve(root / "www")
        print(f"static server: {server_name}")
        try:
            with open(root / "urls.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["url"])
                w.writerows([f"{url}/{p.name}"] for p in paths)
            for label, source in (("http", str(root / "urls.csv")), ("local files", str(root / "www"))):
                for fmt in ("hdf5", "lmdb"):
                    rate, rss = convert_once(source, root / f"out-{fmt}", fmt, args.size, args.workers, args.threads)
                    print(f"{label:>11} -> {fmt:<4}: {rate:6.0f} img/s = {rate / target:.2f} x target "
                          f"({rate / (args.workers * base):.2f} x cores x single-core); "
                          f"peak RSS per worker {', '.join(f'{r:.0f}' for r in rss)} MiB")  # fmt: skip
        finally:
            server.terminate() if server_name.startswith("nginx") else server.stdin.close()
            server.wait(10)


if __name__ == "__main__":
    main()
