"""Shared fixtures: a static/fault HTTP server, a fault-injecting TCP proxy, a moto S3 server.

    def test_x(http_server):                 # StaticServer serving tmp_path/"www" + put() objects
    def test_y(serve_dir):                   # serve_dir(path) -> started StaticServer for that folder
    def test_z(http_server, fault_proxy):    # fault_proxy(http_server.url, default=Rule(...))
    @pytest.mark.s3
    def test_s3(s3):                         # MotoServer, reset for this test; s3.storage_options()

All servers bind 127.0.0.1 on a free port and are stopped at teardown. The private-network guard
stays on: a test that fetches from them says so itself (`fetch.allow_private_networks: true` in its
config or `--set`, `FetchPolicy(allow_private_networks=True)`); no environment variable turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from convert.testing.http import StaticServer
from convert.testing.proxy import FaultProxy


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[StaticServer]:
    """A started StaticServer whose root is tmp_path/'www' (created empty)."""
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    with StaticServer(root=root) as srv:
        yield srv


@pytest.fixture
def serve_dir() -> Iterator[Callable[..., StaticServer]]:
    """Factory: serve_dir(root) -> a started StaticServer for that folder (stopped at teardown)."""
    servers: list[StaticServer] = []

    def make(root: str | Path | None = None, files: dict[str, bytes] | None = None) -> StaticServer:
        srv = StaticServer(root=root, files=files).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Factory: fault_proxy(upstream_url, default=Rule(...), policy=...) -> a started FaultProxy."""
    proxies: list[FaultProxy] = []

    def make(upstream: Any, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(upstream, **kwargs).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Any]:
    """One moto S3 server process for the session (skips if moto[server] is not installed)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from convert.testing.s3 import MotoServer

    with MotoServer() as server:
        yield server


@pytest.fixture
def s3(moto_server: Any) -> Any:
    """The session's MotoServer, emptied for this test; has a bucket named 'test-bucket'."""
    moto_server.reset()
    moto_server.make_bucket("test-bucket")
    return moto_server


HTTP_BACKENDS = ["curl", "urllib3"]


@pytest.fixture(params=HTTP_BACKENDS)
def http_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per HTTP fetch backend (the fetch contract suite): `fetch.backend: auto`
    resolves to this one, as it would with pycurl installed (curl) or not (urllib3)."""
    from convert.fetch import curl, policy

    if request.param == "curl" and not curl.AVAILABLE:
        if os.environ.get("CONVERT_REQUIRE_PYCURL"):
            pytest.fail("pycurl is not installed: pip install -e . installs it (a default dependency)")
        pytest.skip("pycurl not installed")
    monkeypatch.setattr(policy, "CURL_INSTALLED", request.param == "curl")  # policies made from now on
    return request.param


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process as the CLI ends its own (convert.cli_common.exit_now): Python's atexit
    handlers, logs and stdio flushed, then out without the C library's exit handlers. This process
    ran hundreds of in-process conversions, some failing on purpose mid-write; once, after every test
    had passed, it crashed while exiting (SIGSEGV, exit 139, in a fresh-clone CI run), where the C
    exit handlers (libhdf5's closes every handle still open) and interpreter finalisation run."""
    from convert.cli_common import WHOLE_PROCESS, exit_now

    WHOLE_PROCESS.append(True)
    exit_now(_EXIT_STATUS[-1] if _EXIT_STATUS else 0)
