"""open_resilient: byte-exact reads through cuts, resets, stalls, ignored ranges; pinning; budgets."""

from __future__ import annotations

import hashlib
import io
import os

import fsspec
import pytest

from convert.fetch import (
    FetchPolicy,
    HTTPForbidden,
    HTTPNotFound,
    ObjectChanged,
    ResumeExhausted,
    fetch_bytes,
    is_transient,
    open_resilient,
)
from convert.fetch.prefetch import THREAD_PREFIX
from convert.specs import ItemError, Status
from convert.testing.proxy import Rule

MB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def blob8() -> bytes:
    return os.urandom(8 * MB)


@pytest.fixture(scope="module")
def blob64() -> bytes:
    return os.urandom(64 * MB)


def test_cut_every_mb_on_64mb_with_default_budget(http_server, fault_proxy, blob64):
    http_server.put("/big.bin", blob64)
    proxy = fault_proxy(http_server.url, default=Rule(cut_after=MB))
    with open_resilient(proxy.url + "/big.bin") as f:  # defaults: the budget counts only stalls
        digest = hashlib.sha256()
        for chunk in f:
            digest.update(chunk)
        assert f.resumes >= 63
    assert digest.hexdigest() == sha(blob64)


def test_resets_are_resumed(http_server, fault_proxy, blob8):
    http_server.put("/r.bin", blob8)
    proxy = fault_proxy(http_server.url)
    proxy.push(
        Rule(reset=True), Rule(cut_after=2 * MB, reset=True), Rule(reset=True), Rule(cut_after=5 * MB, reset=True)
    )
    with open_resilient(proxy.url + "/r.bin", backoff=0.01) as f:
        assert sha(f.read()) == sha(blob8)
        assert f.resumes == 4


def test_stall_hits_read_timeout_and_resumes(http_server, fault_proxy, blob8):
    http_server.put("/s.bin", blob8)
    proxy = fault_proxy(http_server.url)
    proxy.push(Rule(stall_after=3 * MB))
    with open_resilient(proxy.url + "/s.bin", timeout=0.5, backoff=0.01) as f:
        assert sha(f.read()) == sha(blob8)
        assert f.resumes >= 1


def test_server_ignoring_range_is_handled_without_duplicates(http_server, fault_proxy, blob8):
    http_server.put("/i.bin", blob8)
    http_server.fault("/i.bin", ignore_range=True)
    proxy = fault_proxy(http_server.url)
    proxy.push(Rule(cut_after=3 * MB), Rule(cut_after=6 * MB))
    with open_resilient(proxy.url + "/i.bin", backoff=0.01) as f:
        assert sha(f.read()) == sha(blob8)
        assert f.range_ignored and f.resumes == 2
        f.seek(5 * MB + 7)
        assert f.read(100) == blob8[5 * MB + 7 : 5 * MB + 107]


def test_budget_exhaustion_carries_cause_url_and_offset(http_server, fault_proxy, blob8):
    http_server.put("/x.bin", blob8)
    proxy = fault_proxy(http_server.url, default=Rule(reset=True))
    proxy.push(Rule(cut_after=2 * MB))  # some progress first, then every re-open is reset
    f = open_resilient(proxy.url + "/x.bin", max_stalled_resumes=2, backoff=0.01)
    with pytest.raises(ResumeExhausted) as info:
        f.read()
    err = info.value
    assert err.__cause__ is err.cause and is_transient(err.cause)
    assert "/x.bin" in str(err) and err.url.endswith("/x.bin")
    assert 0 < err.offset < 2 * MB and f"byte {err.offset}" in str(err)
    assert proxy.connections == 1 + 3  # the first read, then 2 allowed stalled resumes + the last try


def test_total_resume_cap(http_server, fault_proxy, blob8):
    http_server.put("/c.bin", blob8)
    proxy = fault_proxy(http_server.url, default=Rule(cut_after=MB))
    with pytest.raises(ResumeExhausted) as info:
        open_resilient(proxy.url + "/c.bin", max_resumes=3).read()
    assert info.value.resumes == 3


