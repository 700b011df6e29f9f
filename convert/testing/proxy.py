"""A fault-injecting TCP proxy on 127.0.0.1 for tests: cuts, resets, stalls and latency.

    with FaultProxy(server.url, default=Rule(cut_after=1 << 20)) as proxy:
        url = proxy.url + "/big.bin"      # every connection is cut after 1 MiB of response

Rules apply per accepted connection: queued rules (`push`) are used first, one per connection,
then a `policy(index) -> Rule` callable if given, else the default rule. It works below HTTP,
so it sits equally in front of the static test server or moto's S3 server.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

_BUF = 256 * 1024


@dataclass(frozen=True)
class Rule:
    """What to do to one connection (byte counts are of the upstream->client direction)."""

    cut_after: int | None = None  # close the connection after this many response bytes
    reset: bool = False  # cut with a TCP RST (SO_LINGER 0) instead of a FIN; with cut_after None: at once
    stall_after: int | None = None  # stop forwarding after this many bytes; hold the connection open
    latency: float = 0.0  # seconds added before each client->upstream chunk (one per request)
    rate: float | None = None  # bytes/s cap on the response direction of this connection


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket, rule: Rule) -> None:
        self.client, self.upstream, self.rule = client, upstream, rule
        self.closed = threading.Event()

    def close(self, reset: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.upstream):
            try:
                if reset and s is self.client:
                    # linger 0 makes close() send RST; SHUT_RD (no FIN on Linux) wakes a blocked
                    # recv() in the other pump thread, which otherwise keeps the socket alive
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RD)
                else:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class FaultProxy:
    """TCP proxy to `upstream` ("http://host:port" or (host, port)) with per-connection Rules."""

    def __init__(
        self,
        upstream: str | tuple[str, int],
        default: Rule | None = None,
        policy: Callable[[int], Rule] | None = None,
    ) -> None:
        if isinstance(upstream, str):
            parts = urlsplit(upstream)
            upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.upstream = upstream
        self.default = default or Rule()
        self.policy = policy
        self.connections = 0  # accepted so far
        self._queue: deque[Rule] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list[_Conn] = []
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    def push(self, *rules: Rule) -> None:
        """Queue rules for the next connections, one each, before the policy/default applies."""
        with self._lock:
            self._queue.extend(rules)

    def set_default(self, rule: Rule) -> None:
        with self._lock:
            self.default = rule

    def _rule(self, index: int) -> Rule:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            default = self.default
        return self.policy(index) if self.policy is not None else default

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() first"
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed by stop()
            index = self.connections
            self.connections += 1
            rule = self._rule(index)
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, upstream, rule)
            with self._lock:
                self._conns = [c for c in self._conns if not c.closed.is_set()] + [conn]
            if rule.reset and rule.cut_after is None:
                conn.close(reset=True)
                continue
            self._spawn(self._requests, "proxy-up", conn)
            self._spawn(self._responses, "proxy-down", conn)

    def _requests(self, conn: _Conn) -> None:
        """client -> upstream, with the rule's latency before each chunk."""
        try:
            while True:
                data = conn.client.recv(_BUF)
                if not data:
                    break
                if conn.rule.latency and self._stop.wait(conn.rule.latency):
                    break
                conn.upstream.sendall(data)
        except OSError:
            pass
        conn.close()

    def _responses(self, conn: _Conn) -> None:
        """upstream -> client, applying cut/stall."""
        rule, sent = conn.rule, 0
        try:
            while True:
                data = conn.upstream.recv(_BUF)
                if not data:
                    break
                for limit in (rule.stall_after, rule.cut_after):
                    if limit is not None and sent + len(data) >= limit:
                        conn.client.sendall(data[: max(limit - sent, 0)])
                        if limit == rule.stall_after:
                            conn.closed.wait()  # until the client gives up or the proxy stops
                        conn.close(reset=rule.reset)
                        return
                conn.client.sendall(data)
                sent += len(data)
                if rule.rate and self._stop.wait(len(data) / rule.rate):
                    break
        except OSError:
            pass
        conn.close()

    def stop(self) -> None:
        """Close the listener and every connection; join the threads."""
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            c.close()
        for t in threads:
            t.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """`python -m convert.testing.proxy UPSTREAM_URL [--cut-after N] [--latency S] [--rate B] [--reset]`:
    run a proxy in its own process (prints its URL, runs until stdin closes)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("upstream")
    parser.add_argument("--cut-after", type=int, default=None)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--reset", action="store_true")
    parser.add_argument("--rate", type=float, default=None, help="bytes/s per connection")
    args = parser.parse_args(argv)
    rule = Rule(cut_after=args.cut_after, latency=args.latency, reset=args.reset, rate=args.rate)
    with FaultProxy(args.upstream, default=rule) as proxy:
        print(proxy.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
