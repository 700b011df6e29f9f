"""fetch_bytes: statuses, retries, caps and schemes against a real loopback HTTP server."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest

from convert.fetch import FetchPolicy, fetch_bytes, pool_manager, redact_url
from convert.fetch.retry import RETRY_AFTER_CAP, parse_retry_after, retry_delay
from convert.specs import ItemError, Status
from convert.testing.images import jpeg_bytes
from convert.testing.proxy import Rule

pytestmark = pytest.mark.usefixtures("http_backend")  # the contract suite: every case on every backend

FAST = FetchPolicy(allow_private_networks=True, timeout=2.0, retries=3, backoff=0.01)


@pytest.fixture(autouse=True)
def _policy_for_backend(http_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """FAST was made at import; remade here, it takes the backend under test (chosen once per policy)."""
    monkeypatch.setattr(sys.modules[__name__], "FAST", dataclasses.replace(FAST))


IMG = jpeg_bytes(64, 48, seed=3)


def _status(uri: str, policy: FetchPolicy | None = None) -> ItemError:
    with pytest.raises(ItemError) as info:
        fetch_bytes(uri, policy or FAST)
    return info.value


def test_ok_and_keepalive_reuse(http_server, fault_proxy):
    http_server.put("/a.jpg", IMG)
    proxy = fault_proxy(http_server.url)
    for _ in range(20):
        assert fetch_bytes(proxy.url + "/a.jpg", FAST) == IMG
    assert proxy.connections == 1  # one pooled keep-alive connection served all twenty


def test_serves_files_from_root(http_server):
    (http_server.root / "sub").mkdir()
    (http_server.root / "sub" / "b.jpg").write_bytes(IMG)
    assert fetch_bytes(http_server.url_for("/sub/b.jpg"), FAST) == IMG


def test_404_is_not_found_without_retry(http_server):
    err = _status(http_server.url_for("/missing.jpg"))
    assert err.status is Status.NOT_FOUND
    assert "/missing.jpg" in err.message
    assert http_server.hits("/missing.jpg") == 1


@pytest.mark.parametrize(
    ("code", "status"), [(401, Status.FORBIDDEN), (403, Status.FORBIDDEN), (400, Status.HTTP_ERROR)]
)
def test_other_permanent_statuses_are_not_retried(http_server, code, status):
    http_server.put("/p.jpg", IMG)
    http_server.fault("/p.jpg", statuses=[code] * 5)
    assert _status(http_server.url_for("/p.jpg")).status is status
    assert http_server.hits("/p.jpg") == 1


def test_500_then_200_succeeds(http_server):
    http_server.put("/flaky.jpg", IMG)
    http_server.fault("/flaky.jpg", statuses=[500, 503])
    assert fetch_bytes(http_server.url_for("/flaky.jpg"), FAST) == IMG
    assert http_server.hits("/flaky.jpg") == 3


def test_429_is_retried(http_server):
    http_server.put("/busy.jpg", IMG)
    http_server.fault("/busy.jpg", statuses=[429], retry_after="0")
    assert fetch_bytes(http_server.url_for("/busy.jpg"), FAST) == IMG
    assert http_server.hits("/busy.jpg") == 2


def test_retries_are_bounded(http_server):
    http_server.put("/down.jpg", IMG)
    http_server.fault("/down.jpg", statuses=[502] * 10)
    err = _status(http_server.url_for("/down.jpg"))
    assert err.status is Status.HTTP_ERROR and "502" in err.message
    assert http_server.hits("/down.jpg") == FAST.retries + 1


def test_hung_server_times_out(http_server):
    http_server.put("/hang.jpg", IMG)
    http_server.fault("/hang.jpg", hang=30)
    policy = FetchPolicy(allow_private_networks=True, timeout=0.3, retries=1, backoff=0.01)
    err = _status(http_server.url_for("/hang.jpg"), policy)
    assert err.status is Status.TIMEOUT
    assert http_server.hits("/hang.jpg") == 2


def test_cut_body_is_retried_then_reported(http_server, fault_proxy):
    http_server.put("/cut.jpg", IMG)
    proxy = fault_proxy(http_server.url)
    proxy.push(Rule(cut_after=300))  # first connection dies mid-body, the retry is clean
    assert fetch_bytes(proxy.url + "/cut.jpg", FAST) == IMG
    always_cut = fault_proxy(http_server.url, default=Rule(cut_after=300))
    err = _status(
        always_cut.url + "/cut.jpg", FetchPolicy(allow_private_networks=True, timeout=2, retries=1, backoff=0.01)
    )
    assert err.status is Status.CONNECTION_ERROR
    assert always_cut.connections == 2


def test_refused_connection():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _status(
        f"http://127.0.0.1:{port}/x.jpg", FetchPolicy(allow_private_networks=True, timeout=1, retries=1, backoff=0.01)
    )
    assert err.status is Status.CONNECTION_ERROR


def test_too_large_by_content_length_and_by_body(http_server, tmp_path):
    http_server.put("/big.bin", b"x" * 5000)
    policy = FetchPolicy(allow_private_networks=True, max_bytes=4096)
    assert _status(http_server.url_for("/big.bin"), policy).status is Status.TOO_LARGE
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    assert _status(str(tmp_path / "big.bin"), policy).status is Status.TOO_LARGE
    fsspec.filesystem("memory").pipe("/fetch-test/big.bin", b"x" * 5000)
    assert _status("memory://fetch-test/big.bin", policy).status is Status.TOO_LARGE
    assert (
        fetch_bytes(http_server.url_for("/big.bin"), FetchPolicy(allow_private_networks=True, max_bytes=5000))
        == b"x" * 5000
    )


def test_disallowed_scheme_is_bad_url(http_server):
    assert _status("ftp://127.0.0.1/x.jpg").status is Status.BAD_URL
    assert _status("gopher://127.0.0.1/x").status is Status.BAD_URL
    http_only = FetchPolicy(allowed_schemes=("http",))
    assert _status("/etc/hostname", http_only).status is Status.BAD_URL
    assert _status("memory://x/y.jpg", http_only).status is Status.BAD_URL
    assert _status("http://", FAST).status is Status.BAD_URL


def test_local_paths_and_memory(tmp_path):
    (tmp_path / "a b.jpg").write_bytes(IMG)
    assert fetch_bytes(str(tmp_path / "a b.jpg"), FAST) == IMG
    assert fetch_bytes((tmp_path / "a b.jpg").as_uri(), FAST) == IMG
    assert _status(str(tmp_path / "nope.jpg")).status is Status.NOT_FOUND
    fsspec.filesystem("memory").pipe("/fetch-test/m.jpg", IMG)
    assert fetch_bytes("memory://fetch-test/m.jpg", FAST) == IMG
    assert _status("memory://fetch-test/none.jpg").status is Status.NOT_FOUND


def test_messages_never_carry_credentials(http_server):
    url = http_server.url.replace("http://", "http://alice:hunter2@") + "/gone.jpg?X-Amz-Signature=s3cr3t&v=1"
    err = _status(url)
    assert err.status is Status.NOT_FOUND
    assert "hunter2" not in err.message and "s3cr3t" not in err.message and "alice" not in err.message
    assert "/gone.jpg" in err.message


def test_redact_url():
    assert redact_url("https://u:p@h:8/a/b?token=abc&x=1") == "https://h:8/a/b?token=***&x=1"
    assert redact_url("s3://bucket/key") == "s3://bucket/key"


def test_retry_after_is_honoured_within_reason():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("86400") == RETRY_AFTER_CAP
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert parse_retry_after("soon") is None
    assert retry_delay(1, 0.01, retry_after=2.0) == 2.0
    assert retry_delay(1, 0.01, retry_after=1e9) <= RETRY_AFTER_CAP
    assert all(retry_delay(a, 0.1) <= 0.1 * 2 ** (a - 1) for a in range(1, 8))


def test_many_threads_share_the_pool_without_discarding(http_server, caplog):
    for i in range(64):
        http_server.put(f"/t/{i}.jpg", IMG)
    urls = [http_server.url_for(f"/t/{i % 64}.jpg") for i in range(512)]
    with caplog.at_level(logging.WARNING, logger="urllib3"):
        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(lambda u: fetch_bytes(u, FAST), urls))
    assert all(r == IMG for r in results)
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def _child_fetch(url: str, parent_pool_id: int, queue: "multiprocessing.Queue[tuple[bool, bool]]") -> None:
    ok = fetch_bytes(url, FAST) == IMG
    queue.put((ok, id(pool_manager()) != parent_pool_id))


def test_pool_is_recreated_after_fork(http_server):
    http_server.put("/f.jpg", IMG)
    url = http_server.url_for("/f.jpg")
    assert fetch_bytes(url, FAST) == IMG  # the parent's pool now holds a live connection
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_fetch, args=(url, id(pool_manager()), queue))
    proc.start()
    ok, fresh = queue.get(timeout=30)
    proc.join(timeout=30)
    assert ok and fresh
    assert fetch_bytes(url, FAST) == IMG  # the parent's connection was not disturbed


def test_timeout_bounds_a_slow_first_byte(http_server):
    http_server.put("/slow.jpg", IMG)
    http_server.fault("/slow.jpg", hang=30)
    start = time.monotonic()
    _status(http_server.url_for("/slow.jpg"), FetchPolicy(allow_private_networks=True, timeout=0.2, retries=0))
    assert time.monotonic() - start < 25  # bounded by the timeout, not by the 30 s hang


def test_chunked_body_is_capped_while_streaming(http_server):
    http_server.put("/chunked.bin", b"y" * 600_000)
    http_server.fault("/chunked.bin", chunked=True)
    url = http_server.url_for("/chunked.bin")
    assert fetch_bytes(url, FAST) == b"y" * 600_000
    assert _status(url, FetchPolicy(allow_private_networks=True, max_bytes=500_000)).status is Status.TOO_LARGE


def test_redirects_are_followed_and_bounded(http_server):
    http_server.put("/real.jpg", IMG)
    http_server.fault("/moved.jpg", redirect="/real.jpg")
    assert fetch_bytes(http_server.url_for("/moved.jpg"), FAST) == IMG
    http_server.fault("/loop.jpg", redirect="/loop.jpg")
    err = _status(http_server.url_for("/loop.jpg"))
    assert err.status is Status.HTTP_ERROR
    assert 1 < http_server.hits("/loop.jpg") <= 6
