"""Fetch-layer benchmark: every figure is printed next to a baseline measured in the same run.

    python tests/benchmarks/bench_fetch.py            # full run (~1-2 min on 2 cores)
    python tests/benchmarks/bench_fetch.py --quick    # smaller sizes/counts

1. Large objects: resilient reader vs plain fsspec open().read(), no faults and a cut every 4 MB.
2. A shard of small images over a loopback link with 20 ms added latency: prefetch depth 1/16/64.
3. Client CPU per small-image GET: requests.Session (baseline) vs urllib3 vs aiohttp vs fetch_bytes,
   and, as a shard fetches a URL list, urllib3 on 16 prefetch threads vs CurlStream (libcurl multi),
   with the CPU of decoding that image for scale.

Servers and proxies run in child processes so their CPU is not counted as the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import fsspec
from PIL import Image

from convert.fetch import CurlStream, FetchPolicy, fetch_bytes, open_resilient, prefetch
from convert.testing.images import jpeg_bytes, write_corpus

MB = 1 << 20
CAP_RATE = 32 * MB  # per-connection bandwidth cap (like an object store's per-stream limit)


@contextlib.contextmanager
def child(*args: str) -> Iterator[str]:
    """Run `python -m <args>` that prints its URL and serves until stdin closes."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"child {args} did not start")
        yield url
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def best_of(n: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# -- 1. large objects ----------------------------------------------------------------------
def bench_large(root: Path, count: int, size: int, repeat: int) -> None:
    names = []
    for i in range(count):
        data = os.urandom(size)
        (root / f"obj{i}.bin").write_bytes(data)
        names.append((f"/obj{i}.bin", hashlib.sha256(data).hexdigest()))
    total = count * size / MB

    def run(base: str, reader: Callable[[str], bytes]) -> Callable[[], None]:
        def go() -> None:
            for name, digest in names:
                if hashlib.sha256(reader(base + name)).hexdigest() != digest:
                    raise AssertionError(f"wrong bytes for {name}")

        return go

    def plain(url: str) -> bytes:
        with fsspec.open(url, "rb") as f:
            return f.read()

    def resilient(url: str, **kw: object) -> bytes:
        with open_resilient(url, **kw) as f:  # type: ignore[arg-type]
            return f.read()

    print(f"\n[1] {count} x {size // MB} MB objects over loopback HTTP, best of {repeat} (MB/s; ratio vs fsspec)")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(child("convert.testing.http", str(root)))
        faulty = stack.enter_context(child("convert.testing.proxy", server, "--cut-after", str(4 * MB)))
        capped = stack.enter_context(child("convert.testing.proxy", server, "--rate", str(CAP_RATE)))
        cap_label = f"{CAP_RATE // MB} MB/s per conn"
        for label, base in (("no faults", server), ("cut every 4 MB", faulty), (cap_label, capped)):
            try:
                t_plain = best_of(repeat, run(base, plain))
                plain_txt = f"{total / t_plain:8.1f}"
            except Exception as exc:  # noqa: BLE001 - plain fsspec is expected to fail under faults
                t_plain, plain_txt = None, f"failed ({type(exc).__name__})"
            print(f"  {label:16s} fsspec open().read()        {plain_txt}")
            for name, kw in (("resilient", {}), ("resilient readahead=4", {"readahead": 4})):
                t = best_of(repeat, run(base, lambda u, kw=kw: resilient(u, **kw)))
                ratio = f"{t_plain / t:5.2f}x" if t_plain else "  n/a"
                print(f"  {label:16s} {name:26s} {total / t:8.1f}  {ratio}")


# -- 2. a shard of small images over a slow link ----------------------------------------
def bench_prefetch(root: Path, count: int, latency: float, depths: tuple[int, ...]) -> None:
    corpus = root / "small"
    paths = write_corpus(corpus, count, min_side=64, max_side=160, seed=1)
    avg = sum(p.stat().st_size for p in paths) / len(paths)
    policy = FetchPolicy(timeout=30, allow_private_networks=True)
    print(f"\n[2] {count} small images (avg {avg / 1024:.1f} KB), +{latency * 1000:.0f} ms per request via proxy")
    with child("convert.testing.http", str(corpus)) as server:
        with child("convert.testing.proxy", server, "--latency", str(latency)) as slow:
            urls = [f"{slow}/{p.name}" for p in paths]
            base = None
            for depth in depths:
                start = time.perf_counter()
                n = sum(r.ok for r in prefetch(urls, lambda u: fetch_bytes(u, policy), depth=depth))
                t = time.perf_counter() - start
                assert n == count, f"{count - n} fetches failed"
                base = base or t
                print(f"  depth {depth:3d}: {count / t:8.1f} images/s  {t:6.2f} s  speed-up {base / t:5.1f}x")


# -- 3. client CPU per request -----------------------------------------------------------
THREADS = 8
Batch = Callable[[int], object]  # performs k requests


def compare_cpu(batches: dict[str, Batch], n: int, rounds: int = 5) -> dict[str, float]:
    """CPU seconds per request of each variant: rounds interleaved, best round kept (the
    machine is shared, so a burst of load should not land on one variant only)."""
    k = max(n // rounds, 1)
    for batch in batches.values():
        batch(2)  # warm up: connections, imports
    best = {name: float("inf") for name in batches}
    for _ in range(rounds):
        for name, batch in batches.items():
            start = time.process_time()
            batch(k)
            best[name] = min(best[name], (time.process_time() - start) / k)
    return best


def _report(rows: dict[str, float], baseline: str) -> None:
    base = rows[baseline]
    for name, cpu in rows.items():
        print(f"  {name:34s} {cpu * 1e6:7.0f} us/request  {cpu / base:5.2f}x of {baseline.split()[0]}")


def bench_cpu(root: Path, n: int) -> None:
    import requests
    import urllib3

    img = jpeg_bytes(320, 240, seed=7, quality=85)
    (root / "cpu").mkdir(exist_ok=True)
    (root / "cpu" / "img.jpg").write_bytes(img)
    print(f"\n[3] client CPU per GET of a {len(img) / 1024:.1f} KB JPEG ({n} requests per variant, process_time)")

    def decode() -> None:
        with Image.open(io.BytesIO(img)) as im:
            im.convert("RGB").load()

    with child("convert.testing.http", str(root / "cpu")) as server, _aiohttp_clients() as aio:
        url = server + "/img.jpg"
        session, pool = requests.Session(), urllib3.PoolManager(maxsize=THREADS)
        policy = FetchPolicy(allow_private_networks=True, backend="urllib3")  # the server is on loopback
        guarded = FetchPolicy(allowed_networks=("127.0.0.0/8",), backend="urllib3")  # same, through the guard
        curl = FetchPolicy(allow_private_networks=True, backend="curl")
        curl_guarded = FetchPolicy(allowed_networks=("127.0.0.0/8",), backend="curl")
        curl_unscreened = FetchPolicy(allow_private_networks=True, backend="curl", disallowed_header_directives=())
        unscreened = FetchPolicy(allow_private_networks=True, backend="urllib3", disallowed_header_directives=())
        keepalive = _HTTPClientPerThread(url)
        calls = {
            "requests.Session (baseline)": lambda: session.get(url).content,
            "urllib3 PoolManager": lambda: pool.request("GET", url).data,
            "http.client keep-alive per thread": keepalive.get,
            "fetch_bytes (urllib3 hot path)": lambda: fetch_bytes(url, policy),
            "fetch_bytes, no X-Robots-Tag check": lambda: fetch_bytes(url, unscreened),
            "fetch_bytes, address guard on": lambda: fetch_bytes(url, guarded),
        }
        serial: dict[str, Batch] = {name: (lambda k, f=f: [f() for _ in range(k)]) for name, f in calls.items()}
        serial["aiohttp (all in one event loop)"] = lambda k: aio.serial(url, k)
        # how a shard fetches a URL list: 16 ahead, in order - the old way (urllib3 on prefetch
        # threads) and the new (libcurl multi, driven from the consuming thread)
        serial["prefetch x16 threads + fetch_bytes (urllib3)"] = lambda k: list(
            prefetch([url] * k, lambda u: fetch_bytes(u, policy), depth=16)
        )
        serial["CurlStream x16 (pycurl multi)"] = lambda k: list(CurlStream([url] * k, str, None, curl, depth=16))
        serial["CurlStream x16, address guard on"] = lambda k: list(
            CurlStream([url] * k, str, None, curl_guarded, depth=16)
        )
        serial["CurlStream x16, no X-Robots-Tag check"] = lambda k: list(
            CurlStream([url] * k, str, None, curl_unscreened, depth=16)
        )
        serial["(PIL decode of the same image)"] = lambda k: [decode() for _ in range(k)]
        print("  one caller:")
        _report(compare_cpu(serial, n), "requests.Session (baseline)")
        with ThreadPoolExecutor(THREADS) as workers:
            threaded: dict[str, Batch] = {
                name: (lambda k, f=f: list(workers.map(lambda _: f(), range(k)))) for name, f in calls.items()
            }
            threaded["aiohttp via a loop thread"] = lambda k: list(workers.map(lambda _: aio.bridged(url), range(k)))
            print(f"  {THREADS} worker threads (how the shard worker calls it):")
            _report(compare_cpu(threaded, n), "requests.Session (baseline)")


class _HTTPClientPerThread:
    """http.client.HTTPConnection kept alive per thread: the leanest stdlib client (no pooling
    layer, no retries, no redirects, no guard) - the floor a hand-written fast path could reach."""

    def __init__(self, url: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.local = threading.local()

    def get(self) -> bytes:
        import http.client

        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request("GET", self.path)
        return conn.getresponse().read()


class _Aio:
    """aiohttp on its own event-loop thread: `serial` runs k GETs inside the loop, `bridged`
    is one GET submitted from another thread (what a threaded prefetch would need)."""

    def __init__(self) -> None:
        import aiohttp

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128))

        self.session = self._run(make())

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()  # type: ignore[arg-type]

    async def _get(self, url: str) -> bytes:
        async with self.session.get(url) as r:
            return await r.read()

    async def _many(self, url: str, k: int) -> None:
        for _ in range(k):
            await self._get(url)

    def serial(self, url: str, k: int) -> None:
        self._run(self._many(url, k))

    def bridged(self, url: str) -> bytes:
        return self._run(self._get(url))  # type: ignore[return-value]

    def close(self) -> None:
        self._run(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def _aiohttp_clients() -> Iterator[_Aio]:
    aio = _Aio()
    try:
        yield aio
    finally:
        aio.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and counts")
    parser.add_argument("--cpu-only", action="store_true", help="only [3], client CPU per GET")
    args = parser.parse_args()
    q = args.quick
    print(f"bench_fetch: python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bench_cpu(root, n=300 if q else 2000)
        if args.cpu_only:
            return
        (root / "large").mkdir()
        bench_large(root / "large", count=2 if q else 4, size=(16 if q else 32) * MB, repeat=2 if q else 3)
        bench_prefetch(root, count=200 if q else 1000, latency=0.020, depths=(1, 16, 64))


if __name__ == "__main__":
    main()