def test_object_replaced_mid_read_raises_instead_of_splicing(http_server, blob8):
    http_server.put("/v.bin", blob8)
    http_server.fault("/v.bin", replace_after=3 * MB, replacement=os.urandom(8 * MB))
    f = open_resilient(http_server.url_for("/v.bin"), backoff=0.01)
    with pytest.raises(ObjectChanged, match="changed"):
        f.read()
    assert http_server.hits("/v.bin") == 2  # no blind retries after the change is seen


def test_permanent_errors_fail_at_open(http_server):
    with pytest.raises(HTTPNotFound, match="/nope.bin"):
        open_resilient(http_server.url_for("/nope.bin"))
    assert http_server.hits("/nope.bin") == 1
    http_server.put("/secret.bin", b"x")
    http_server.fault("/secret.bin", statuses=[403] * 3)
    with pytest.raises(HTTPForbidden):
        open_resilient(http_server.url_for("/secret.bin"))
    assert isinstance(HTTPNotFound(404, "u"), FileNotFoundError)


def test_5xx_at_open_is_retried(http_server, blob8):
    http_server.put("/f.bin", blob8)
    http_server.fault("/f.bin", statuses=[503, 500], retry_after="0")
    with open_resilient(http_server.url_for("/f.bin"), backoff=0.01) as f:
        assert f.read() == blob8


def test_file_api(http_server, blob8):
    http_server.put("/api.bin", blob8)
    with open_resilient(http_server.url_for("/api.bin"), chunk_size=MB) as f:
        assert isinstance(f, io.BufferedIOBase) and f.readable() and f.seekable()
        assert f.read(10) == blob8[:10] and f.tell() == 10
        buf = bytearray(MB + 5)
        assert f.readinto(buf) == len(buf) and bytes(buf) == blob8[10 : 10 + len(buf)]
        assert f.seek(-4, io.SEEK_END) == len(blob8) - 4
        assert f.read() == blob8[-4:] and f.read() == b""
        f.seek(100)
        f.seek(50, io.SEEK_CUR)
        assert f.read(5) == blob8[150:155]
        assert f.size == len(blob8)
    with pytest.raises(ValueError):
        f.read()


@pytest.mark.parametrize("readahead", [0, 4])
def test_readahead_through_cuts(http_server, fault_proxy, blob8, readahead):
    http_server.put("/ra.bin", blob8)
    proxy = fault_proxy(http_server.url, default=Rule(cut_after=MB))
    opts = dict(readahead=readahead, readahead_block=2 * MB, readahead_bytes=6 * MB, backoff=0.01)
    with open_resilient(proxy.url + "/ra.bin", **opts) as f:
        head = f.read(3 * MB)
        f.seek(5 * MB)
        tail = f.read()
        f.seek(3 * MB)
        middle = f.read(2 * MB)
    assert head + middle + tail == blob8
    assert not [t for t in __import__("threading").enumerate() if t.name.startswith(THREAD_PREFIX)]


def test_fsspec_backends_and_change_detection(tmp_path, blob8):
    path = tmp_path / "local.bin"
    path.write_bytes(blob8)
    for url in (str(path), path.as_uri()):
        with open_resilient(url) as f:
            assert sha(f.read()) == sha(blob8)
    mem = fsspec.filesystem("memory")
    mem.pipe("/resilient/m.bin", blob8)
    f = open_resilient("memory://resilient/m.bin", chunk_size=MB)
    assert f.read(MB) == blob8[:MB]
    mem.pipe("/resilient/m.bin", os.urandom(8 * MB))
    with pytest.raises(ObjectChanged):
        f.read()
    with pytest.raises(FileNotFoundError):
        open_resilient("memory://resilient/absent.bin")


# -- S3 (moto server in a separate process, through the fault proxy) ------------------------


def _put(s3, key: str, data: bytes) -> str:
    s3.filesystem().pipe(f"test-bucket/{key}", data)
    return f"s3://test-bucket/{key}"


