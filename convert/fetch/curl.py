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
DNS answers are shared per process (CurlShare); connections stay with their engine (one per thread and
policy, kept between a thread's shards and single fetches: `thread_engine`), bounded by M_MAXCONNECTS, so a connection opened under
`allow_private_networks` never serves a guarded fetch.
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..specs import ItemError, Status
from . import robots
from .curl_transfer import (
    AVAILABLE,
    BUFFER_SIZE,
    MAX_REDIRECTS,
    MISSING_MESSAGE,
    STALL_CHECK,
    VERIFY,
    Transfer,
    curl_error,
    pycurl,
    share,
)
from .errors import http_status_error, is_transient, redact_url, to_item_error
from .netguard import DNS_TTL, exempt, is_public
from .policy import FetchPolicy
from .retry import RETRY_AFTER_CAP, give_up, http_url, retry_delay, timeout_error

__all__ = ["AVAILABLE", "MAX_REDIRECTS", "MISSING_MESSAGE", "CurlEngine", "curl_fetch", "http_url"]

_local = threading.local()  # this thread's engines for single fetches, by guard setting


def _after_fork() -> None:
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_after_fork)


class CurlEngine:
    """Up to `concurrency` HTTP transfers on one CurlMulti, driven by whoever calls `drive`."""

    def __init__(self, policy: FetchPolicy, concurrency: int) -> None:
        if pycurl is None:
            raise RuntimeError(MISSING_MESSAGE)
        self.policy, self.concurrency = policy, concurrency
        self.guarded = not policy.allow_private_networks
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in policy.allowed_networks)
        self.share = share()
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_MAXCONNECTS, max(8, 2 * concurrency))  # idle keep-alive connections kept
        self._stall_check = 0.0
        self.free: list[Any] = []
        self.active: dict[Any, Transfer] = {}
        self.retries: list[tuple[float, int, Transfer]] = []  # heap of (monotonic due, seq, transfer)
        self._seq = 0
        self.on_settle: Callable[[Transfer], None] | None = None
        self.screen = self._screen if policy.disallowed_header_directives else None
        self.robots = policy.robots_txt == "respect"
        self.waiting: dict[str, list[Transfer]] = {}  # origin -> transfers waiting for its robots.txt
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
        if VERIFY.cafile:
            c.setopt(pycurl.CAINFO, VERIFY.cafile)
        if VERIFY.capath:
            c.setopt(pycurl.CAPATH, VERIFY.capath)
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
    def start(self, t: Transfer) -> None:
        """Begin (another) attempt of `t`, or finish it with TIMEOUT if its deadline has passed.
        With robots_txt: respect, first its host's robots.txt (cached per process, else fetched
        here as one more transfer while `t` waits)."""
        left = t.deadline - time.monotonic()
        if left <= 0:
            self._settle(t, error=timeout_error(t.shown, self.policy))
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
            self._settle(t, error=ItemError(Status.BAD_URL, f"{redact_url(t.shown)[:200]}: not a valid URL"))
            return
        c.setopt(pycurl.WRITEFUNCTION, t.write)
        c.setopt(pycurl.TIMEOUT_MS, max(1, int(left * 1000)))
        if t.screen is not None:
            c.setopt(pycurl.HEADERFUNCTION, t.headers.append)
        if t.robots is not None:
            c.setopt(pycurl.MAXFILESIZE_LARGE, 0)  # a large robots.txt is read up to ROBOTS_CAP, not refused
        self.active[c] = t
        self.multi.add_handle(c)

    def _release(self, c: Any, t: Transfer) -> None:
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

    def _robots_clear(self, t: Transfer) -> bool:
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
            fetch = Transfer(None, robots.robots_url(site), time.monotonic() + p.item_timeout, robots.ROBOTS_CAP)
            fetch.robots, fetch.cleared = key, True
            self.start(fetch)
            return False
        if not rules.allows(path):
            self._settle(t, error=robots.refusal(rules, p.bot))
            return False
        t.cleared = True
        return True

    def _robots_done(self, t: Transfer, status: int | None, reason: str = "") -> None:
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
        if status and not 200 <= status < 300 and code in (0, pycurl.E_WRITE_ERROR, pycurl.E_FILESIZE_EXCEEDED):
            # an error response, whole or cut at the size cap: its status is the answer, not its size
            error: BaseException = http_status_error(
                status, redact_url(t.shown), None, min(retry_after, RETRY_AFTER_CAP) or None
            )
        else:
            error = curl_error(t, code, message, self.policy)
        self._failed(t, error)

    def _failed(self, t: Transfer, error: BaseException) -> None:
        """Retry a transient failure after backoff if its deadline allows, else settle the item."""
        if isinstance(error, ItemError):
            self._settle(t, error=error)
            return
        if not is_transient(error):
            self._settle(t, error=to_item_error(error, t.shown))
            return
        if t.attempts <= self.policy.retries:
            due = time.monotonic() + retry_delay(t.attempts, self.policy.backoff, getattr(error, "retry_after", None))
            if due < t.deadline:
                self._seq += 1
                heapq.heappush(self.retries, (due, self._seq, t))
                return
        self._settle(t, error=give_up(error, t.shown, t.attempts, self.policy))

    def _robots_finished(self, c: Any, t: Transfer, code: int, status: int, message: str) -> None:
        """RFC 9309's reading of a robots.txt transfer's outcome (a cut at ROBOTS_CAP is a success)."""
        answer: int | None = status
        reason = ""
        if code == pycurl.E_TOO_MANY_REDIRECTS:
            answer = 404  # not reached within the redirect limit: "unavailable"
        elif not (code == 0 or (code == pycurl.E_WRITE_ERROR and t.too_large)):
            error = curl_error(t, code, message, self.policy)  # reads the handle: before it is released
            answer, reason = None, str(error.message if isinstance(error, ItemError) else error)
        self._release(c, t)
        self._robots_done(t, answer, reason)

    def _settle(self, t: Transfer, value: Any = None, error: BaseException | None = None) -> None:
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


