"""A moto S3 server in a separate process on 127.0.0.1 at a free port, for tests and benchmarks.

    with MotoServer() as moto:
        opts = moto.storage_options()          # s3fs options pointing at it
        moto.make_bucket("data")
        ...
        moto.reset()                           # wipe all buckets between tests

The child binds port 0 itself and reports the port on stdout (no free-port race); it exits
when its stdin closes, so it cannot outlive the test process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import urllib3

_CHILD = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""

REGION = "us-east-1"
KEY = "testing"  # moto accepts any credentials; these never leave the loopback interface
SECRET = "testing"


class MotoServer:
    """Start/stop/reset a moto S3 server subprocess; build s3fs storage options for it."""

    def __init__(self, start_timeout: float = 60.0) -> None:
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        assert self.port, "start() first"
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION=REGION)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self._proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(self.start_timeout)
        if not line or not line[0].strip().isdigit():
            self.stop()
            raise RuntimeError(f"moto server did not report a port within {self.start_timeout}s")
        self.port = int(line[0])
        return self

    def reset(self) -> None:
        """Delete every bucket and object (moto's reset API) and forget s3fs's cached listings."""
        urllib3.request("POST", f"{self.endpoint_url}/moto-api/reset", timeout=10.0, retries=False)
        try:
            import s3fs

            for fs in list(s3fs.S3FileSystem._cache.values()):  # keep clients (slow to build), drop listings
                fs.invalidate_cache()
        except ImportError:  # pragma: no cover
            pass

    def storage_options(self, endpoint_url: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """s3fs options for this server (or for `endpoint_url`, e.g. a FaultProxy in front of it)."""
        return {
            "key": KEY,
            "secret": SECRET,
            "client_kwargs": {"endpoint_url": endpoint_url or self.endpoint_url, "region_name": REGION},
            "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}},
        }

    def filesystem(self, endpoint_url: str | None = None) -> Any:
        """An s3fs filesystem for this server."""
        import fsspec

        return fsspec.filesystem("s3", **self.storage_options(endpoint_url))

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent); returns "s3://name"."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.call_s3("create_bucket", Bucket=name)  # fs.mkdir sends a LocationConstraint us-east-1 rejects
            fs.invalidate_cache()
        return f"s3://{name}"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
