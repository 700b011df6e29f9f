"""The fetch layer: item bytes from anywhere, resilient large-object reads, ordered prefetch.

Importing `convert.fetch` loads only the light parts (errors, policy, prefetch): a DataLoader worker
that prefetches shard reads must not pay for an HTTP client. Each HTTP stack lives behind its own
module boundary - `http` (urllib3), `curl` + `curl_stream` (libcurl), `dispatch` (one item from
any scheme) - and the names below that come from them are loaded on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    FetchError,
    HTTPForbidden,
    HTTPNotFound,
    HTTPStatusError,
    ObjectChanged,
    PrivateAddressError,
    PrivateNetworkRefused,
    ResumeExhausted,
    TransientError,
    is_transient,
    redact_url,
    status_for,
)
from .policy import FetchPolicy
from .prefetch import Fetched, prefetch

if TYPE_CHECKING:
    from .curl_stream import CurlStream
    from .dispatch import fetch_bytes, scheme_of
    from .http import pool_manager
    from .resilient import ResilientReader, ResumePolicy, open_resilient

_LAZY = {
    "CurlStream": "curl_stream",
    "fetch_bytes": "dispatch",
    "scheme_of": "dispatch",
    "pool_manager": "http",
    "ResilientReader": "resilient",
    "ResumePolicy": "resilient",
    "open_resilient": "resilient",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


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