def _policy_key(policy: FetchPolicy, concurrency: int) -> tuple[Any, ...]:
    """What an engine's behaviour depends on: an engine (and its open connections) serves only
    fetches under the same guard, limits and etiquette."""
    return (
        concurrency,
        policy.timeout,
        policy.retries,
        policy.backoff,
        policy.max_bytes,
        policy.item_timeout,
        policy.allow_private_networks,
        policy.allowed_networks,
        policy.user_agent_header,
        policy.bot,
        policy.disallowed_header_directives,
        policy.robots_txt,
    )


def thread_engine(policy: FetchPolicy, concurrency: int) -> CurlEngine:
    """This thread's idle engine for `policy` (taken out of the cache: give it back with
    `return_engine`), or a new one. Reusing it keeps its keep-alive connections between shards:
    a 10-item shard no longer pays a handle and a TCP connection per item."""
    engines = _local.__dict__.setdefault("engines", {})
    engine = engines.pop(_policy_key(policy, concurrency), None)
    return engine if engine is not None and engine.multi is not None else CurlEngine(policy, concurrency)


def return_engine(engine: CurlEngine) -> None:
    """Back to this thread's cache if it is idle (nothing in flight, waiting or due), else closed."""
    if engine.multi is None:
        return
    if engine.active or engine.retries or engine.waiting:
        engine.close()
        return
    engine.on_settle = None
    engines = _local.__dict__.setdefault("engines", {})
    old = engines.pop(key := _policy_key(engine.policy, engine.concurrency), None)
    if old is not None and old is not engine:
        old.close()
    engines[key] = engine
    while len(engines) > 8:  # a few policies per thread at most; drop the oldest
        engines.pop(next(iter(engines))).close()


def curl_fetch(url: str, policy: FetchPolicy, deadline: float | None = None) -> bytes:
    """One URL's bytes through libcurl (the single-item form of curl_stream.CurlStream); ItemError
    on failure. Each thread keeps one engine per policy, so its connections stay alive between calls."""
    engine = thread_engine(policy, 4)
    t = Transfer(
        url,
        http_url(url),
        deadline if deadline is not None else time.monotonic() + policy.item_timeout,
        policy.max_bytes,
        shown=url,
    )
    try:
        engine.start(t)
        while not t.done:
            engine.drive(1.0)
    except BaseException:
        engine.close()
        raise
    return_engine(engine)
    if t.error is not None:
        raise t.error
    return t.value
