"""The cost of `fetch.robots_txt: respect` against `ignore` (issue 19 item 5), on both HTTP backends.

    flock /tmp/bench.lock python tests/benchmarks/bench_robots.py            # 1,000 hosts, 3 items each
    flock /tmp/bench.lock python tests/benchmarks/bench_robots.py --quick    # 200 hosts

One static server in a child process (its CPU is not counted as the client's) answers on 1,000
distinct loopback addresses (127.0.1.1, 127.0.1.2, ...: one "site" each, same port), with
`fetch.allowed_networks: [127.0.0.0/8]` so every connection goes through the address guard. The URL
list visits the hosts round-robin, as a web list mixes them. Each host's robots.txt disallows a path
the list never names, so both modes fetch the same images and the difference is robots.txt alone:
one extra GET per host (cold: a fresh worker process, the cache empty) or a cache lookup (warm).
Figures: client CPU (process_time) and wall time per item, best of the rounds, ratio to `ignore`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convert.fetch import CurlStream, FetchPolicy, fetch_bytes, prefetch, robots
from convert.fetch.http import pool_manager
from convert.testing.images import jpeg_bytes

DEPTH = 16  # items in flight, as fetch.threads


def serve(root: Path, hosts: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "convert.testing.http", str(root), str(hosts)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def run_once(urls: list[str], policy: FetchPolicy, cold: bool) -> tuple[float, float, int]:
    """(CPU s, wall s, items fetched) of one pass over `urls`."""
    if cold:
        robots.cache.clear()
    pool_manager(True, policy.allowed_networks).clear()  # no keep-alive connections left from the last pass
    cpu, wall = time.process_time(), time.perf_counter()
    if policy.uses_curl:
        results = list(CurlStream(urls, str, None, policy, depth=DEPTH))
    else:
        results = list(prefetch(urls, lambda u: fetch_bytes(u, policy), depth=DEPTH))
    fetched = sum(r.error is None for r in results)
    errors = {type(r.error).__name__ + ": " + str(r.error)[:80] for r in results if r.error is not None}
    if errors:
        raise SystemExit(f"unexpected failures: {sorted(errors)[:3]}")
    return time.process_time() - cpu, time.perf_counter() - wall, fetched


def bench(urls: list[str], backend: str, rounds: int) -> None:
    base = {"allowed_networks": ("127.0.0.0/8",), "backend": backend, "timeout": 10.0, "item_timeout": 60.0}
    modes: dict[str, tuple[FetchPolicy, bool]] = {
        "ignore": (FetchPolicy(**base), False),  # type: ignore[arg-type]
        "respect, cold cache": (FetchPolicy(**base, robots_txt="respect"), True),  # type: ignore[arg-type]
        "respect, warm cache": (FetchPolicy(**base, robots_txt="respect"), False),  # type: ignore[arg-type]
    }
    best: dict[str, tuple[float, float]] = {name: (float("inf"), float("inf")) for name in modes}
    run_once(urls[:50], modes["ignore"][0], False)  # warm up: imports, DNS cache
    for _ in range(rounds):  # interleaved, so a burst of load on the shared machine hits every mode
        for name, (policy, cold) in modes.items():
            cpu, wall, fetched = run_once(urls, policy, cold)
            assert fetched == len(urls), (name, fetched)
            best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
    cpu0, wall0 = best["ignore"]
    n = len(urls)
    print(f"  backend {backend}:")
    for name, (cpu, wall) in best.items():
        print(
            f"    {name:22s} {cpu / n * 1e6:7.0f} us CPU/item  {wall / n * 1e3:6.2f} ms wall/item"
            f"   CPU {cpu / cpu0:4.2f}x  wall {wall / wall0:4.2f}x of ignore"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 hosts, 2 rounds")
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--per-host", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hosts, rounds = (200, 2) if args.quick else (args.hosts, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "img").mkdir()
        for i in range(args.per_host):
            (root / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(64, 48, seed=i))
        (root / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
        proc, first = serve(root, hosts)
        try:
            port = first.rsplit(":", 1)[1]
            sites = [f"http://127.0.{1 + i // 250}.{1 + i % 250}:{port}" for i in range(hosts)]
            urls = [f"{site}/img/{k}.jpg" for k in range(args.per_host) for site in sites]
            print(
                f"bench_robots: {hosts} hosts x {args.per_host} items, depth {DEPTH}, best of {rounds}, "
                f"{os.cpu_count()} cpus"
            )
            for backend in ("curl", "urllib3"):
                bench(urls, backend, rounds)
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
