"""HTTP(S) items on a libcurl multi handle: the lean fetch path.

libcurl (through pycurl) does the socket I/O, keep-alive, DNS (its asynchronous resolver, cached),
redirects, timeouts and size caps in C; Python runs a few calls per item, on the thread that
converts. Client CPU per 47 kB GET over loopback, measured here (tests/benchmarks/bench_fetch.py):
pycurl multi ~90 us, http.client ~230 us, urllib3 ~480 us, and ~1000 us for urllib3 driven from 16
prefetch threads (threads, futures and GIL hand-offs cost as much as the HTTP). Hence this module,
written by hand only for the glue: which items to start, in what order to hand them over, and how
to map libcurl's outcomes onto the statuses the urllib3 backend (http.py) gives.

pycurl is an optional binary wheel (`pip install 'convert[fast-http]'`); `fetch.backend: auto` uses
it when installed, else urllib3. Both backends behave the same (test_fetch_http.py, test_fetch_safety.py
and test_fetch_contract.py run on each):
- every connection, redirect hops included, is checked on the address libcurl is about to connect
  to (OPENSOCKETFUNCTION), so a second DNS answer cannot slip in (DNS rebinding);
- `item_timeout` bounds connect, every read and all retries; `timeout` bounds connect and any stall
  (checked by the engine: libcurl's LOW_SPEED options average over ~5 s);
- `max_bytes` caps declared lengths (MAXFILESIZE) and streamed bodies (the write callback); an error
  response cut at the cap still reports its HTTP status, never too_large;
- transient failures (429/5xx, resets, short bodies, stalls) are retried with the same backoff and
  Retry-After cap; only http/https, redirects included, at most MAX_REDIRECTS of them; no proxy from
  the environment (urllib3 uses none either); `Accept-Encoding: identity` (sizes are stored bytes).
DNS answers are shared per process (CurlShare); connections stay with their engine (one per shard,
one per thread for single fetches), bounded by M_MAXCONNECTS, so a connection opened under
`allow_private_networks` never serves a guarded fetch.
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
from . import robots
from .errors import (
    PrivateAddressError,
    TransientError,
    http_status_error,
    is_transient,
    redact_url,
    to_item_error,
)
from .netguard import DNS_TTL, exempt, is_public
from .policy import FetchPolicy
from .retry import RETRY_AFTER_CAP, give_up, http_url, retry_delay, timeout_error

try:
    import pycurl
except ImportError:  # pragma: no cover - exercised only without the fast-http extra
    pycurl = None

AVAILABLE = pycurl is not None
MISSING_MESSAGE = "fetch.backend='curl' needs pycurl: pip install 'convert[fast-http]' (or use 'auto')"
MAX_REDIRECTS = 5
BUFFER_SIZE = 256 * 1024  # libcurl's receive buffer
STALL_CHECK = 0.25  # seconds between checks for transfers that stopped receiving
_VERIFY = ssl.get_default_verify_paths()

_share_lock = threading.Lock()
_shares: dict[int, Any] = {}  # pid -> CurlShare
_local = threading.local()  # this thread's engines for single fetches, by guard setting


def _after_fork() -> None:
    global _share_lock, _local
    _share_lock, _local = threading.Lock(), threading.local()


os.register_at_fork(after_in_child=_after_fork)


def _share() -> Any:
    """This process's CurlShare: the DNS cache only. Connections stay with their engine (bounded by
    M_MAXCONNECTS and closed with it), so a crawl of millions of hosts keeps a bounded number of
    descriptors, and a connection opened under allow_private_networks never serves a guarded fetch."""
    pid = os.getpid()
    share = _shares.get(pid)
    if share is None:
        with _share_lock:
            share = _shares.get(pid)
            if share is None:
                _shares.clear()  # a forked child never touches its parent's share
                share = pycurl.CurlShare()
                share.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_DNS)
                _shares[pid] = share
    return share


class _Transfer:
    """One item's HTTP fetch across its attempts; `done` once value or error is set."""

    __slots__ = (
        "attempts",
        "cap",
        "chunks",
        "cleared",
        "deadline",
        "done",
        "error",
        "future",
        "got",
        "handle",
        "headers",
        "item",
        "key",
        "last_data",
        "opted",
        "refused",
        "robots",
        "screen",
        "started",
        "too_large",
        "url",
        "value",
    )  # fmt: skip

    def __init__(self, item: Any, url: str | None, deadline: float, cap: int, key: int = 0) -> None:
        self.item, self.url, self.deadline, self.cap, self.key = item, url, deadline, cap, key
        self.attempts, self.chunks, self.got = 0, [], 0
        self.refused: str | None = None  # an address the guard refused during this attempt
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.started = time.perf_counter_ns()
        self.future: Future | None = None  # set for items fetched off the curl path
        self.handle: Any = None
        self.too_large = False
        self.last_data = 0.0  # monotonic time of the attempt's start or its latest body bytes
        self.headers: list[bytes] = []  # raw header lines of this attempt (every redirect hop)
        self.screen: Callable[[list[bytes]], str | None] | None = None  # X-Robots-Tag check, if any
        self.opted: str | None = None  # the X-Robots-Tag directive that opted this item out
        self.robots: tuple | None = None  # set on a robots.txt fetch: its cache key
        self.cleared = False  # robots.txt allows this URL (checked once, not per attempt)

    def begin(self, handle: Any) -> None:
        """Reset for a new attempt on `handle`."""
        self.attempts += 1
        self.chunks, self.got, self.refused, self.handle = [], 0, None, handle
        self.too_large, self.last_data, self.opted = False, time.monotonic(), None
        self.headers.clear()

    def write(self, chunk: bytes) -> int | None:
        """libcurl's write callback: keep the chunk (no copy); abort one byte past the cap, or at the
        first chunk if the headers opt the item out (the body is then neither kept nor read on).
        Header lines are collected by `list.append` itself (a C call, no Python frame per line);
        the status is read once the transfer ends, and an error response's body is dropped then."""
        if not self.got and self.screen is not None:
            self.opted = self.screen(self.headers)
            if self.opted is not None:
                return 0
        self.got += len(chunk)
        self.last_data = time.monotonic()
        if self.got > self.cap:
            self.too_large = True
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
        self.share = _share()
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_MAXCONNECTS, max(8, 2 * concurrency))  # idle keep-alive connections kept
        self._stall_check = 0.0
        self.free: list[Any] = []
        self.active: dict[Any, _Transfer] = {}
        self.retries: list[tuple[float, int, _Transfer]] = []  # heap of (monotonic due, seq, transfer)
        self._seq = 0
        self.on_settle: Callable[[_Transfer], None] | None = None
        self.screen = self._screen if policy.disallowed_header_directives else None
        self.robots = policy.robots_txt == "respect"
        self.waiting: dict[str, list[_Transfer]] = {}  # origin -> transfers waiting for its robots.txt
        self.handed: list[socket.socket] = []  # sockets given to libcurl (it keeps a dup of each)

    # -- handles ---------------------------------------------------------------------------------
    def _handle(self) -> Any:
        if self.free:
            return self.free.pop()
        return self._new_handle()

    def _new_handle(self) -> Any:
        c = pycurl.Curl()
        p = self.policy
        c.setopt(pycurl.SHARE, self.share)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 1)
        c.setopt(pycurl.MAXREDIRS, MAX_REDIRECTS)
        c.setopt(pycurl.PROXY, "")  # never a proxy from the environment
        c.setopt(pycurl.HTTPHEADER, ["Accept-Encoding: identity"])
        c.setopt(pycurl.USERAGENT, p.user_agent_header)
        c.setopt(pycurl.BUFFERSIZE, BUFFER_SIZE)
        c.setopt(pycurl.DNS_CACHE_TIMEOUT, int(DNS_TTL))
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(p.timeout * 1000)))
        c.setopt(pycurl.MAXFILESIZE_LARGE, p.max_bytes)  # a declared length over the cap ends it at once
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
        sock = socket.socket(address.family, address.socktype, address.protocol)
        self.handed.append(sock)  # closed once libcurl holds its dup: a socket collected open costs
        return sock  # ~40 us (CPython formats an "unclosed <socket ...>" ResourceWarning with its repr)

    # -- transfers -------------------------------------------------------------------------------
    def start(self, t: _Transfer) -> None:
        """Begin (another) attempt of `t`, or finish it with TIMEOUT if its deadline has passed.
        With robots_txt: respect, first its host's robots.txt (cached per process, else fetched
        here as one more transfer while `t` waits)."""
        left = t.deadline - time.monotonic()
        if left <= 0:
            self._settle(t, error=timeout_error(t.url or "", self.policy))
            return
        if self.robots and not t.cleared and not self._robots_clear(t):
            return
        c = self._new_handle() if t.robots is not None else self._handle()
        if t.robots is None:
            t.screen = self.screen
        t.begin(c)
        try:
            c.setopt(pycurl.URL, t.url)
        except (UnicodeEncodeError, pycurl.error):
            self._release(c, t)
            self._settle(t, error=ItemError(Status.BAD_URL, f"{redact_url(t.url or '')[:200]}: not a valid URL"))
            return
        c.setopt(pycurl.WRITEFUNCTION, t.write)
        c.setopt(pycurl.TIMEOUT_MS, max(1, int(left * 1000)))
        if t.screen is not None:
            c.setopt(pycurl.HEADERFUNCTION, t.headers.append)
        if t.robots is not None:
            c.setopt(pycurl.MAXFILESIZE_LARGE, 0)  # a large robots.txt is read up to ROBOTS_CAP, not refused
        self.active[c] = t
        self.multi.add_handle(c)

    def _release(self, c: Any, t: _Transfer) -> None:
        """Back to the free list; a robots.txt fetch's handle (other size cap) is closed instead."""
        if t.robots is None:
            self.free.append(c)
        else:
            c.close()

    def _screen_waiting(self) -> None:
        """Transfers whose headers are complete but whose body has not started: the headers decide
        now (the write callback decides at the first body chunk; this catches a body that is slow to
        come), so an opted-out item waits at most STALL_CHECK for a body it would not read."""
        for c, t in list(self.active.items()):
            if not t.got and t.screen is not None and t.headers and t.headers[-1] == b"\r\n":
                t.opted = t.screen(t.headers)
                if t.opted is not None:
                    del self.active[c]
                    self.multi.remove_handle(c)
                    self._release(c, t)
                    self._settle(t, error=robots.header_error(t.opted))

    def _screen(self, lines: list[bytes]) -> str | None:
        p = self.policy
        return robots.header_lines_opt_out(lines, p.bot, p.disallowed_header_directives)

    def _robots_clear(self, t: _Transfer) -> bool:
        """True if robots.txt allows `t`'s URL; else `t` is settled (disallowed) or waits for it."""
        p = self.policy
        try:
            site, path = robots.locate(t.url or "")
        except ValueError:
            return True  # not a URL: the fetch itself reports it
        key = robots.cache_key(site, p.bot, p.allow_private_networks, p.allowed_networks)
        rules = robots.cache.get(key)
        if rules is None:
            waiting = self.waiting.get(site)
            if waiting is not None:
                waiting.append(t)
                return False
            self.waiting[site] = [t]
            fetch = _Transfer(None, robots.robots_url(site), time.monotonic() + p.item_timeout, robots.ROBOTS_CAP)
            fetch.robots, fetch.cleared = key, True
            self.start(fetch)
            return False
        if not rules.allows(path):
            self._settle(t, error=robots.refusal(rules, p.bot))
            return False
        t.cleared = True
        return True

    def _robots_done(self, t: _Transfer, status: int | None, reason: str = "") -> None:
        """A robots.txt fetch ended: cache its verdict and start (or refuse) the URLs waiting for it."""
        assert t.robots is not None
        rules = robots.rules_for(status, t.body(), self.policy.bot, reason)
        robots.cache.put(t.robots, rules)
        t.done, t.chunks = True, []
        for waiter in self.waiting.pop(t.robots[0], []):
            self.start(waiter)

    def drive(self, timeout: float) -> None:
        """Move every transfer along; wait up to `timeout` s for socket activity if none is ready."""
        multi = self.multi
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        if self.handed:
            for sock in self.handed:
                sock.close()
            self.handed.clear()
        progressed = self._collect()
        now = time.monotonic()
        if now >= self._stall_check:
            progressed = self._cut_stalled(now) or progressed
        while self.retries and self.retries[0][0] <= now:
            self.start(heapq.heappop(self.retries)[2])
            progressed = True
        if progressed or not (self.active or self.retries):
            return
        if self.retries:
            timeout = min(timeout, max(0.0, self.retries[0][0] - now))
        if self.active:
            multi.select(min(timeout, STALL_CHECK))
        elif timeout > 0:
            time.sleep(timeout)

    def _cut_stalled(self, now: float) -> bool:
        """End attempts that received nothing for `fetch.timeout` seconds (a retryable timeout).
        Checked here rather than with libcurl's LOW_SPEED_* options, which average over a ~5 s
        window and so noticed a stall after a burst only 6-7 s late."""
        self._stall_check = now + STALL_CHECK
        if self.screen is not None:
            self._screen_waiting()
        stalled = [c for c, t in self.active.items() if now - t.last_data > self.policy.timeout]
        for c in stalled:
            t = self.active.pop(c)
            self.multi.remove_handle(c)
            self._release(c, t)
            if t.robots is not None:
                self._robots_done(t, None, f"sent nothing for fetch.timeout={self.policy.timeout:g}s")
                continue
            self._failed(t, TimeoutError(f"no data for fetch.timeout={self.policy.timeout:g}s"))
        return bool(stalled)

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
        if t.robots is not None:
            self._robots_finished(c, t, code, status, message)
            return
        self.free.append(c)
        if code == 0 and 200 <= status < 300:
            if t.screen is not None and not t.got:  # an empty body: no write callback saw the headers
                t.opted = t.screen(t.headers)
            if t.opted is None:
                self._settle(t, value=t.body())
                return
        if t.opted is not None and 200 <= status < 300:
            self._settle(t, error=robots.header_error(t.opted))
            return
        url = t.url or ""
        if status and not 200 <= status < 300 and code in (0, pycurl.E_WRITE_ERROR, pycurl.E_FILESIZE_EXCEEDED):
            # an error response, whole or cut at the size cap: its status is the answer, not its size
            error: BaseException = http_status_error(status, redact_url(url), None,
                                                     min(retry_after, RETRY_AFTER_CAP) or None)  # fmt: skip
        else:
            error = self._curl_error(t, code, message)
        self._failed(t, error)

    def _curl_error(self, t: _Transfer, code: int, message: str) -> BaseException:
        """libcurl's error as the exception the urllib3 backend raises for the same condition."""
        url = t.url or ""
        safe = redact_url(url)
        text = f"{safe}: {message.replace(url, safe)}"
        if code == pycurl.E_COULDNT_CONNECT and t.refused is not None:
            hop = t.handle.getinfo(pycurl.EFFECTIVE_URL) if t.handle is not None else url  # the redirect hop's
            return PrivateAddressError(urlsplit(hop).hostname or "?", t.refused)
        if code == pycurl.E_OPERATION_TIMEDOUT:
            late = time.monotonic() >= t.deadline - 0.05
            return timeout_error(url, self.policy) if late else TimeoutError(message.replace(url, safe))
        if code == pycurl.E_FILESIZE_EXCEEDED or (code == pycurl.E_WRITE_ERROR and t.too_large):
            return ItemError(Status.TOO_LARGE, f"{safe}: more than the cap of {t.cap} bytes")
        if code == pycurl.E_UNSUPPORTED_PROTOCOL and "HTTP/0.9" in message:
            return TransientError(f"{text} (the server did not answer in HTTP)", safe)  # e.g. the wrong port
        if code in (pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_URL_MALFORMAT):
            return ItemError(Status.BAD_URL, f"{text} (only http and https are fetched)")
        if code == pycurl.E_TOO_MANY_REDIRECTS:
            return ItemError(Status.HTTP_ERROR, f"{safe}: more than {MAX_REDIRECTS} redirects")
        if code in (pycurl.E_SSL_CONNECT_ERROR, pycurl.E_PEER_FAILED_VERIFICATION):
            return ItemError(Status.CONNECTION_ERROR, text)
        if code == pycurl.E_PARTIAL_FILE:
            return TransientError(text, safe)
        return TransientError(text if message else f"{safe}: libcurl error {code}", safe)  # resets, refused,
        # name resolution, nothing received: retried, then CONNECTION_ERROR

    def _failed(self, t: _Transfer, error: BaseException) -> None:
        """Retry a transient failure after backoff if its deadline allows, else settle the item."""
        if isinstance(error, ItemError):
            self._settle(t, error=error)
            return
        if not is_transient(error):
            self._settle(t, error=to_item_error(error, t.url or ""))
            return
        if t.attempts <= self.policy.retries:
            due = time.monotonic() + retry_delay(t.attempts, self.policy.backoff, getattr(error, "retry_after", None))
            if due < t.deadline:
                self._seq += 1
                heapq.heappush(self.retries, (due, self._seq, t))
                return
        self._settle(t, error=give_up(error, t.url or "", t.attempts, self.policy))

    def _robots_finished(self, c: Any, t: _Transfer, code: int, status: int, message: str) -> None:
        """RFC 9309's reading of a robots.txt transfer's outcome (a cut at ROBOTS_CAP is a success)."""
        reason = ""
        if code == pycurl.E_TOO_MANY_REDIRECTS:
            status = 404  # not reached within the redirect limit: "unavailable"
        elif not (code == 0 or (code == pycurl.E_WRITE_ERROR and t.too_large)):
            error = self._curl_error(t, code, message)  # reads the handle: before it is released
            status, reason = None, str(error.message if isinstance(error, ItemError) else error)
        self._release(c, t)
        self._robots_done(t, status, reason)

    def _settle(self, t: _Transfer, value: Any = None, error: BaseException | None = None) -> None:
        if t.robots is not None:  # a robots.txt fetch that could not start
            self._robots_done(t, None, str(getattr(error, "message", error)))
            return
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
        for sock in self.handed:
            sock.close()
        self.handed.clear()
        self.active.clear()
        self.free.clear()
        self.multi.close()
        self.multi = None


def curl_fetch(url: str, policy: FetchPolicy, deadline: float | None = None) -> bytes:
    """One URL's bytes through libcurl (the single-item form of curl_stream.CurlStream); ItemError
    on failure. Each thread keeps one engine per policy, so its connections stay alive between calls."""
    engines = _local.__dict__.setdefault("engines", {})
    key = (policy.timeout, policy.retries, policy.backoff, policy.max_bytes, policy.item_timeout,
           policy.allow_private_networks, policy.allowed_networks, policy.user_agent_header, policy.bot,
           policy.disallowed_header_directives, policy.robots_txt)  # what an engine's behaviour depends on
    engine = engines.get(key)
    if engine is None or engine.multi is None:
        engine = engines[key] = CurlEngine(policy, 4)
        while len(engines) > 8:  # a few policies per thread at most; drop the oldest
            engines.pop(next(iter(engines))).close()
    t = _Transfer(url, http_url(url), deadline if deadline is not None else time.monotonic() + policy.item_timeout,
                  policy.max_bytes)  # fmt: skip
    try:
        engine.start(t)
        while not t.done:
            engine.drive(1.0)
    except BaseException:
        engines.pop(key, None)
        engine.close()
        raise
    if t.error is not None:
        raise t.error
    return t.value
