"""Publishers' opt-outs: the X-Robots-Tag header grammar and robots.txt (RFC 9309), shared by both
HTTP backends. Parsing, matching and the per-process cache live here; each backend fetches
robots.txt its own way (http.py blocking, curl.py as one more transfer on its multi handle).

robots.txt is matched by a small matcher of our own rather than `urllib.robotparser`, which is not
RFC 9309: it applies the first matching rule in file order (the RFC: the longest match wins, and
allow wins a tie), knows neither `*` nor `$`, matches user agents by substring, and does not merge
several groups naming the same agent.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..specs import ItemError, Status

ROBOTS_CAP = 500 * 1024  # bytes of robots.txt parsed (RFC 9309 2.5: at least 500 KiB); the rest is not read
ROBOTS_TTL = 3600.0  # seconds a robots.txt verdict is reused (RFC 9309 2.4: at most 24 h)
FAILED_TTL = 60.0  # seconds an unreachable robots.txt (5xx, no answer) is remembered before asking again
CACHE_MAX = 10_000  # hosts per process (LRU)
HEADER_CAP = 16 * 1024  # characters of X-Robots-Tag values parsed per response
_VALUED = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}  # "name: value" directives
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_PLAIN = re.compile(rb"[!-$&-~]*")  # printable ASCII but '%': already canonical
_TOKEN = re.compile(r"[A-Za-z_-]*")


# ------------------------------------------------------------------ X-Robots-Tag


def header_opt_out(values: Iterable[str], bot: str, directives: tuple[str, ...]) -> str | None:
    """The first directive of `directives` that the X-Robots-Tag header `values` (one per header
    line) apply to us, else None. A value is a comma list; `name: directive, ...` scopes the rest of
    that value to bot `name` (ours when it equals `bot`, case-insensitive); `none` is `noindex,
    nofollow`. Only the first HEADER_CAP characters are parsed."""
    if not directives:
        return None
    budget = HEADER_CAP
    for value in values:
        value, budget = value[:budget], budget - len(value)
        ours = True
        for element in value.split(","):
            name, colon, rest = element.partition(":")
            name = name.strip().lower()
            if colon and name not in _VALUED:
                ours, element = name == bot, rest
            directive = element.strip().lower()
            if ours and (directive in directives or (directive == "none" and _NONE & set(directives))):
                return directive
        if budget <= 0:
            break
    return None


_NONE = {"noindex", "nofollow"}


def header_lines_opt_out(lines: list[bytes], bot: str, directives: tuple[str, ...]) -> str | None:
    """`header_opt_out` over raw header lines as libcurl hands them over (every hop of a redirect
    chain, each starting with its status line): only the final response's X-Robots-Tag count."""
    values: list[str] = []
    for line in reversed(lines):
        if line[:5] == b"HTTP/":
            parts = line.split(b" ", 2)
            if len(parts) < 2 or parts[1][:1] != b"2":
                return None  # a redirect hop or an error: its status decides, not its tags
            break
        if line[:13].lower() == b"x-robots-tag:":
            values.append(line[13:].decode("latin-1").strip())
    return header_opt_out(reversed(values), bot, directives) if values else None


def header_error(directive: str) -> ItemError:
    return ItemError(Status.OPTED_OUT, f"X-Robots-Tag: {directive}")


# ------------------------------------------------------------------ robots.txt rules


def _canon(path: bytes) -> str:
    """A path (or pattern) in one canonical form for comparison (RFC 9309 2.2.2): percent-escapes
    decoded, then non-ASCII, controls and spaces percent-encoded with upper-case hex digits."""
    if _PLAIN.fullmatch(path):
        return path.decode("ascii")  # the common case: nothing to decode or encode
    raw = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), path)
    return "".join(chr(b) if 0x20 < b < 0x7F else f"%{b:02X}" for b in raw)


@dataclass(frozen=True, slots=True)
class _Rule:
    allow: bool
    pattern: str  # canonical
    regex: re.Pattern[str] | None  # for patterns with * or $; None: a plain prefix

    def matches(self, path: str) -> bool:
        return self.regex.match(path) is not None if self.regex is not None else path.startswith(self.pattern)


def _rule(allow: bool, value: str) -> _Rule:
    pattern = _canon(value.encode("utf-8"))
    if "*" not in pattern and not pattern.endswith("$"):
        return _Rule(allow, pattern, None)
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    regex = ".*".join(re.escape(part) for part in body.split("*")) + (r"\Z" if anchored else "")
    return _Rule(allow, pattern, re.compile(regex, re.DOTALL))


class Rules:
    """The rules that apply to one bot on one host: longest match wins, allow wins a tie. Kept
    longest first (allow first among equals), so the first rule that matches decides."""

    __slots__ = ("default", "rules", "why")

    def __init__(self, rules: tuple[_Rule, ...] = (), default: bool = True, why: str = "") -> None:
        self.rules = tuple(sorted(rules, key=lambda r: (-len(r.pattern), not r.allow)))
        self.default, self.why = default, why

    def allowed(self, url: str) -> bool:
        return self.allows(locate(url)[1])

    def allows(self, path: str) -> bool:
        """Whether the rules allow `path` (path and query of the URL, as `locate` gives it)."""
        if not self.rules:
            return self.default
        path = _canon(path.encode("utf-8"))
        if path == "/robots.txt":
            return True
        for rule in self.rules:
            if rule.matches(path):
                return rule.allow
        return True


