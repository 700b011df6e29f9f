"""Fetch policy: the knobs every fetch backend honours (plain, frozen, picklable).

Its field names are those of `config.FetchConfig` where both have one: the policy is built by copying
each such field. What follows from the fields (the HTTP backend, the bot name, the User-Agent) is
decided once, when the policy is made, not on every fetch.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any

from .. import __version__

PROJECT_URL = "https://github.com/convert-dataset/convert"
DEFAULT_USER_AGENT = f"convert/{__version__} (+{PROJECT_URL})"
DEFAULT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
_TOKEN = re.compile(r"[A-Za-z_-]*")  # an RFC 9309 product token: what robots.txt groups can name
CURL_INSTALLED = importlib.util.find_spec("pycurl") is not None  # without importing it (DataLoader workers)


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
    user_agent: str = DEFAULT_USER_AGENT  # sent by both HTTP backends
    user_agent_token: str | None = None  # appended to the User-Agent; the bot name robots rules are matched for
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DIRECTIVES  # X-Robots-Tag values that opt an item out
    robots_txt: str = "ignore"  # "respect": robots.txt decides per URL (fetch/robots.py)
    # decided in __post_init__:
    uses_curl: bool = field(init=False, repr=False, compare=False)  # HTTP(S) through libcurl
    bot: str = field(init=False, repr=False, compare=False)  # lower-case bot name for X-Robots-Tag / robots.txt
    user_agent_header: str = field(init=False, repr=False, compare=False)  # the User-Agent as sent

    def __post_init__(self) -> None:
        curl = self.backend == "curl" or (self.backend == "auto" and CURL_INSTALLED)
        token = self.user_agent_token or ""
        header = f"{self.user_agent} {token}".strip()
        bot = _TOKEN.match(token or self.user_agent).group(0).lower()  # type: ignore[union-attr]
        object.__setattr__(self, "uses_curl", curl)
        object.__setattr__(self, "bot", bot)
        object.__setattr__(self, "user_agent_header", header)
        object.__setattr__(
            self, "disallowed_header_directives", tuple(d.lower() for d in self.disallowed_header_directives)
        )
