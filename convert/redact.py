"""One redaction rule for everything stored or logged: storage options, URLs, messages.

Secret-looking names (`is_secret_key`: secret, token, password, key, credential, session, auth,
signature, sig, sas, cookie, policy, ...) have their values replaced by "***" - as option keys
(at any depth), as URL query parameters and as `name=value` pairs of a URL fragment
(`#access_token=...`, as OAuth implicit flows put them). URL userinfo (user:password@) is dropped,
including an unencoded password holding '/', '?' or '#' (where `urlsplit` would end the host
early and keep the password). Every string value of an option tree is redacted as text, so a URL
with credentials inside `endpoint_url` is cleaned too. Used for item keys, ledger and plan
columns, the manifest's config, `inspect`, the report, log lines and error messages, so a
credential given in a URL or in the config never lands on disk or in a terminal.
"""

from __future__ import annotations

import re
from typing import Any

_SECRET = re.compile(
    r"secret|token|password|passwd|pwd|key|credential|session|auth|signature|sig|sas|cookie|policy|jwt", re.I
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:)//")
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[^\s:/?#@\[\]\\]*)(?::\d*)?$")  # host or [v6], optional :port
_AUTHORITY_END = re.compile(r"[/?#\\]")  # '\' too: WHATWG parsers (urllib3, browsers) end the host there
MASK = "***"


def is_secret_key(name: Any) -> bool:
    """True for option keys / query parameter names whose values must never be stored or shown."""
    return bool(_SECRET.search(str(name)))


def _split_authority(rest: str) -> tuple[str, str]:
    """(host[:port], everything after it) of the text after "scheme://", userinfo removed.

    The userinfo ends at the LAST '@' of the authority. When the authority as a parser would cut
    it (up to the first '/', '?', '#' or '\\') is no valid host[:port] - `bob:pa/ss@host` gives
    `bob:pa` - or is `name:digits` followed by a path segment with an '@' inside it (`bob:12/w@h`),
    the password itself held such a character: the userinfo then ends at the last '@' that is
    followed by a valid host, wherever it is. A path segment that starts with '@' (`/@user/`,
    `\\@evil.com`) is a path: the host shown stays the one a client contacts."""
    end = _AUTHORITY_END.search(rest)
    authority, tail = (rest[: end.start()], rest[end.start() :]) if end else (rest, "")
    if "@" in authority:
        return authority.rsplit("@", 1)[1], tail
    first = _AUTHORITY_END.split(tail[1:], 1)[0]  # the first path segment
    digits_then_at = ":" in authority and "@" in first[1:]  # `bob:12/pw@host`: a password of digits, then '/'
    if "@" not in tail or (_HOST.match(authority) and not digits_then_at):
        return authority, tail
    for at in reversed([m.start() for m in re.finditer("@", rest)]):
        after = rest[at + 1 :]
        cut = _AUTHORITY_END.search(after)
        host = after[: cut.start()] if cut else after
        if host and _HOST.match(host):
            return host, after[len(host) :]
    return "", ""  # no host to be found: keep nothing of it


def _mask_pairs(text: str) -> str:
    """'a=1&token=x' -> 'a=1&token=***' (pairs whose name looks secret)."""
    pairs = []
    for pair in text.split("&"):
        name, sep, _ = pair.partition("=")
        pairs.append(f"{name}{sep}{MASK}" if sep and is_secret_key(name) else pair)
    return "&".join(pairs)


def redact_url(url: str) -> str:
    """The URL without userinfo, with secret-looking query and fragment values replaced by '***'.

    Plain paths and URLs without '@', '?' or '#' come back unchanged (the fast path for ledger
    columns). Item keys are derived from this form, so a key never carries a credential either.
    """
    if "@" not in url and "?" not in url and "#" not in url:
        return url
    scheme = _SCHEME.match(url)
    if scheme:
        host, tail = _split_authority(url[scheme.end() :])
        head = f"{scheme.group(1)}//{host}"
    else:
        head, tail = "", url
    tail, hash_, fragment = tail.partition("#")
    path, mark, query = tail.partition("?")
    out = head + path + (mark + _mask_pairs(query) if mark else "")
    return out + (hash_ + (_mask_pairs(fragment) if "=" in fragment else fragment) if hash_ else "")


def redact_options(opts: Any) -> Any:
    """An option tree (storage options, a whole config) with the values of secret-looking keys
    replaced by '***' at any depth (empty values are left: they show that no secret is set) and
    every string value redacted as text (URLs inside it lose their credentials)."""
    if isinstance(opts, dict):
        return {
            k: (MASK if is_secret_key(k) and v not in (None, "", {}, []) else redact_options(v))
            for k, v in opts.items()
        }
    if isinstance(opts, (list, tuple)):
        return [redact_options(v) for v in opts]
    if isinstance(opts, str):
        return redact_text(opts)
    return opts


def redact_text(text: str) -> str:
    """A message or log line with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text
