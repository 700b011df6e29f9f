"""The fetch layer: item bytes from anywhere, resilient large-object reads, ordered prefetch."""

from .curl_stream import CurlStream
from .dispatch import fetch_bytes, scheme_of
from .errors import (
    FetchError,
    HTTPForbidden,
    HTTPNotFound,
    HTTPStatusError,
    ObjectChanged,
    ResumeExhausted,
    TransientError,
    is_transient,
    redact_url,
    status_for,
)
from .http import pool_manager
from .netguard import PrivateAddressError, PrivateNetworkRefused
from .policy import FetchPolicy
from .prefetch import Fetched, prefetch
from .resilient import ResilientReader, ResumePolicy, open_resilient

__all__ = [
    "CurlStream",
    "FetchError",
    "FetchPolicy",
    "Fetched",
    "HTTPForbidden",
    "HTTPNotFound",
    "HTTPStatusError",
    "ObjectChanged",
    "PrivateAddressError",
    "PrivateNetworkRefused",
    "ResilientReader",
    "ResumeExhausted",
    "ResumePolicy",
    "TransientError",
    "fetch_bytes",
    "is_transient",
    "open_resilient",
    "pool_manager",
    "prefetch",
    "redact_url",
    "scheme_of",
    "status_for",
]
