"""HTTP(S) on the hot path: one pooled keep-alive urllib3 PoolManager per process.

Client CPU per 23 KB GET, 8 worker threads (tests/benchmarks/bench_fetch.py, 2 shared cores):
requests.Session ~1350 us, urllib3/fetch_bytes ~420-480 us (0.31-0.36x), aiohttp driven from
the threads through a loop thread ~370 us (0.28x). aiohttp alone in one event loop is leaner
still (0.24x), but the worker's prefetch is threaded and sync; the bridge eats most of that
gain, so the pool stays on urllib3: simple, sync, fork-safe, within ~20% of the bridged aiohttp.
Retries are done here rather than by `urllib3.Retry` because Retry does not cover errors
raised while streaming the body and does not cap a server's Retry-After.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Mapping

import urllib3
import urllib3.exceptions as u3

from ..specs import ItemError, Status
from . import robots
from .deadline import deadline_scope, watched
from .errors import (
    HTTPStatusError,
    TransientError,
    http_status_error,
    is_transient,
    redact_url,
    to_item_error,
)
from .netguard import pool_classes
from .policy import FetchPolicy
from .retry import (
    RETRY_AFTER_CAP,
    check_deadline,
    give_up,
    http_url,
    parse_retry_after,
    retry_delay,
)

__all__ = ["RETRY_AFTER_CAP", "discard", "fetch_http", "pool_manager", "request", "retry_delay", "status_error"]

# http.client refuses a response of more than 100 header lines (a connection error, retried);
# libcurl bounds header bytes, not lines. The same response should get the same outcome on both
# backends (e.g. 150 X-Robots-Tag lines: opted_out); 256 lines of at most 64 KiB (http.client's
# line cap) still bound a hostile response's headers to 16 MiB.
MAX_HEADER_LINES = 256
http.client._MAXHEADERS = max(getattr(http.client, "_MAXHEADERS", 100), MAX_HEADER_LINES)  # type: ignore[attr-defined]
POOL_MAXSIZE = 128  # connections kept per host; created lazily, so a large size costs nothing idle
ERROR_BODY_DRAIN = 64 * 1024  # error bodies up to this size are read so the connection is reused

# urllib3 must not retry by itself (our loop does), but it follows a bounded number of redirects.
NO_RETRY = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5, raise_on_redirect=True)

_lock = threading.Lock()
_pools: dict[tuple[bool, tuple[str, ...]], urllib3.PoolManager] = {}  # (guarded, allowed CIDRs) -> manager
_pool_pid = -1


def _reset_after_fork() -> None:
    # A child must not share the parent's sockets, nor inherit a lock held by another thread.
    global _lock, _pools, _pool_pid
    _lock = threading.Lock()
    _pools, _pool_pid = {}, -1


os.register_at_fork(after_in_child=_reset_after_fork)


def pool_manager(guarded: bool = False, allowed: tuple[str, ...] = ()) -> urllib3.PoolManager:
    """This process's shared, thread-safe PoolManager (re-created after fork); `guarded` refuses
    connections to non-public addresses outside `allowed` (see netguard). All resolve through the
    per-process DNS cache."""
    global _pool_pid
    pid, key = os.getpid(), (guarded, allowed if guarded else ())
    pool = _pools.get(key)
    if pool is not None and _pool_pid == pid:
        return pool
    with _lock:
        if _pool_pid != pid:
            _pools.clear()
            _pool_pid = pid
        if key not in _pools:
            manager = urllib3.PoolManager(num_pools=64, maxsize=POOL_MAXSIZE, block=False, retries=NO_RETRY)
            manager.pool_classes_by_scheme = pool_classes(*key)
            _pools[key] = manager
        return _pools[key]


def request(
    url: str,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    allow_private: bool = True,
    allowed_networks: tuple[str, ...] = (),
) -> urllib3.BaseHTTPResponse:
    """One unretried request on the shared pool with the body left unread (preload_content=False).

    Sends Accept-Encoding: identity (byte ranges and size caps are about stored bytes) and
    turns userinfo in the URL into a basic-auth header. With `allow_private=False` every
    connection (redirects included) must go to a public address (PrivateAddressError otherwise).
    """
    hdrs = {"Accept-Encoding": "identity"}
    if "@" in url:  # only then can there be userinfo (skips a second URL parse per request)
        parsed = urllib3.util.parse_url(url)
        if parsed.auth:
            hdrs.update(urllib3.make_headers(basic_auth=parsed.auth))
            url = parsed._replace(auth=None).url
    if headers:
        hdrs.update(headers)
    try:
        return pool_manager(not allow_private, allowed_networks).request(
            method,
            url,
            headers=hdrs,
            preload_content=False,
            decode_content=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=NO_RETRY,
        )
    except u3.MaxRetryError as exc:  # raised by NO_RETRY's zero counts: surface the real cause
        raise (exc.reason or exc) from None


def discard(resp: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back: drained if the rest is small, else closed (never reused dirty).
    Called inside the item's `watched` scope, so a drain of a trickling body ends at the deadline."""
    try:
        remaining = resp.length_remaining
        if remaining is not None and remaining <= ERROR_BODY_DRAIN and not resp.closed:
            resp.drain_conn()
        else:
            resp.close()
        resp.release_conn()
    except Exception:  # noqa: BLE001 - best-effort cleanup of an already-failed response
        pass


def status_error(resp: urllib3.BaseHTTPResponse, url: str, offset: int | None = None) -> HTTPStatusError:
    """The HTTPStatusError for a non-success response (Retry-After parsed for 429/503)."""
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    return http_status_error(resp.status, redact_url(url), offset, retry_after)


