"""CurlStream: the libcurl multi engine as the worker uses it (order, bounds, fallback, guard, close).

The per-item behaviour (statuses, retries, caps, deadlines, SSRF) is the backend contract suite in
test_fetch_http.py / test_fetch_safety.py, which runs on both backends.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from convert import run
from convert.config import load_config
from convert.dataset import open_dataset
from convert.fetch import FetchPolicy, PrivateAddressError, fetch_bytes
from convert.fetch.prefetch import THREAD_PREFIX
from convert.specs import ItemError, Status
from convert.testing.images import jpeg_bytes
from convert.testing.proxy import Rule

pycurl = pytest.importorskip("pycurl")
from convert.fetch.curl import curl_fetch  # noqa: E402
from convert.fetch.curl_stream import CurlStream  # noqa: E402

OPEN = FetchPolicy(allow_private_networks=True, timeout=2.0, retries=2, backoff=0.01, backend="curl")
IMGS = [jpeg_bytes(40 + i, 30, seed=i) for i in range(12)]


def _local(item: str) -> bytes:
    return fetch_bytes(item, OPEN)


def _url(item: str) -> str | None:
    return item if item.startswith("http") else None


def test_order_kept_across_curl_and_fallback_items(http_server, tmp_path):
    items = []
    for i, img in enumerate(IMGS):
        if i % 3 == 0:  # every third item is a local file: read on the fallback pool
            (tmp_path / f"{i}.jpg").write_bytes(img)
            items.append(str(tmp_path / f"{i}.jpg"))
        else:
            items.append(http_server.put(f"/{i}.jpg", img))
    items.insert(5, http_server.url_for("/missing.jpg"))
    stream = CurlStream(items, _url, _local, OPEN, depth=4)
    got = list(stream)
    stream.close()
    assert [g.item for g in got] == items
    assert [g.value for g in got if g.ok] == IMGS
    (missing,) = [g for g in got if not g.ok]
    assert missing.item.endswith("/missing.jpg") and missing.error.status is Status.NOT_FOUND
    assert stream.inline_cpu_ns > 0


def test_at_most_depth_connections_and_they_are_reused(http_server, fault_proxy):
    for i in range(40):
        http_server.put(f"/d/{i}.jpg", IMGS[i % len(IMGS)])
    proxy = fault_proxy(http_server.url, default=Rule(latency=0.01))
    items = [f"{proxy.url}/d/{i}.jpg" for i in range(40)]
    got = list(CurlStream(items, _url, _local, OPEN, depth=3))
    assert all(g.ok for g in got) and len(got) == 40
    assert proxy.connections <= 3  # 40 items over at most `depth` keep-alive connections


def test_byte_budget_limits_transfers_in_flight(http_server, fault_proxy):
    body = b"z" * 100_000
    for i in range(20):
        http_server.put(f"/b/{i}.bin", body)
    proxy = fault_proxy(http_server.url, default=Rule(latency=0.01))
    items = [f"{proxy.url}/b/{i}.bin" for i in range(20)]
    # a budget of 2.5 bodies: after the first result, at most two more may be held or in flight
    got = list(CurlStream(items, _url, _local, OPEN, depth=16, max_bytes=250_000))
    assert all(g.value == body for g in got)
    assert proxy.connections <= 2


def test_early_close_leaves_no_threads_or_transfers(http_server, tmp_path):
    for i in range(30):
        (tmp_path / f"{i}.jpg").write_bytes(IMGS[0])
    items = [str(tmp_path / f"{i}.jpg") if i % 2 else http_server.put(f"/e/{i}.jpg", IMGS[1]) for i in range(30)]
    stream = CurlStream(items, _url, _local, OPEN, depth=8)
    assert next(stream).ok and next(stream).ok
    stream.close()
    time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]
    assert not stream._engine.active


def test_connection_opened_with_private_networks_allowed_is_not_reused_by_a_guarded_fetch(http_server):
    url = http_server.put("/p.jpg", IMGS[2])
    assert curl_fetch(url, OPEN) == IMGS[2]  # leaves a live keep-alive connection to 127.0.0.1
    guarded = FetchPolicy(timeout=2.0, retries=0, backend="curl")
    with pytest.raises(PrivateAddressError):
        curl_fetch(url, guarded)
    assert curl_fetch(url, OPEN) == IMGS[2]


def test_allowed_networks_exempt_an_address_from_the_guard(http_server):
    url = http_server.put("/n.jpg", IMGS[3])
    mirror = FetchPolicy(timeout=2.0, retries=0, backend="curl", allowed_networks=("127.0.0.0/8",))
    assert curl_fetch(url, mirror) == IMGS[3]
    other = FetchPolicy(timeout=2.0, retries=0, backend="curl", allowed_networks=("10.0.0.0/8",))
    with pytest.raises(ItemError) as info:
        curl_fetch(url, other)
    assert info.value.status is Status.BAD_URL


def test_redirect_to_another_scheme_is_refused(http_server):
    http_server.fault("/to-file.jpg", redirect="file:///etc/passwd")
    with pytest.raises(ItemError) as info:
        curl_fetch(http_server.url_for("/to-file.jpg"), OPEN)
    assert info.value.status in (Status.BAD_URL, Status.HTTP_ERROR)
    assert "root:" not in info.value.message


def test_pipeline_output_is_the_same_on_both_backends(tmp_path, http_server):
    urls = [http_server.put(f"/s/{i}.jpg", img) for i, img in enumerate(IMGS)]
    urls.append(http_server.url_for("/s/gone.jpg"))
    (tmp_path / "urls.txt").write_text("".join(u + "\n" for u in urls))
    arrays, ledgers = {}, {}
    for backend in ("curl", "urllib3"):
        cfg = load_config(
            None,
            {
                "source.uri": str(tmp_path / "urls.txt"),
                "output.uri": str(tmp_path / backend),
                "image.size": 32,
                "shard.size": 5,
                "cluster.kind": "threads",
                "fetch.backend": backend,
                "fetch.allow_private_networks": True,
            },
        )
        summary = run(cfg, log=lambda m: None)
        assert (summary.items_ok, summary.items_failed) == (len(IMGS), 1)
        ds = open_dataset(str(tmp_path / backend))
        arrays[backend] = np.stack([ds[i]["image"] for i in range(len(ds))])
        led = ds.ledger()
        ledgers[backend] = sorted(zip(led["key"], led["status"]))
    assert np.array_equal(arrays["curl"], arrays["urllib3"])
    assert ledgers["curl"] == ledgers["urllib3"]


def _child(url: str, queue) -> None:  # noqa: ANN001 - multiprocessing queue
    queue.put(curl_fetch(url, OPEN) == IMGS[4])


def test_a_forked_child_gets_its_own_connections(http_server, fault_proxy):
    import multiprocessing

    proxy = fault_proxy(http_server.url)
    url = proxy.url + "/" + http_server.put("/fork.jpg", IMGS[4]).rsplit("/", 1)[1]
    assert curl_fetch(url, OPEN) == IMGS[4]  # the parent's share now holds a live connection
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(url, queue))
    proc.start()
    assert queue.get(timeout=30)
    proc.join(timeout=30)
    assert curl_fetch(url, OPEN) == IMGS[4]  # the parent's connection was not disturbed
    assert proxy.connections == 2  # the parent's one (reused) and the child's own


def test_stream_close_is_idempotent(http_server):
    stream = CurlStream([http_server.put("/c.jpg", IMGS[5])], _url, _local, OPEN)
    assert next(stream).value == IMGS[5]
    stream.close()
    stream.close()


def test_the_next_shard_in_a_thread_reuses_the_connections_of_the_last(http_server, fault_proxy):
    """A shard's stream gives its idle engine back at close: 10-item shards do not open a TCP
    connection per item each (the fixed cost per shard, issue 22)."""
    proxy = fault_proxy(http_server.url)
    urls = [proxy.url + "/" + http_server.put(f"/k{i}.jpg", IMGS[i]).rsplit("/", 1)[1] for i in range(4)]
    for _ in range(3):  # three "shards" of the same four URLs, one after another in this thread
        stream = CurlStream(urls, _url, _local, OPEN, depth=4)
        assert [f.value for f in stream] == IMGS[:4]
        stream.close()
    assert proxy.connections == 4  # the first shard's four connections served all three


def test_a_stream_dropped_without_close_leaves_no_broken_engine_behind(http_server):
    """A stream collected by the garbage collector (its engine in a reference cycle, pycurl's handles
    finalised with it) must not hand that engine to the next stream: it is closed, not kept."""
    import gc

    url = http_server.put("/gc.jpg", IMGS[6])
    for _ in range(3):
        stream = CurlStream([url, url], _url, _local, OPEN)
        assert next(stream).value == IMGS[6]
        del stream  # dropped mid-way, never closed
        gc.collect()
        fresh = CurlStream([url], _url, _local, OPEN)
        assert [f.value for f in fresh] == [IMGS[6]]
        fresh.close()
