"""One redaction rule for everything stored or logged: storage options, URLs, messages.

Secret-looking names (`is_secret_key`: secret, token, password, key, credential, session, auth,
signature, sig, sas, cookie, policy, ...) have their values replaced by "***" - as storage-option
keys and as URL query parameters (token=, sig=, X-Amz-Signature=, X-Goog-Signature=, access_token=,
X-Amz-Credential=, ...). URL userinfo (user:password@) is dropped. Used for ledger and plan columns,
the manifest's config, log lines and error messages, so a credential given in a URL or in the
config never lands on disk or in a terminal.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

_SECRET = re.compile(
    r"secret|token|password|passwd|pwd|key|credential|session|auth|signature|sig|sas|cookie|policy|jwt", re.I
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
MASK = "***"


def is_secret_key(name: Any) -> bool:
    """True for option keys / query parameter names whose values must never be stored or shown."""
    return bool(_SECRET.search(str(name)))


def redact_url(url: str) -> str:
    """The URL without userinfo and with secret-looking query values replaced by '***'.

    Plain paths and URLs without "@" or "?" come back unchanged (the fast path for ledger columns).
    """
    if "@" not in url and "?" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = []
    for pair in parts.query.split("&") if parts.query else []:
        name, sep, _ = pair.partition("=")
        query.append(f"{name}{sep}{MASK}" if sep and is_secret_key(name) else pair)
    out = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
    return out + ("?" + "&".join(query) if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def redact_options(opts: Any) -> Any:
    """Storage options with the values of secret-looking keys replaced by '***' (nested dicts/lists)."""
    if isinstance(opts, dict):
        return {k: (MASK if is_secret_key(k) else redact_options(v)) for k, v in opts.items()}
    if isinstance(opts, list):
        return [redact_options(v) for v in opts]
    return opts


def redact_text(text: str) -> str:
    """A message or log line with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text
