"""What both HTTP backends (http.py = urllib3, curl.py = libcurl) share: retry backoff, the
Retry-After cap, item deadlines, the final error after failed attempts, and the URL as sent on the
wire. Its own module so that neither backend imports the other (and a DataLoader worker that only
reads shards imports neither).
"""

from __future__ import annotations

import email.utils
import random
import re
import time

import urllib3

from ..specs import ItemError, Status
from .errors import redact_url, to_item_error
from .policy import FetchPolicy

RETRY_AFTER_CAP = 30.0  # seconds: the most a server's Retry-After may make us wait
BACKOFF_CAP = 10.0  # seconds: ceiling of the exponential backoff

_PLAIN_URL = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), capped; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def retry_delay(attempt: int, backoff: float, retry_after: float | None = None, cap: float = BACKOFF_CAP) -> float:
    """Sleep before retry `attempt` (1-based): exponential backoff with jitter, at least Retry-After."""
    base = min(cap, backoff * 2 ** (attempt - 1))
    delay = base * random.uniform(0.5, 1.0)  # jitter keeps many workers from retrying in lock-step
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return delay


def timeout_error(url: str, policy: FetchPolicy) -> ItemError:
    """The item ran out of its fetch.item_timeout."""
    return ItemError(Status.TIMEOUT, f"{redact_url(url)}: exceeded fetch.item_timeout={policy.item_timeout:g}s")


def check_deadline(url: str, deadline: float, policy: FetchPolicy) -> float:
    """Seconds left before the item's deadline; ItemError(TIMEOUT) once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout_error(url, policy)
    return left


def give_up(last: BaseException, url: str, made: int, policy: FetchPolicy) -> ItemError:
    """The item's final error after `made` attempts that all failed transiently (`last` the latest)."""
    err = to_item_error(last, url)
    note = f"; fetch.item_timeout={policy.item_timeout:g}s leaves no time for more" if made <= policy.retries else ""
    return ItemError(err.status, f"{err.message} (after {made} attempt{'s' if made > 1 else ''}{note})")


def http_url(url: str) -> str:
    """`url` as sent on the wire: spaces, non-ASCII and other characters URLs may not hold are
    percent-encoded as urllib3.util.parse_url does, for both backends. robots.txt is looked up for
    this form's host, the one actually contacted (`http://10.0.0.1:80\\@example.com/` goes to
    10.0.0.1, whatever urlsplit makes of it); errors name the URL as listed, redacted."""
    if _PLAIN_URL.fullmatch(url):
        return url
    try:
        return urllib3.util.parse_url(url).url
    except urllib3.exceptions.LocationParseError:
        return url  # reported as a malformed URL (bad_url)
