"""prefetch: order, overlap, bounds on count and bytes, errors as values, clean early shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from convert.fetch import Fetched, FetchPolicy, fetch_bytes, prefetch
from convert.fetch.prefetch import THREAD_PREFIX
from convert.testing.images import jpeg_bytes
from convert.testing.proxy import Rule

WAIT = 10.0  # generous bound on every wait; a correct implementation never gets near it


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def test_order_is_preserved_while_fetches_overlap():
    done = {i: threading.Event() for i in range(10)}

    def fetch(i: int) -> int:
        if i == 0 and not done[5].wait(WAIT):  # item 0 finishes only after item 5 has
            raise TimeoutError("item 5 never ran concurrently with item 0")
        done[i].set()
        return i * i

    results = list(prefetch(range(10), fetch, depth=8))
    assert [r.item for r in results] == list(range(10))
    assert [r.value for r in results] == [i * i for i in range(10)]
    assert all(r.ok for r in results)


def test_fetches_overlap_with_processing():
    fetched = {i: threading.Event() for i in range(6)}

    def fetch(i: int) -> int:
        fetched[i].set()
        return i

    gen = prefetch(range(6), fetch, depth=4)
    first = next(gen)
    assert first.item == 0
    assert fetched[3].wait(WAIT)  # fetched while the consumer still holds item 0
    assert [r.item for r in gen] == [1, 2, 3, 4, 5]


def test_in_flight_count_is_bounded():
    lock, active, peak = threading.Lock(), [0], [0]
    release = threading.Event()

    def fetch(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        release.wait(WAIT)
        with lock:
            active[0] -= 1
        return i

    gen = prefetch(range(50), fetch, depth=3)
    consumer = threading.Thread(target=lambda: list(gen))
    consumer.start()
    deadline = time.monotonic() + WAIT
    while peak[0] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a fourth fetch, if wrongly started, would show up here
    assert peak[0] == 3
    release.set()
    consumer.join(WAIT)
    assert peak[0] == 3


def test_bytes_held_are_bounded():
    size = 1000
    lock = threading.Lock()
    outstanding, peak = [0], [0]  # fetches started and not yet handed to the consumer

    def fetch(i: int) -> bytes:
        with lock:
            outstanding[0] += 1
            peak[0] = max(peak[0], outstanding[0])
        return bytes(size)

    seen = 0
    for r in prefetch(range(200), fetch, depth=16, max_bytes=4 * size):
        with lock:
            outstanding[0] -= 1
        seen += len(r.value)
    assert seen == 200 * size
    assert peak[0] <= 4  # 16 threads, but only 4 items' worth of bytes at a time


def test_size_of_is_used_for_the_byte_bound():
    lock, outstanding, peak = threading.Lock(), [0], [0]

    def fetch(i: int) -> dict:
        with lock:
            outstanding[0] += 1
            peak[0] = max(peak[0], outstanding[0])
        return {"n": 100}

    for _ in prefetch(range(60), fetch, depth=8, max_bytes=250, size_of=lambda d: d["n"]):
        with lock:
            outstanding[0] -= 1
    assert peak[0] <= 2


def test_errors_are_values():
    def fetch(i: int) -> int:
        if i % 3 == 0:
            raise ValueError(f"bad {i}")
        return i

    results = list(prefetch(range(7), fetch, depth=4))
    assert [r.item for r in results] == list(range(7))
    for r in results:
        if r.item % 3 == 0:
            assert not r.ok and isinstance(r.error, ValueError) and r.value is None
            assert str(r.error) == f"bad {r.item}"
        else:
            assert r.ok and r.value == r.item
    assert isinstance(results[0], Fetched)
    with pytest.raises(AttributeError):
        results[0].value = 1  # type: ignore[misc]  # frozen


def test_early_close_stops_all_threads():
    started = []

    def fetch(i: int) -> int:
        started.append(i)
        time.sleep(0.01)
        return i

    gen = prefetch(range(1000), fetch, depth=8)
    assert [next(gen).item for _ in range(3)] == [0, 1, 2]
    gen.close()
    assert prefetch_threads() == []
    assert len(started) < 100  # queued work was cancelled, not run to the end


def test_consumer_exception_stops_all_threads():
    def consume() -> None:
        for r in prefetch(range(1000), lambda i: i, depth=8):
            if r.item == 5:
                raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError):
        consume()
    assert prefetch_threads() == []


def test_bad_depth():
    with pytest.raises(ValueError):
        list(prefetch([1], lambda i: i, depth=0))


def test_overlapped_fetches_over_a_slow_link(http_server, fault_proxy):
    img = jpeg_bytes(32, 32)
    for i in range(24):
        http_server.put(f"/p/{i}.jpg", img)
    proxy = fault_proxy(http_server.url, default=Rule(latency=0.05))
    urls = [f"{proxy.url}/p/{i}.jpg" for i in range(24)]
    policy = FetchPolicy(allow_private_networks=True, timeout=5)
    results = list(prefetch(urls, lambda u: fetch_bytes(u, policy), depth=12))
    assert [r.item for r in results] == urls and all(r.value == img for r in results)
    assert proxy.connections > 1  # several requests were in flight at once (serial reuses one)


def test_estimate_allows_a_parallel_start_within_the_bound():
    barrier = threading.Barrier(3, timeout=WAIT)

    def fetch(i: int) -> bytes:
        if i < 3:
            barrier.wait()  # the first three must be in flight together
        return bytes(100)

    results = list(prefetch(range(6), fetch, depth=8, max_bytes=300, estimate=100))
    assert [r.item for r in results] == list(range(6)) and all(r.ok for r in results)


def test_importing_the_fetch_layer_loads_no_http_stack():
    """A DataLoader worker imports convert.fetch (prefetch) for shard reads: neither HTTP backend
    (urllib3's pool module, libcurl) may come with it; fetch_bytes loads them on first use."""
    import subprocess
    import sys

    code = (
        "import sys, convert.dataset, convert.fetch\n"
        "loaded = {m for m in ('pycurl', 'convert.fetch.http', 'convert.fetch.curl') if m in sys.modules}\n"
        "assert not loaded, loaded\n"
        "from convert.fetch import fetch_bytes, CurlStream\n"
        "assert 'convert.fetch.http' in sys.modules and 'convert.fetch.curl' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
