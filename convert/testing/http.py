"""A static HTTP/1.1 test server with Range, ETag and scripted per-path faults (loopback only).

    with StaticServer(root=tmp_path) as srv:
        srv.put("/big.bin", data)
        srv.fault("/big.bin", statuses=[500, 200])
        url = srv.url_for("/big.bin")
        ...
        assert srv.hits("/big.bin") == 2

Run `python -m convert.testing.http DIR` to serve DIR from another process (prints the URL,
serves until stdin closes) - benchmarks use it so server CPU is not counted as client CPU.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import selectors
import socket
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_WRITE_CHUNK = 256 * 1024
MAX_HANG = 60.0  # seconds: a hung response is released by stop() or after this, whichever is first


@dataclass
class Fault:
    """Scripted misbehaviour for one path.

    statuses: consumed one per request; 200 means "serve normally" (e.g. [500, 500, 200]).
    retry_after: Retry-After header sent with error statuses.
    hang: seconds to wait before answering (then the connection is closed without a response).
    cut_after: close the connection after this many body bytes of every response.
    ignore_range: answer Range requests with the full body (200).
    chunked: send the body with Transfer-Encoding: chunked and no Content-Length.
    redirect: answer 302 with this Location.
    replace_after / replacement: once this many body bytes have been sent, the object's content
    (and ETag) becomes `replacement` and the current response is cut.
    """

    statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None
    hang: float = 0.0
    cut_after: int | None = None
    ignore_range: bool = False
    chunked: bool = False
    redirect: str | None = None
    replace_after: int | None = None
    replacement: bytes | None = None


@dataclass
class _Object:
    data: Any  # bytes, or a read-only mmap of a file under root
    etag: str


def _etag(data: bytes) -> str:
    return '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid the 40 ms delayed-ACK stall
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        fault, status = owner._on_request(path)
        if fault.hang:
            owner._stopping.wait(min(fault.hang, MAX_HANG))
            self.close_connection = True
            return
        if fault.redirect is not None:
            return self._error(302, extra={"Location": fault.redirect})
        if status != 200:
            return self._error(status, fault.retry_after)
        obj = owner._lookup(path)
        if obj is None:
            return self._error(404)
        if_match = self.headers.get("If-Match")
        if if_match and if_match.strip() != "*" and obj.etag not in [t.strip() for t in if_match.split(",")]:
            return self._error(412)
        start, end = 0, len(obj.data)
        rng = self.headers.get("Range")
        partial = bool(rng) and not fault.ignore_range
        if partial:
            parsed = _parse_range(rng or "", len(obj.data))
            if parsed is None:
                return self._error(416, extra={"Content-Range": f"bytes */{len(obj.data)}"})
            start, end = parsed
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", "application/octet-stream")
        if fault.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", obj.etag)
        self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(obj.data)}")
        self.end_headers()
        if body:
            self._write_body(path, obj, start, end, fault)

    def _write_body(self, path: str, obj: _Object, start: int, end: int, fault: Fault) -> None:
        view = memoryview(obj.data)[start:end]
        limit = len(view)
        if fault.cut_after is not None:
            limit = min(limit, fault.cut_after)
        replace = fault.replace_after is not None and fault.replacement is not None
        if replace:
            limit = min(limit, fault.replace_after or 0)
        try:
            for pos in range(0, limit, _WRITE_CHUNK):
                piece = view[pos : min(pos + _WRITE_CHUNK, limit)]
                if fault.chunked:
                    self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                else:
                    self.wfile.write(piece)
            if fault.chunked and limit == len(view):
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
            return
        if limit < len(view):
            if replace:
                self.server.owner._replace(path, fault)
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

    def _error(self, status: int, retry_after: str | None = None, extra: dict[str, str] | None = None) -> None:
        body = f"error {status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=a-b` / `bytes=a-` / `bytes=-n` range, None if unsatisfiable."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        n = int(m.group(2))
        return (max(size - n, 0), size) if n > 0 and size > 0 else None
    start = int(m.group(1))
    end = min(int(m.group(2)) + 1, size) if m.group(2) else size
    return (start, end) if start < size and start < end else None


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's default of 5 drops SYNs under a burst of connections
    daemon_threads = True
    block_on_close = False
    owner: "StaticServer"

    def process_request(self, request: Any, client_address: Any) -> None:
        self.owner._track(request, True)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.owner._track(request, False)
        super().shutdown_request(request)


class StaticServer:
    """Serves files under `root` and objects added with `put`, on 127.0.0.1 at a free port."""

    def __init__(
        self, root: str | Path | None = None, files: dict[str, bytes] | None = None, hosts: tuple[str, ...] = ()
    ) -> None:
        self.root = Path(root) if root is not None else None
        self.hosts = hosts  # more loopback addresses served on the same port (e.g. 127.0.3.7), see urls()
        self._lock = threading.Lock()
        self._objects: dict[str, _Object] = {}
        self._faults: dict[str, Fault] = {}
        self._hits: Counter[str] = Counter()
        self._sockets: set[Any] = set()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._extra: list[socket.socket] = []
        for path, data in (files or {}).items():
            self.put(path, data)

    # -- content and faults -------------------------------------------------------------
    def put(self, path: str, data: bytes) -> str:
        """Serve `data` at `path` (replacing any previous content); returns its URL."""
        path = "/" + path.lstrip("/")
        with self._lock:
            self._objects[path] = _Object(bytes(data), _etag(data))
        return self.url_for(path) if self._httpd else path

    def fault(self, path: str, **kwargs: Any) -> Fault:
        """Set (replace) the Fault for `path`; see Fault for the keywords."""
        f = Fault(**kwargs)
        if f.statuses:
            f.statuses = list(f.statuses)
        with self._lock:
            self._faults["/" + path.lstrip("/")] = f
        return f

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def hits(self, path: str) -> int:
        """Requests received for `path` so far."""
        with self._lock:
            return self._hits["/" + path.lstrip("/")]

    def _on_request(self, path: str) -> tuple[Fault, int]:
        with self._lock:
            self._hits[path] += 1
            fault = self._faults.get(path) or Fault()
            status = fault.statuses.pop(0) if fault.statuses else 200
            return fault, status

    def _lookup(self, path: str) -> _Object | None:
        with self._lock:
            obj = self._objects.get(path)
        if obj is not None or self.root is None:
            return obj
        file = (self.root / path.lstrip("/")).resolve()
        if not file.is_file() or not file.is_relative_to(self.root.resolve()):
            return None
        with open(file, "rb") as f:
            st = os.fstat(f.fileno())
            # mmap: a ranged request on a big file touches only the pages it sends
            data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
        return _Object(data, f'"{st.st_size:x}-{st.st_mtime_ns:x}"')

    def _replace(self, path: str, fault: Fault) -> None:
        """One-shot content swap for Fault.replace_after."""
        with self._lock:
            if fault.replace_after is None or fault.replacement is None:
                return
            data, fault.replace_after = fault.replacement, None
            self._objects[path] = _Object(data, _etag(data))

    def _track(self, sock: Any, opened: bool) -> None:
        with self._lock:
            (self._sockets.add if opened else self._sockets.discard)(sock)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url_for(self, path: str) -> str:
        return self.url + "/" + path.lstrip("/")

    def urls(self) -> list[str]:
        """The base URL on 127.0.0.1 and on each of `hosts`, same port (one "site" per address)."""
        port = self.url.rsplit(":", 1)[1]
        return [self.url] + [f"http://{host}:{port}" for host in self.hosts]

    def start(self) -> "StaticServer":
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="static-http", daemon=True
        )
        self._thread.start()
        if self.hosts:
            self._listen_on_hosts()
        return self

    def _listen_on_hosts(self) -> None:
        """Accept on each extra address with one selector thread; requests run as on the main one."""
        assert self._httpd is not None
        port = self._httpd.server_address[1]
        selector = selectors.DefaultSelector()
        for host in self.hosts:
            sock = socket.create_server((host, port), backlog=128)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            self._extra.append(sock)

        def accept() -> None:
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=0.05):
                    try:
                        conn, addr = key.fileobj.accept()  # type: ignore[union-attr]
                    except OSError:
                        continue
                    conn.setblocking(True)
                    if self._httpd is not None:
                        self._httpd.process_request(conn, addr)
            selector.close()

        threading.Thread(target=accept, name="static-http-hosts", daemon=True).start()

    def stop(self) -> None:
        """Stop serving, release hung responses and close kept-alive connections."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        for sock in self._extra:
            sock.close()
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None

    def __enter__(self) -> "StaticServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def loopback_hosts(count: int) -> tuple[str, ...]:
    """`count` distinct loopback addresses other than 127.0.0.1: 127.0.1.1, 127.0.1.2, ..."""
    return tuple(f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(count))


def main(argv: list[str] | None = None) -> None:
    """Serve a directory from a separate process until stdin closes (`DIR [HOSTS]`: HOSTS more
    loopback addresses on the same port, see loopback_hosts)."""
    args = sys.argv[1:] if argv is None else argv
    hosts = loopback_hosts(int(args[1])) if len(args) > 1 else ()
    with StaticServer(root=args[0] if args else ".", hosts=hosts) as srv:
        print(srv.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
