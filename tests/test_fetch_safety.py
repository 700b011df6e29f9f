"""Fetching cannot be turned against the host, and every item ends by its deadline (issue 11: 2, 5).

Real servers on 127.0.0.1 (the static server, the fault proxy, a raw socket that never answers),
real FIFOs (os.mkfifo), real process_shard runs for the ledger statuses.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from convert.config import load_config
from convert.fetch import FetchPolicy, PrivateAddressError, PrivateNetworkRefused, fetch_bytes
from convert.fetch.netguard import is_public
from convert.sources import Workdir, plan_source
from convert.specs import ItemError, Status
from convert.testing import images as gen
from convert.testing.tasks import fetch_policy, run_shard

pytestmark = pytest.mark.usefixtures("http_backend")  # the contract suite: every case on every backend

JPEG = gen.jpeg_bytes(40, 30, seed=2)


def one_shard(listing: Path, entries: list[str], tmp_path: Path, **settings: object):
    """(spec, config) of a URL list holding `entries`, planned as one shard (the worker reads its rows)."""
    listing.write_text("".join(f"{e}\n" for e in entries))
    cfg = load_config(
        None, {"source.uri": str(listing), "output.uri": str(tmp_path / "out"), "image.size": 8, **settings}
    )
    (spec,) = plan_source(cfg.source, 10_000, Workdir(str(tmp_path / "work"))).specs
    return spec, cfg


def status(uri: str, policy: FetchPolicy) -> ItemError:
    with pytest.raises(ItemError) as info:
        fetch_bytes(uri, policy)
    return info.value


# ---------------------------------------------------------------- deadlines


@pytest.fixture
def trickle_server():
    """A raw HTTP server that sends its response one byte a second: from the status line on
    ("headers") or after the headers ("body")."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    stop = threading.Event()

    def handle(conn: socket.socket, path: str) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(JPEG)}\r\n\r\n".encode()
        slow = head + JPEG if "headers" in path else JPEG
        try:
            if "headers" not in path:
                conn.sendall(head)
            for i in range(len(slow)):
                if stop.wait(1.0):
                    break
                conn.sendall(slow[i : i + 1])
        except OSError:
            pass
        conn.close()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            path = conn.recv(4096).split(b" ")[1].decode()
            threading.Thread(target=handle, args=(conn, path), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    listener.close()


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_one_byte_per_second_server_ends_at_item_timeout(trickle_server, phase):
    policy = FetchPolicy(timeout=5, item_timeout=2.5, retries=3, backoff=0.01, allow_private_networks=True)
    start = time.monotonic()
    err = status(f"{trickle_server}/{phase}.jpg", policy)
    elapsed = time.monotonic() - start
    assert err.status is Status.TIMEOUT and "item_timeout" in err.message
    assert elapsed < 2.5 + 1.5, elapsed  # not fetch.timeout per read: the item's whole budget (+ slack for load)


@pytest.fixture
def silent_server():
    """Accepts connections and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for s in held:
        s.close()
    listener.close()


def test_server_that_never_answers_ends_within_item_timeout(silent_server):
    policy = FetchPolicy(timeout=1.0, item_timeout=2.5, retries=10, backoff=0.01, allow_private_networks=True)
    start = time.monotonic()
    err = status(silent_server + "/x.jpg", policy)
    assert err.status is Status.TIMEOUT
    assert time.monotonic() - start < 2.5 + 1.5  # 10 retries would take 11 s: the deadline wins


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_non_regular_files_are_refused_before_open(tmp_path, kind):
    path = tmp_path / "x.jpg"
    if kind == "fifo":
        os.mkfifo(path)  # open() of a FIFO with no writer blocks forever
    elif kind == "device":
        path = Path("/dev/zero")  # endless
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    start = time.monotonic()
    err = status(str(path), FetchPolicy())
    assert err.status is Status.BAD_URL and "not a regular file" in err.message
    assert time.monotonic() - start < 2.0  # an open() of the FIFO would block forever


def test_fifo_in_a_shard_becomes_a_ledger_status(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(JPEG)
    os.mkfifo(src / "x.jpg")
    spec, cfg = one_shard(src / "urls.txt", [str(src / "a.jpg"), str(src / "x.jpg")], tmp_path)
    record = run_shard(spec, cfg)
    assert [r.status for r in record.ledger] == [Status.OK, Status.BAD_URL]


def test_url_list_items_each_end_with_a_status_within_their_deadline(
    tmp_path, http_server, trickle_server, silent_server
):
    http_server.put("ok.jpg", JPEG)
    os.mkfifo(tmp_path / "fifo.jpg")
    entries = [
        f"{trickle_server}/headers.jpg",
        f"{silent_server}/n.jpg",
        str(tmp_path / "fifo.jpg"),
        f"{http_server.url}/ok.jpg",
    ]
    spec, cfg = one_shard(
        tmp_path / "urls.txt",
        entries,
        tmp_path,
        **{"fetch.item_timeout": 2.0, "fetch.timeout": 5, "fetch.allow_private_networks": True},
    )
    start = time.monotonic()
    record = run_shard(spec, cfg)
    assert [r.status for r in record.ledger] == [Status.TIMEOUT, Status.TIMEOUT, Status.BAD_URL, Status.OK]
    # until a first item's size is known the prefetch runs one fetch at a time, so the two hung items
    # may run back to back: each within its own 2 s deadline
    assert time.monotonic() - start < 2 * 2.0 + 3.0  # without deadlines: half an hour


# ---------------------------------------------------------------- private networks


@pytest.mark.parametrize(
    "address,public",
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("172.16.5.4", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("2002:7f00:1::", False),
        ("ff02::1", False),
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
    ],
)
def test_address_classification(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.1", "localhost", "[::ffff:127.0.0.1]"]
)
def test_loopback_in_every_spelling_is_refused_by_default(http_server, host):
    http_server.put("a.jpg", JPEG)
    port = http_server.url.rsplit(":", 1)[1]
    err = status(f"http://{host}:{port}/a.jpg", FetchPolicy())
    assert err.status is Status.BAD_URL and isinstance(err, PrivateAddressError)
    assert "fetch.allow_private_networks" in err.message
    assert http_server.hits("a.jpg") == 0  # refused before any request was sent


def test_opt_in_allows_loopback(http_server):
    http_server.put("a.jpg", JPEG)
    assert fetch_bytes(http_server.url_for("a.jpg"), FetchPolicy(allow_private_networks=True)) == JPEG


def test_redirect_to_a_private_address_is_refused(http_server, serve_dir):
    """127.0.0.1 is exempted (allowed_networks); its redirect to 127.0.0.2 is checked and refused."""
    other = serve_dir(files={"b.jpg": JPEG})
    port = other.url.rsplit(":", 1)[1]
    http_server.put("a.jpg", JPEG)
    http_server.fault("a.jpg", redirect=f"http://127.0.0.2:{port}/b.jpg")
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",))
    err = status(http_server.url_for("a.jpg"), policy)
    assert isinstance(err, PrivateAddressError) and "127.0.0.2" in err.message
    assert http_server.hits("a.jpg") == 1 and other.hits("b.jpg") == 0
    http_server.put("c.jpg", JPEG)
    http_server.fault("c.jpg", redirect=other.url_for("b.jpg"))  # to the exempt 127.0.0.1: followed
    assert fetch_bytes(http_server.url_for("c.jpg"), policy) == JPEG and other.hits("b.jpg") == 1


def test_shard_whose_first_items_are_refused_stops_with_one_line(tmp_path, http_server):
    http_server.put("a.jpg", JPEG)
    spec, cfg = one_shard(
        tmp_path / "urls.txt", [http_server.url_for("a.jpg")] * 10, tmp_path, **{"fetch.allow_private_networks": False}
    )  # the suite opts in (conftest); not here
    with pytest.raises(PrivateNetworkRefused) as info:
        run_shard(spec, cfg)
    msg = str(info.value)
    assert "\n" not in msg and "fetch.allow_private_networks" in msg
    assert not (tmp_path / "out" / "shards" / "shard-00000.h5").exists()


# ---------------------------------------------------------------- schemes and local paths


def _policy_for(listing: str, **source) -> FetchPolicy:
    cfg = load_config(
        None, {"source.uri": listing, "output.uri": "/tmp/unused", **{f"source.{k}": v for k, v in source.items()}}
    )
    return fetch_policy(cfg, "urls")


def test_local_list_reads_only_under_its_directory_or_allowed_roots(tmp_path):
    lists, other = tmp_path / "lists", tmp_path / "other"
    (lists / "sub").mkdir(parents=True)
    other.mkdir()
    (lists / "sub" / "in.jpg").write_bytes(JPEG)
    (other / "out.jpg").write_bytes(JPEG)
    (lists / "link.jpg").symlink_to(other / "out.jpg")
    policy = _policy_for(str(lists / "urls.txt"))
    assert fetch_bytes(str(lists / "sub" / "in.jpg"), policy) == JPEG
    assert fetch_bytes("file://" + str(lists / "sub" / "in.jpg"), policy) == JPEG
    for uri in (
        str(other / "out.jpg"),
        str(lists / "sub" / ".." / ".." / "other" / "out.jpg"),
        str(lists / "link.jpg"),
        "/etc/passwd",
        "file:///etc/passwd",
    ):
        err = status(uri, policy)
        assert err.status is Status.BAD_URL and "source.allowed_roots" in err.message, uri
    widened = _policy_for(str(lists / "urls.txt"), allowed_roots=[str(other)])
    assert fetch_bytes(str(other / "out.jpg"), widened) == JPEG


def test_remote_list_may_not_name_local_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(JPEG)
    policy = _policy_for("https://example.com/lists/urls.txt")
    for uri in (str(tmp_path / "a.jpg"), "file://" + str(tmp_path / "a.jpg"), "file:/etc/passwd"):
        err = status(uri, policy)
        assert err.status is Status.BAD_URL and "remote URL list" in err.message


def test_data_urls_are_their_own_scheme_and_off_by_default():
    uri = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()
    err = status(uri, FetchPolicy())
    assert err.status is Status.BAD_URL and "'data'" in err.message and len(err.message) < 200
    assert fetch_bytes(uri, FetchPolicy(allowed_schemes=("data",))) == JPEG


def test_errors_never_quote_file_contents(tmp_path):
    secret = tmp_path / "shadow.jpg"
    secret.write_bytes(b"root:*:19000:0:99999:7:::\n")
    spec, cfg = one_shard(tmp_path / "urls.txt", [str(secret)], tmp_path)
    record = run_shard(spec, cfg)
    (row,) = record.ledger
    assert row.status is Status.DECODE_ERROR and "root" not in row.error and "19000" not in row.error


def test_private_networks_are_refused_by_default_and_no_environment_variable_turns_the_guard_off(monkeypatch):
    base = {"source.uri": "x.txt", "output.uri": "/tmp/unused"}
    monkeypatch.setenv("CONVERT_ALLOW_PRIVATE_NETWORKS", "1")  # read by older versions: no longer
    assert load_config(None, base).fetch.allow_private_networks is False  # refused unless the config asks
    assert load_config(None, {**base, "fetch.allow_private_networks": True}).fetch.allow_private_networks is True


def test_run_on_a_list_of_private_hosts_stops_early_with_one_line(tmp_path, http_server):
    """The whole run (a real CLI process) stops with exit 2 and one line naming the setting, instead of
    failing every item of every shard one by one; nothing is committed."""
    import subprocess
    import sys

    http_server.put("a.jpg", JPEG)
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join([http_server.url_for("a.jpg")] * 40) + "\n")
    env = dict(os.environ)  # not opted in: the guard is on unless the config says otherwise
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "convert",
            "run",
            "--source",
            str(listing),
            "--output",
            str(tmp_path / "out"),
            "--shard-size",
            "10",
            "--workers",
            "1",
            "--size",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "fetch.allow_private_networks" in errors[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not list((tmp_path / "out" / "shards").glob("shard-*.h5"))
