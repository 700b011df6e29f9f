"""HTTP(S) items on a libcurl multi handle: the lean fetch path.

libcurl (through pycurl) does the socket I/O, keep-alive, DNS (its asynchronous resolver, cached),
redirects, timeouts and size caps in C; Python runs a few calls per item, on the thread that
converts. Client CPU per 47 kB GET over loopback, measured here (tests/benchmarks/bench_fetch.py):
pycurl multi ~90 us, http.client ~230 us, urllib3 ~480 us, and ~1000 us for urllib3 driven from 16
prefetch threads (threads, futures and GIL hand-offs cost as much as the HTTP). Hence this module,
written by hand only for the glue: which items to start, in what order to hand them over, and how
to map libcurl's outcomes onto the statuses the urllib3 backend (http.py) gives.

pycurl is an optional binary wheel (`pip install 'convert[fast-http]'`); `fetch.backend: auto` uses
it when installed, else urllib3. Both backends behave the same (tests/test_fetch_backends.py):
- every connection, redirect hops included, is checked on the address libcurl is about to connect
  to (OPENSOCKETFUNCTION), so a second DNS answer cannot slip in (DNS rebinding);
- `item_timeout` bounds connect, every read and all retries; `timeout` bounds connect and any stall;
- `max_bytes` caps declared lengths (MAXFILESIZE) and streamed bodies (the write callback);
- transient failures (429/5xx, resets, short bodies, stalls) are retried with the same backoff and
  Retry-After cap; only http/https, redirects included, at most MAX_REDIRECTS of them; no proxy from
  the environment (urllib3 uses none either); `Accept-Encoding: identity` (sizes are stored bytes).
Connections and DNS answers are shared per process and per guard setting (CurlShare), so a
connection opened under `allow_private_networks` is never reused by a guarded fetch.
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

from ..specs import ItemError, Status
from .errors import TransientError, http_status_error, is_transient, redact_url, to_item_error
from .http import RETRY_AFTER_CAP, give_up, retry_delay, timeout_error
from .netguard import DNS_TTL, PrivateAddressError, exempt, is_public
from .policy import FetchPolicy

try:
    import pycurl
except ImportError:  # pragma: no cover - exercised only without the fast-http extra
    pycurl = None

AVAILABLE = pycurl is not None
MISSING_MESSAGE = "fetch.backend='curl' needs pycurl: pip install 'convert[fast-http]' (or use 'auto')"
MAX_REDIRECTS = 5
BUFFER_SIZE = 256 * 1024  # libcurl's receive buffer: most images arrive in one write callback
USER_AGENT = "convert (+https://github.com/convert)"
_VERIFY = ssl.get_default_verify_paths()

_share_lock = threading.Lock()
_shares: dict[tuple[bool, tuple[str, ...]], Any] = {}


def _forget_shares() -> None:
    global _share_lock
    _share_lock = threading.Lock()
    _shares.clear()  # a child never reuses its parent's connections


os.register_at_fork(after_in_child=_forget_shares)


def _share(guarded: bool, allowed: tuple[str, ...]) -> Any:
    """This process's CurlShare (DNS cache + connection pool) for one guard setting."""
    key = (guarded, allowed)
    share = _shares.get(key)
    if share is None:
        with _share_lock:
            share = _shares.get(key)
            if share is None:
                share = pycurl.CurlShare()
                share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_DNS)
                share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_CONNECT)
                _shares[key] = share
    return share