def _read_body(resp: urllib3.BaseHTTPResponse, url: str, limit: int, deadline: float, policy: FetchPolicy) -> bytes:
    """Up to `limit` body bytes; each socket read bounded by min(timeout, time left), so a server
    trickling bytes cannot stretch the item past its deadline. One join copy, none per chunk
    when the body arrives in one read (the common case for small images)."""
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        left = check_deadline(url, deadline, policy)
        if left < policy.timeout and resp.connection is not None and resp.connection.sock is not None:
            resp.connection.sock.settimeout(left)
        chunk = resp.read1(limit - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _get_once(url: str, policy: FetchPolicy, deadline: float) -> bytes:
    left = check_deadline(url, deadline, policy)
    headers = {"User-Agent": policy.user_agent_header}
    resp = request(
        url, min(policy.timeout, left), headers, "GET", policy.allow_private_networks, policy.allowed_networks
    )
    done = False
    # the reaper covers every byte: the body and any drain of it end at the deadline too (socket
    # timeouts bound one recv, and a server sending a byte a second never trips them)
    with watched(resp.connection):
        try:
            if not 200 <= resp.status < 300:
                raise status_error(resp, url)
            directive = robots.header_opt_out(
                resp.headers.getlist("X-Robots-Tag"), policy.bot, policy.disallowed_header_directives
            )
            if directive is not None:
                resp.close()  # the headers decided: the body is not read
                raise robots.header_error(directive)
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise ItemError(Status.TOO_LARGE, f"{redact_url(url)}: {length} bytes > cap {policy.max_bytes}")
            data = _read_body(resp, url, policy.max_bytes + 1, deadline, policy)  # stops one byte past the cap
            if len(data) > policy.max_bytes:
                raise ItemError(Status.TOO_LARGE, f"{redact_url(url)}: more than {policy.max_bytes} bytes")
            if length is not None and length.isdigit() and len(data) != int(length):
                # urllib3 only notices a short body on the *next* read; a truncated image must not pass
                raise TransientError(f"{redact_url(url)}: body ended at {len(data)} of {length} bytes")
            done = True
            return data
        finally:
            if done:
                resp.release_conn()
            else:
                discard(resp)


def _robots_rules(site: str, policy: FetchPolicy, deadline: float) -> robots.Rules:
    """The robots.txt rules of `site` (an origin) for our bot: from the process cache, else fetched
    once (other threads wanting the same host wait for that fetch, until their own deadline)
    through the guarded pool."""
    key = robots.cache_key(site, policy.bot, policy.allow_private_networks, policy.allowed_networks)
    rules = robots.cache.get(key)
    while rules is None:
        mine, done = robots.inflight.claim(key)
        if mine:
            try:
                rules = _fetch_robots(robots.robots_url(site), policy, deadline)
                robots.cache.put(key, rules)
            finally:
                robots.inflight.release(key)
        else:
            done.wait(check_deadline(site, deadline, policy))
            rules = robots.cache.get(key)
    return rules


def _fetch_robots(url: str, policy: FetchPolicy, deadline: float) -> robots.Rules:
    """One GET of robots.txt (redirects followed and address-checked like any fetch; the first
    ROBOTS_CAP bytes read, the rest never); its status and bytes mapped by RFC 9309."""
    status: int | None = None
    body, reason = b"", ""
    try:
        with deadline_scope(deadline):
            left = check_deadline(url, deadline, policy)
            headers = {"User-Agent": policy.user_agent_header}
            resp = request(
                url, min(policy.timeout, left), headers, "GET", policy.allow_private_networks, policy.allowed_networks
            )
            with watched(resp.connection):
                try:
                    status = resp.status
                    if 200 <= status < 300:
                        body = _read_body(resp, url, robots.ROBOTS_CAP, deadline, policy)
                finally:
                    resp.close()
                    resp.release_conn()
    except (u3.MaxRetryError, u3.ResponseError):  # more redirects than allowed: "unavailable" (RFC 9309)
        status = 404
    except Exception as exc:  # noqa: BLE001 - refused, unreachable, timed out: the host is off limits for now
        status, reason = None, to_item_error(exc, url).message
    return robots.rules_for(status, body, policy.bot, reason)


def fetch_http(url: str, policy: FetchPolicy, deadline: float | None = None) -> bytes:
    """GET `url` with urllib3, retrying transient errors; permanent errors raise ItemError at once.

    Everything - connects, reads, retries and their backoff - ends by `deadline` (monotonic
    seconds; default now + policy.item_timeout), as a TIMEOUT if nothing else failed first. With
    `robots_txt: respect` a URL its host's robots.txt disallows is not fetched (opted_out)."""
    if deadline is None:
        deadline = time.monotonic() + policy.item_timeout
    if policy.robots_txt == "respect":
        try:
            site, path = robots.locate(http_url(url))  # the host actually contacted (urlsplit may differ)
        except ValueError:
            raise ItemError(Status.BAD_URL, f"{redact_url(url)[:200]}: not a valid URL") from None
        rules = _robots_rules(site, policy, deadline)
        if not rules.allows(path):
            raise robots.refusal(rules, policy.bot)
    last: BaseException | None = None
    made = 0
    for attempt in range(policy.retries + 1):
        if attempt:
            delay = retry_delay(attempt, policy.backoff, getattr(last, "retry_after", None))
            if time.monotonic() + delay >= deadline:
                break  # no time for another attempt: report the last error
            time.sleep(delay)
        made += 1
        try:
            with deadline_scope(deadline):
                return _get_once(url, policy, deadline)
        except ItemError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below, never swallowed
            if time.monotonic() >= deadline:  # the reaper cut it, or the last read ran out of time
                check_deadline(url, deadline, policy)
            if not is_transient(exc):
                raise to_item_error(exc, url) from None
            last = exc
    assert last is not None
    raise give_up(last, url, made, policy) from None
