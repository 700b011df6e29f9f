"""libcurl's side of a transfer, shared by the engine (curl.py) and the stream (curl_stream.py): the
optional pycurl import, the per-process CurlShare, one item's `Transfer` state across its attempts
(body chunks, header lines, caps) and the mapping of libcurl's outcomes onto the exceptions and
statuses the urllib3 backend gives for the same condition.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

from ..specs import ItemError, Status
from .errors import PrivateAddressError, TransientError, redact_url
from .policy import FetchPolicy
from .retry import timeout_error

try:
    import pycurl
except ImportError:  # pragma: no cover - a platform without a pycurl wheel (a default dependency)
    pycurl = None
    logging.getLogger("convert").warning("convert: pycurl not installed, HTTP via urllib3 (pip install pycurl)")

AVAILABLE = pycurl is not None
MISSING_MESSAGE = "fetch.backend='curl' needs pycurl: pip install pycurl (or use 'auto')"
MAX_REDIRECTS = 5
BUFFER_SIZE = 256 * 1024  # libcurl's receive buffer
STALL_CHECK = 0.25  # seconds between checks for transfers that stopped receiving
VERIFY = ssl.get_default_verify_paths()

_share_lock = threading.Lock()
_shares: dict[int, Any] = {}  # pid -> CurlShare


def _after_fork() -> None:
    global _share_lock
    _share_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def share() -> Any:
    """This process's CurlShare: the DNS cache only. Connections stay with their engine (bounded by
    M_MAXCONNECTS and closed with it), so a crawl of millions of hosts keeps a bounded number of
    descriptors, and a connection opened under allow_private_networks never serves a guarded fetch."""
    pid = os.getpid()
    found = _shares.get(pid)
    if found is None:
        with _share_lock:
            found = _shares.get(pid)
            if found is None:
                _shares.clear()  # a forked child never touches its parent's share
                found = pycurl.CurlShare()
                found.setopt(pycurl.SH_SHARE, pycurl.LOCK_DATA_DNS)
                _shares[pid] = found
    return found


class Transfer:
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
        "shown",
        "started",
        "too_large",
        "url",
        "value",
    )

    def __init__(
        self, item: Any, url: str | None, deadline: float, cap: int, key: int = 0, shown: str | None = None
    ) -> None:
        self.item, self.url, self.deadline, self.cap, self.key = item, url, deadline, cap, key
        self.shown = shown if shown is not None else url or ""  # the URL as listed: what errors name
        self.attempts, self.got = 0, 0
        self.chunks: list[bytes] = []
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


def curl_error(t: Transfer, code: int, message: str, policy: FetchPolicy) -> BaseException:
    """libcurl's error as the exception the urllib3 backend raises for the same condition."""
    url = t.url or ""  # as sent: libcurl's messages quote this form
    safe = redact_url(t.shown)
    text = f"{safe}: {message.replace(url, safe)}"
    if code == pycurl.E_COULDNT_CONNECT and t.refused is not None:
        hop = t.handle.getinfo(pycurl.EFFECTIVE_URL) if t.handle is not None else url  # the redirect hop's
        return PrivateAddressError(urlsplit(hop).hostname or "?", t.refused)
    if code == pycurl.E_OPERATION_TIMEDOUT:
        late = time.monotonic() >= t.deadline - 0.05
        return timeout_error(t.shown, policy) if late else TimeoutError(message.replace(url, safe))
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