ALLOW_ALL = Rules()


def parse(text: str, bot: str) -> Rules:
    """The rules of robots.txt `text` for product token `bot`: the groups naming it (merged), else
    the `*` groups (merged), else none (everything allowed)."""
    ours: list[_Rule] = []
    star: list[_Rule] = []
    named_us = False
    agents: list[str] = []
    in_rules = False
    for line in text.splitlines():
        key, colon, value = line.split("#", 1)[0].partition(":")
        if not colon:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("user-agent", "useragent"):
            if in_rules:
                agents, in_rules = [], False
            agent = value if value == "*" else _TOKEN.match(value).group(0).lower()  # type: ignore[union-attr]
            agents.append(agent)
            named_us = named_us or agent == bot
        elif key in ("allow", "disallow") and agents:
            in_rules = True
            if not value:
                continue  # an empty rule matches nothing
            rule = _rule(key == "allow", value)
            if bot in agents:
                ours.append(rule)
            if "*" in agents:
                star.append(rule)
    return Rules(tuple(ours if named_us else star))


def rules_for(status: int | None, body: bytes, bot: str, reason: str = "") -> Rules:
    """RFC 9309 2.3.1: a 2xx robots.txt is parsed; 4xx (and a redirect chain too long) means none
    (allowed); 5xx or no answer (`status` None, `reason` saying why) means the host is off limits
    for now. A body read up to ROBOTS_CAP loses the line the cap cut (never a shorter rule)."""
    if status is None or status >= 500:
        what = f"HTTP {status}" if status is not None else f"unreachable ({reason[:200]})" if reason else "unreachable"
        return Rules(default=False, why=f"robots.txt {what}: not fetched (RFC 9309 treats the host as disallowed)")
    if 200 <= status < 300:
        if len(body) >= ROBOTS_CAP:  # read up to the cap: its last line may be cut ("Disallow: /priv" -> "/")
            body = body[:ROBOTS_CAP]
            body = body[: body.rfind(b"\n") + 1] if not body.endswith(b"\n") else body
        return parse(body.decode("utf-8", "replace"), bot)
    return ALLOW_ALL


def refusal(rules: Rules, bot: str) -> ItemError:
    """The item's error when `rules` do not allow its URL. An unreachable robots.txt is a retryable
    connection error (a later --retry-failed asks again), a disallow rule is a permanent opt-out."""
    if rules.why:
        return ItemError(Status.CONNECTION_ERROR, rules.why)
    return ItemError(Status.OPTED_OUT, f"robots.txt disallows it for {bot}")


# ------------------------------------------------------------------ hosts and the cache


def locate(url: str) -> tuple[str, str]:
    """(origin, path) of an http(s) URL: scheme://host:port (the robots.txt scope, lower-case, port
    explicit) and the path with its query, the part robots.txt rules match. ValueError if malformed."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return f"{scheme}://{host}:{port}", path


def origin(url: str) -> str:
    return locate(url)[0]


def robots_url(origin: str) -> str:
    return origin + "/robots.txt"


class Cache:
    """Verdicts per (origin, bot, guard setting): a bounded LRU whose entries expire."""

    def __init__(self, maxsize: int = CACHE_MAX) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[float, Rules]] = OrderedDict()

    def get(self, key: tuple) -> Rules | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            if hit[0] <= time.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return hit[1]

    def put(self, key: tuple, rules: Rules) -> None:
        ttl = FAILED_TTL if rules.why else ROBOTS_TTL
        with self._lock:
            self._entries[key] = (time.monotonic() + ttl, rules)
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class Inflight:
    """One robots.txt fetch per host at a time among a process's threads: the first to `claim` a
    key fetches it, the others wait for its `release` (then read the cache)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[tuple, threading.Event] = {}

    def claim(self, key: tuple) -> tuple[bool, threading.Event]:
        """(True, event) if the caller must fetch `key`, else (False, the event to wait for)."""
        with self._lock:
            event = self._events.get(key)
            if event is not None:
                return False, event
            event = self._events[key] = threading.Event()
            return True, event

    def release(self, key: tuple) -> None:
        with self._lock:
            event = self._events.pop(key, None)
        if event is not None:
            event.set()


cache = Cache()
inflight = Inflight()


def cache_key(url_origin: str, bot: str, allow_private: bool, allowed_networks: tuple[str, ...]) -> tuple:
    return (url_origin, bot, allow_private, allowed_networks)


def _after_fork() -> None:
    global cache, inflight
    cache, inflight = Cache(), Inflight()


os.register_at_fork(after_in_child=_after_fork)
