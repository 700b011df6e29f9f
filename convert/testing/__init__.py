"""Real components for tests: HTTP servers, a fault proxy, a moto S3 server, image generators, and
`StoreTests` (the Store contract suite; loaded on first use, since it needs pytest)."""

from __future__ import annotations

from typing import Any

__all__ = ["StoreTests"]


def __getattr__(name: str) -> Any:
    if name == "StoreTests":  # optional dependency (pytest), loaded lazily like an fsspec backend
        from .store_tests import StoreTests

        return StoreTests
    raise AttributeError(f"module 'convert.testing' has no attribute {name!r}")
