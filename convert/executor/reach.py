"""Which local paths Dask workers can see: loopback schedulers, declared shared filesystems.

`check_reachable_paths(uris, handle)` refuses local paths that workers on other hosts may not see,
with the fix (an object store, or a shared filesystem declared with $CONVERT_SHARED_PATHS).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

#: os.pathsep-separated prefixes that every worker host sees at the same path
SHARED_PATHS_ENV = "CONVERT_SHARED_PATHS"


def is_loopback(address: str) -> bool:
    """True when a scheduler address (tcp://host:port) points at this machine's loopback."""
    host = urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(i[4][0]).is_loopback for i in socket.getaddrinfo(host, None))
        except OSError:
            return False


def _local_path(uri: str) -> str | None:
    """The filesystem path of a local URI (no scheme or file://), else None."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return parts.path
    if parts.scheme == "" or len(parts.scheme) == 1:  # plain path (or a Windows drive letter)
        return uri
    return None


def _declared_shared(handle: Any, shared_paths: Sequence[str] | None) -> tuple[bool, list[str]]:
    if getattr(handle.config, "shared_filesystem", False):
        return True, []
    if shared_paths is None:
        shared_paths = [p for p in os.environ.get(SHARED_PATHS_ENV, "").split(os.pathsep) if p]
    return False, [os.path.realpath(os.path.expanduser(p)) for p in shared_paths]


def check_reachable_paths(uris: Sequence[str], handle: Any, *, shared_paths: Sequence[str] | None = None) -> None:
    """Raise ValueError for local paths that workers on other hosts may not see.

    Local paths are fine for a LocalCluster or a scheduler on loopback (every worker runs here),
    when the config declares ``shared_filesystem: true``, or when they lie under a declared shared
    prefix (`shared_paths`, default $CONVERT_SHARED_PATHS, os.pathsep-separated).
    """
    if not handle.shared_filesystem_required or is_loopback(handle.scheduler_address):
        return
    everything, prefixes = _declared_shared(handle, shared_paths)
    if everything:
        return
    for uri in uris:
        path = _local_path(uri)
        if path is None:
            continue
        real = os.path.realpath(os.path.expanduser(path))
        if any(real == p or real.startswith(p.rstrip(os.sep) + os.sep) for p in prefixes):
            continue
        raise ValueError(
            f"{uri!r} is a local path, but workers of {handle.description} may run on other hosts and "
            f"not see it; put the data on an object store (s3://bucket/...) or a shared filesystem "
            f"mounted at the same path on every node and declare it: export {SHARED_PATHS_ENV}="
            f"{os.path.dirname(real) or real}"
        )