@pytest.mark.s3
def test_s3_cut_every_mb(s3, fault_proxy, blob8):
    url = _put(s3, "cut.bin", blob8)
    proxy = fault_proxy(s3.endpoint_url, default=Rule(cut_after=MB))
    with open_resilient(url, s3.storage_options(proxy.url), backoff=0.01) as f:
        assert sha(f.read()) == sha(blob8)
        assert f.resumes >= 7


@pytest.mark.s3
@pytest.mark.slow
def test_s3_cut_every_mb_64mb(s3, fault_proxy, blob64):
    url = _put(s3, "big.bin", blob64)
    proxy = fault_proxy(s3.endpoint_url, default=Rule(cut_after=MB))
    with open_resilient(url, s3.storage_options(proxy.url)) as f:
        assert sha(f.read()) == sha(blob64)


@pytest.mark.s3
def test_s3_stall_and_reset(s3, fault_proxy, blob8):
    url = _put(s3, "stall.bin", blob8)
    proxy = fault_proxy(s3.endpoint_url)
    proxy.push(Rule(stall_after=2 * MB), Rule(cut_after=MB, reset=True))
    with open_resilient(url, s3.storage_options(proxy.url, timeout=5), timeout=1.0, backoff=0.01) as f:
        assert sha(f.read()) == sha(blob8)
        assert f.resumes >= 2  # the stall and the reset (a slow moto reply under load may add one)


@pytest.mark.s3
def test_s3_object_replaced_mid_read(s3, blob8):
    url = _put(s3, "v.bin", blob8)
    f = open_resilient(url, s3.storage_options(), chunk_size=MB)
    assert f.read(MB) == blob8[:MB]
    f.seek(2 * MB)  # forces a re-open, pinned with IfMatch
    _put(s3, "v.bin", os.urandom(8 * MB))
    with pytest.raises(ObjectChanged):
        f.read()


@pytest.mark.s3
def test_s3_missing_key_or_bucket_fails_at_once(s3):
    with pytest.raises(FileNotFoundError):
        open_resilient("s3://test-bucket/absent.bin", s3.storage_options(), backoff=5)
    with pytest.raises(FileNotFoundError):
        open_resilient("s3://no-such-bucket/k.bin", s3.storage_options(), backoff=5)


@pytest.mark.s3
def test_s3_fetch_bytes(s3):
    url = _put(s3, "img.jpg", b"jpeg-bytes")
    policy = FetchPolicy(storage_options=s3.storage_options(), backoff=5)
    assert fetch_bytes(url, policy) == b"jpeg-bytes"
    with pytest.raises(ItemError) as info:
        fetch_bytes("s3://test-bucket/gone.jpg", policy)
    assert info.value.status is Status.NOT_FOUND and "s3://test-bucket/gone.jpg" in info.value.message
    with pytest.raises(ItemError) as info:
        fetch_bytes(url, FetchPolicy(storage_options=s3.storage_options(), max_bytes=4))
    assert info.value.status is Status.TOO_LARGE


@pytest.mark.s3
def test_slowdown_code_is_transient():
    from botocore.exceptions import ClientError

    slow = ClientError({"Error": {"Code": "SlowDown", "Message": "reduce your request rate"}}, "GetObject")
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetObject")
    assert is_transient(slow) and not is_transient(denied)


def test_chunked_response_of_unknown_size_resumes(http_server, fault_proxy, blob8):
    http_server.put("/ch.bin", blob8)
    http_server.fault("/ch.bin", chunked=True)
    proxy = fault_proxy(http_server.url)
    proxy.push(Rule(cut_after=3 * MB))
    with open_resilient(proxy.url + "/ch.bin", backoff=0.01) as f:
        assert f.size is None  # no Content-Length on the first response
        assert sha(f.read()) == sha(blob8)
        assert f.resumes == 1 and f.size == len(blob8)  # learnt from the resumed 206
