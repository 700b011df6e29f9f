"""A raw-socket HTTP test server for odd HTTP: each request's head is recorded and answered by a
function that writes whatever bytes it likes (loopback only).

    with raw_servers() as make:
        srv = make(reply(ok(b"body", b"X-Robots-Tag: noai\\r\\n")))
        fetch_bytes(srv.url + "/a.jpg", policy)
        assert srv.heads[0].startswith(b"GET /a.jpg")
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator


class RawServer:
    """A listener on `host` answering each request with `respond(conn, head)`; heads are kept."""

    def __init__(self, respond: Callable[[socket.socket, bytes], None], host: str = "127.0.0.1") -> None:
        self.respond, self.heads, self.conns = respond, [], 0
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        return
                    head += data
                self.heads.append(head)
                if self.respond(conn, head) is not True:  # True: keep the connection for another request
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def lines(self) -> list[str]:
        return [h.split(b"\r\n", 1)[0].decode("latin-1") for h in self.heads]

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def raw_servers() -> Iterator[Callable[..., RawServer]]:
    """Factory: make(respond, host="127.0.0.1") -> a started RawServer; all closed on exit."""
    servers: list[RawServer] = []

    def make(respond: Callable[[socket.socket, bytes], object], host: str = "127.0.0.1") -> RawServer:
        servers.append(RawServer(respond, host))
        return servers[-1]

    try:
        yield make
    finally:
        for s in servers:
            s.close()


def reply(raw: bytes, keep: bool = False) -> Callable[[socket.socket, bytes], bool]:
    """A responder sending `raw` to every request (`keep`: leave the connection open for more)."""

    def respond(conn: socket.socket, head: bytes) -> bool:
        conn.sendall(raw)
        return keep

    return respond


def ok(body: bytes, extra: bytes = b"") -> bytes:
    """A 200 response with Content-Length, the `extra` header lines (each ending in CRLF) and `body`."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
