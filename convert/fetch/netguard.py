"""Where HTTP may connect: a per-process DNS cache and the private-address guard.

Each new connection resolves its host once (cached per process: web lists repeat hosts), checks
every resolved address and connects to a checked address itself, so a second DNS answer cannot
slip in between the check and the connect (DNS rebinding). Redirects open new connections through
the same pool manager, so they are checked too. Integer, octal, hex and IPv6-mapped spellings of an
address are normalised by the resolver before the check (getaddrinfo("2130706433") is 127.0.0.1).

Refused: anything not globally routable (loopback, RFC 1918 private, link-local incl. cloud
metadata 169.254.169.254, CGNAT, unspecified, reserved, documentation), multicast, and IPv6 forms
embedding such an IPv4 address (::ffff:a.b.c.d, 6to4, Teredo, NAT64 64:ff9b::/96).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError

from .deadline import watched
from .errors import PrivateAddressError, PrivateNetworkRefused

DNS_TTL = 300.0  # seconds a resolved address list is reused
DNS_CACHE_MAX = 65_536  # hosts; the cache is cleared when full (bounded memory on huge crawls)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

_cache: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}
_cache_lock = threading.Lock()

__all__ = ["DNS_TTL", "PrivateAddressError", "PrivateNetworkRefused", "exempt", "is_public", "pool_classes", "resolve"]


def resolve(host: str, port: int) -> list[tuple[int, str]]:
    """(family, address) pairs for host:port, from the per-process cache when fresh."""
    key, now = (host, port), time.monotonic()
    hit = _cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addrs = list(dict.fromkeys((fam, str(sa[0])) for fam, _, _, _, sa in infos))
    with _cache_lock:
        if len(_cache) >= DNS_CACHE_MAX:
            _cache.clear()
        _cache[key] = (now + DNS_TTL, addrs)
    return addrs


def is_public(address: str) -> bool:
    """True only for globally routable unicast addresses (and IPv6 not embedding a private IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is that IPv4 address
            return is_public(str(ip.ipv4_mapped))
        embedded = [ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(e is not None and not is_public(str(e)) for e in embedded):
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


class _Resolving:
    """Mixin for urllib3 connections: resolve via the cache, check, connect to the checked IP."""

    guard = False
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # exempt despite not public

    def _new_conn(self):  # type: ignore[no-untyped-def]
        host, port = self._dns_host, self.port  # type: ignore[attr-defined]
        try:
            addrs = resolve(host, port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[attr-defined]
        if self.guard:
            public = [a for a in addrs if is_public(a[1]) or exempt(a[1], self.allowed)]
            if not public:
                raise PrivateAddressError(host, addrs[0][1] if addrs else "?")
            addrs = public
        last: BaseException | None = None
        try:
            for _, address in addrs:
                self._dns_host = address  # an IP literal: urllib3 connects without another lookup
                try:
                    return super()._new_conn()  # type: ignore[misc]
                except ConnectTimeoutError as exc:  # incl. NewConnectionError: try the next address
                    last = exc
            assert last is not None
            raise last
        finally:
            self._dns_host = host


def exempt(address: str, nets: tuple) -> bool:
    """True when `address` lies in one of the `nets` (fetch.allowed_networks)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    ip = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
    return any(ip.version == n.version and ip in n for n in nets)


class _HTTP(_Resolving, HTTPConnection):
    pass


class _HTTPS(_Resolving, HTTPSConnection):
    pass


class _WatchedPool(HTTPConnectionPool):
    """A pool whose requests (connect, send, status line and headers) end at the item deadline."""

    def _make_request(self, conn, *args, **kwargs):  # type: ignore[no-untyped-def]
        with watched(conn):
            return super()._make_request(conn, *args, **kwargs)


class _WatchedPoolS(_WatchedPool, HTTPSConnectionPool):
    pass


def pool_classes(guarded: bool, allowed: tuple[str, ...] = ()) -> dict[str, type[HTTPConnectionPool]]:
    """urllib3 `pool_classes_by_scheme` whose connections use the DNS cache and, if `guarded`,
    refuse non-public addresses except those in the `allowed` CIDRs (fetch.allowed_networks)."""
    attrs = {"guard": guarded, "allowed": tuple(ipaddress.ip_network(n, strict=False) for n in allowed)}
    http_cls = type("GuardedHTTPConnection", (_HTTP,), attrs)
    https_cls = type("GuardedHTTPSConnection", (_HTTPS,), attrs)
    return {
        "http": type("GuardedHTTPPool", (_WatchedPool,), {"ConnectionCls": http_cls}),
        "https": type("GuardedHTTPSPool", (_WatchedPoolS,), {"ConnectionCls": https_cls}),
    }