class _Transfer:
    """One item's HTTP fetch across its attempts; `done` once value or error is set."""

    __slots__ = ("item", "url", "deadline", "attempts", "chunks", "got", "cap", "refused", "value", "error",
                 "done", "last", "started", "future", "key")  # fmt: skip

    def __init__(self, item: Any, url: str | None, deadline: float, cap: int, key: int = 0) -> None:
        self.item, self.url, self.deadline, self.cap, self.key = item, url, deadline, cap, key
        self.attempts, self.chunks, self.got = 0, [], 0
        self.refused: str | None = None  # an address the guard refused during this attempt
        self.value: Any = None
        self.error: BaseException | None = None
        self.last: BaseException | None = None  # the previous attempt's transient error
        self.done = False
        self.started = time.perf_counter_ns()
        self.future: Future | None = None  # set for items fetched off the curl path

    def write(self, chunk: bytes) -> int | None:
        """libcurl's write callback: keep the chunk (no copy), abort one byte past the cap."""
        self.got += len(chunk)
        if self.got > self.cap:
            return 0  # any count but len(chunk) aborts the transfer (CURLE_WRITE_ERROR)
        self.chunks.append(chunk)
        return None

    def body(self) -> bytes:
        chunks = self.chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class CurlEngine:
    """Up to `concurrency` HTTP transfers on one CurlMulti, driven by whoever calls `drive`."""

    def __init__(self, policy: FetchPolicy, concurrency: int) -> None:
        if pycurl is None:
            raise RuntimeError(MISSING_MESSAGE)
        self.policy = policy
        self.guarded = not policy.allow_private_networks
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in policy.allowed_networks)
        self.share = _share(self.guarded, policy.allowed_networks if self.guarded else ())
        self.multi = pycurl.CurlMulti()
        self.free: list[Any] = []
        self.handles = 0
        self.concurrency = concurrency
        self.active: dict[Any, _Transfer] = {}
        self.retries: list[tuple[float, int, _Transfer]] = []  # heap of (monotonic due, seq, transfer)
        self._seq = 0
        self.on_settle: Callable[[_Transfer], None] | None = None

    # -- handles ---------------------------------------------------------------------------------
    def _handle(self) -> Any:
        if self.free:
            return self.free.pop()
        c = pycurl.Curl()
        self.handles += 1
        p = self.policy
        c.setopt(pycurl.SHARE, self.share)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 1)
        c.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
        c.setopt(pycurl.PROXY, "")  # never a proxy from the environment
        c.setopt(pycurl.HTTPHEADER, ["Accept-Encoding: identity"])
        c.setopt(pycurl.USERAGENT, USER_AGENT)
        c.setopt(pycurl.BUFFERSIZE, BUFFER_SIZE)
        c.setopt(pycurl.DNS_CACHE_TIMEOUT, int(DNS_TTL))
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(p.timeout * 1000)))
        c.setopt(pycurl.LOW_SPEED_LIMIT, 1)  # a stall of `timeout` seconds ends the attempt
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, round(p.timeout)))
        c.setopt(pycurl.MAXFILESIZE_LARGE, p.max_bytes)
        if _VERIFY.cafile:
            c.setopt(pycurl.CAINFO, _VERIFY.cafile)
        if _VERIFY.capath:
            c.setopt(pycurl.CAPATH, _VERIFY.capath)
        if self.guarded:
            c.setopt(pycurl.OPENSOCKETFUNCTION, lambda purpose, address, c=c: self._open_socket(c, address))
        return c

    def _open_socket(self, c: Any, address: Any) -> Any:
        """Every connection libcurl opens: refuse non-public targets (checked on the very address
        it connects to), else hand it a fresh socket (pycurl keeps a dup of its descriptor)."""
        ip = str(address.addr[0])
        if not (is_public(ip) or exempt(ip, self.allowed)):
            transfer = self.active.get(c)
            if transfer is not None:
                transfer.refused = ip
            return pycurl.SOCKET_BAD
        return socket.socket(address.family, address.socktype, address.protocol)

    # -- transfers -------------------------------------------------------------------------------
    def start(self, t: _Transfer) -> None:
        """Begin (another) attempt of `t`, or finish it with TIMEOUT if its deadline has passed."""
        left = t.deadline - time.monotonic()
        if left <= 0:
            self._settle(t, error=timeout_error(t.url or "", self.policy))
            return
        c = self._handle()
        t.attempts += 1
        t.chunks, t.got, t.refused = [], 0, None
        c.setopt(pycurl.URL, t.url)
        c.setopt(pycurl.WRITEFUNCTION, t.write)
        c.setopt(pycurl.TIMEOUT_MS, max(1, int(left * 1000)))
        self.active[c] = t
        self.multi.add_handle(c)

    def drive(self, timeout: float) -> None:
        """Move every transfer along; wait up to `timeout` s for socket activity if none is ready."""
        multi = self.multi
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        progressed = self._collect()
        now = time.monotonic()
        while self.retries and self.retries[0][0] <= now:
            self.start(heapq.heappop(self.retries)[2])
            progressed = True
        if progressed or not (self.active or self.retries):
            return
        if self.retries:
            timeout = min(timeout, max(0.0, self.retries[0][0] - now))
        if self.active:
            multi.select(timeout)
        elif timeout > 0:
            time.sleep(timeout)

    def _collect(self) -> bool:
        found = False
        while True:
            queued, ok, failed = self.multi.info_read()
            for c in ok:
                found = True
                self._finished(c, 0, "")
            for c, code, message in failed:
                found = True
                self._finished(c, code, message)
            if not queued:
                return found

    def _finished(self, c: Any, code: int, message: str) -> None:
        t = self.active.pop(c)
        self.multi.remove_handle(c)
        status = c.getinfo(pycurl.RESPONSE_CODE)
        retry_after = c.getinfo(pycurl.RETRY_AFTER) if status in (429, 503) else 0
        self.free.append(c)
        if code == 0 and 200 <= status < 300:
            self._settle(t, value=t.body())
            return
        url = t.url or ""
        error = http_status_error(status, redact_url(url), None, min(retry_after, RETRY_AFTER_CAP) or None) \
            if code == 0 else self._curl_error(t, code, message)  # fmt: skip
        self._failed(t, error)

    def _curl_error(self, t: _Transfer, code: int, message: str) -> BaseException:
        """libcurl's error as the exception the urllib3 backend raises for the same condition."""
        url = t.url or ""
        safe = redact_url(url)
        text = f"{safe}: {message.replace(url, safe)}"
        if code == pycurl.E_COULDNT_CONNECT and t.refused is not None:
            return PrivateAddressError(urlsplit(url).hostname or "?", t.refused)
        if code == pycurl.E_OPERATION_TIMEDOUT:
            return timeout_error(url, self.policy) if time.monotonic() >= t.deadline - 0.05 else TimeoutError(text)
        if code == pycurl.E_FILESIZE_EXCEEDED or (code == pycurl.E_WRITE_ERROR and t.got > t.cap):
            return ItemError(Status.TOO_LARGE, f"{safe}: more than the cap of {t.cap} bytes")
        if code in (pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_URL_MALFORMAT):
            return ItemError(Status.BAD_URL, f"{text} (only http and https are fetched)")
        if code == pycurl.E_TOO_MANY_REDIRECTS:
            return ItemError(Status.HTTP_ERROR, f"{safe}: more than {MAX_REDIRECTS} redirects")
        if code in (pycurl.E_SSL_CONNECT_ERROR, pycurl.E_PEER_FAILED_VERIFICATION):
            return ItemError(Status.CONNECTION_ERROR, text)
        if code == pycurl.E_PARTIAL_FILE:
            return TransientError(text, safe)
        return ConnectionError(text)  # resets, refused, name resolution, nothing received: retried

    def _failed(self, t: _Transfer, error: BaseException) -> None:
        """Retry a transient failure after backoff if its deadline allows, else settle the item."""
        if isinstance(error, ItemError):
            self._settle(t, error=error)
            return
        if not is_transient(error):
            self._settle(t, error=to_item_error(error, t.url or ""))
            return
        t.last = error
        if t.attempts <= self.policy.retries:
            due = time.monotonic() + retry_delay(t.attempts, self.policy.backoff, getattr(error, "retry_after", None))
            if due < t.deadline:
                self._seq += 1
                heapq.heappush(self.retries, (due, self._seq, t))
                return
        self._settle(t, error=give_up(error, t.url or "", t.attempts, self.policy))

    def _settle(self, t: _Transfer, value: Any = None, error: BaseException | None = None) -> None:
        t.value, t.error, t.done, t.chunks = value, error, True, []
        if self.on_settle is not None:
            self.on_settle(t)

    def close(self) -> None:
        """Abort what is in flight and free the handles (idempotent)."""
        if self.multi is None:
            return
        for c in list(self.active):
            self.multi.remove_handle(c)
        for c in [*self.active, *self.free]:
            c.close()
        self.active.clear()
        self.free.clear()
        self.multi.close()
        self.multi = None


def curl_fetch(url: str, policy: FetchPolicy, deadline: float | None = None) -> bytes:
    """One URL's bytes through libcurl (the single-item form of curl_stream.CurlStream); ItemError on failure."""
    engine = CurlEngine(policy, 1)
    try:
        t = _Transfer(url, url, deadline if deadline is not None else time.monotonic() + policy.item_timeout,
                      policy.max_bytes)  # fmt: skip
        engine.start(t)
        while not t.done:
            engine.drive(1.0)
    finally:
        engine.close()
    if t.error is not None:
        raise t.error
    return t.value
