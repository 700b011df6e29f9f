"""Fetch policy: the knobs every fetch backend honours (plain, frozen, picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 10.0  # seconds, connect and per-read
    retries: int = 3  # transient-error retries per item (HTTP 429/5xx, connection errors, timeouts)
    backoff: float = 0.2  # base seconds; exponential with jitter
    max_bytes: int = 50 * 2**20  # response size cap per item
    allowed_schemes: tuple[str, ...] = ("file", "http", "https", "s3", "memory")
    storage_options: dict[str, Any] = field(default_factory=dict)
    item_timeout: float = 60.0  # total seconds per item: connect + every read + retries
    allow_private_networks: bool = False  # HTTP to loopback/private/link-local/... addresses
    allowed_networks: tuple[str, ...] = ()  # CIDRs exempt from that refusal (e.g. an internal mirror)
    allow_local: bool = True  # local paths / file: URLs at all (False for remote URL lists)
    local_roots: tuple[str, ...] | None = None  # local items must resolve under one of these (None: anywhere)
    backend: str = "auto"  # HTTP(S): "curl" (pycurl multi, fetch/curl.py), "urllib3" (http.py), "auto"

    @property
    def uses_curl(self) -> bool:
        """Whether HTTP(S) goes through libcurl: asked for, or "auto" and pycurl is installed."""
        if self.backend == "urllib3":
            return False
        return self.backend == "curl" or _pycurl_installed()


def _pycurl_installed() -> bool:
    from . import curl

    return curl.AVAILABLE
