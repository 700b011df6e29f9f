"""Fetch-layer exceptions, transient/permanent classification and URL redaction.

Every backend (urllib3, s3fs/aiobotocore, other fsspec filesystems) raises its own exception
types; this module is the one place that decides which of them are worth a retry or resume and
which ledger `Status` they become.
"""

from __future__ import annotations

import asyncio
import errno
import sys

import urllib3.exceptions as u3

from ..redact import redact_url
from ..specs import ItemError, Status

SETTING = "fetch.allow_private_networks"


class PrivateAddressError(ItemError):
    """An HTTP connection refused because its target address is not public."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(
            Status.BAD_URL, f"{host} resolves to non-public address {address}; refused (set {SETTING}: true to allow)"
        )


class PrivateNetworkRefused(RuntimeError):
    """Shard-level: the first items of a shard all resolved to non-public addresses. The run should
    stop (not retry) and show this one line, which names the setting that allows them."""


class FetchError(OSError):
    """A failed read; `url` is redacted, `offset` is the byte position reached (if known)."""

    def __init__(self, message: str, url: str = "", offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.offset = offset

    def __str__(self) -> str:
        return self.message


class HTTPStatusError(FetchError):
    """A non-success HTTP status (permanent or transient, see `is_transient`)."""

    def __init__(self, status: int, url: str, offset: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{url}: HTTP {status}", url, offset)
        self.status = status
        self.retry_after = retry_after


class HTTPNotFound(HTTPStatusError, FileNotFoundError):
    """HTTP 404/410; also a FileNotFoundError, like a missing file or S3 key."""


class HTTPForbidden(HTTPStatusError, PermissionError):
    """HTTP 401/403; also a PermissionError, like denied S3 credentials."""


def http_status_error(
    status: int, url: str, offset: int | None = None, retry_after: float | None = None
) -> HTTPStatusError:
    """The most specific HTTPStatusError subclass for `status`."""
    cls = HTTPNotFound if status in (404, 410) else HTTPForbidden if status in (401, 403) else HTTPStatusError
    return cls(status, url, offset, retry_after)


class TransientError(FetchError):
    """A retryable condition detected by this layer itself (short read, S3 SlowDown...)."""

    def __init__(self, message: str, url: str = "", offset: int | None = None, retry_after: float | None = None):
        super().__init__(message, url, offset)
        self.retry_after = retry_after


class ObjectChanged(FetchError):
    """The object's ETag/version/size differs from the one pinned at the first response."""


class ResumeExhausted(FetchError):
    """The resume budget ran out; `cause` (also `__cause__`) is the last transient error."""

    def __init__(self, url: str, offset: int, cause: BaseException, resumes: int, stalled: int) -> None:
        super().__init__(
            f"{url}: gave up at byte {offset} after {resumes} resumes ({stalled} without progress): "
            f"{type(cause).__name__}: {cause}",
            url,
            offset,
        )
        self.cause = cause
        self.resumes = resumes
        self.stalled = stalled


def _optional_transients() -> tuple[type[BaseException], ...]:
    """Transient exception types of optional backends (botocore, aiohttp) that are loaded.

    Looked up in sys.modules, never imported: an exception type whose module was never imported
    cannot have been raised, and importing aiohttp costs ~0.3 s of every worker's start-up
    (importing lazily from prefetch threads also raced on a 10^6-item run)."""
    found: list[type[BaseException]] = []
    bc = sys.modules.get("botocore.exceptions")
    if bc is not None:
        found += [bc.HTTPClientError, bc.ConnectionError, bc.IncompleteReadError]
    aio = sys.modules.get("aiohttp")
    if aio is not None and hasattr(aio, "ClientPayloadError"):
        found += [aio.ClientPayloadError, aio.ClientConnectionError]
    return tuple(found)


_TRANSIENT_S3_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "500",
    "502",
    "503",
    "504",
}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT, errno.EBUSY, errno.EAGAIN}


def boto_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, or of one s3fs translated into an OSError."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return str(response["Error"].get("Code"))
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry or a resume can cure: resets, timeouts, short reads, 429/5xx, SlowDown."""
    if isinstance(exc, u3.MaxRetryError) and exc.reason is not None:
        return is_transient(exc.reason)
    if isinstance(exc, (TransientError,)):
        return True
    if isinstance(exc, HTTPStatusError):
        return exc.status in (408, 429) or exc.status >= 500
    if isinstance(exc, (FetchError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    code = boto_code(exc)
    if code is not None:
        return code in _TRANSIENT_S3_CODES
    if isinstance(exc, (u3.SSLError, u3.LocationValueError, u3.ResponseError)):
        return False
    if isinstance(exc, (u3.HTTPError, TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, _optional_transients()):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, u3.NewConnectionError):  # refused/unreachable; urllib3 derives it from ConnectTimeoutError
        return False
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError, u3.TimeoutError)) or "Timeout" in type(exc).__name__


def status_for(exc: BaseException) -> Status:
    """The ledger status an exception from any backend stands for."""
    if isinstance(exc, ItemError):
        return exc.status
    if isinstance(exc, ResumeExhausted):
        return status_for(exc.cause)
    if isinstance(exc, u3.MaxRetryError) and exc.reason is not None:
        return status_for(exc.reason)
    if isinstance(exc, HTTPStatusError):
        return {404: Status.NOT_FOUND, 410: Status.NOT_FOUND, 401: Status.FORBIDDEN, 403: Status.FORBIDDEN}.get(
            exc.status, Status.HTTP_ERROR
        )
    if isinstance(exc, FileNotFoundError):
        return Status.NOT_FOUND
    if isinstance(exc, PermissionError):
        return Status.FORBIDDEN
    if isinstance(exc, u3.LocationValueError):
        return Status.BAD_URL
    if isinstance(exc, u3.ResponseError):  # e.g. too many redirects
        return Status.HTTP_ERROR
    if isinstance(exc, ObjectChanged):
        return Status.ERROR
    if isinstance(exc, TransientError):
        return Status.HTTP_ERROR if boto_code(exc) else Status.CONNECTION_ERROR
    if _is_timeout(exc):
        return Status.TIMEOUT
    if is_transient(exc) or isinstance(exc, (u3.HTTPError, OSError)):
        return Status.CONNECTION_ERROR
    return Status.ERROR


def to_item_error(exc: BaseException, url: str) -> ItemError:
    """An ItemError for `exc`, its message naming the redacted URL and never credentials."""
    if isinstance(exc, ItemError):
        return exc
    safe = redact_url(url)
    text = str(exc) if isinstance(exc, FetchError) else f"{safe}: {type(exc).__name__}: {exc}"
    if safe not in text:
        text = f"{safe}: {text}"
    return ItemError(status_for(exc), _scrub(text, url, safe))


def _scrub(text: str, url: str, safe: str) -> str:
    """Replace any verbatim copy of the unredacted URL (backends echo it) and cap the length."""
    if url != safe:
        text = text.replace(url, safe)
    return text if len(text) <= 500 else text[:497] + "..."
