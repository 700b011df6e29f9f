"""Input sources: list a folder/glob, a URL list or CIFAR batches as ItemRefs (never bytes).

`list_source(cfg)` is the entry point; `detect_kind(uri)` picks the lister when cfg.kind == "auto";
`read_member(uri, row)` reads one image out of a CIFAR batch on a worker.
"""

from __future__ import annotations

import posixpath

from ..config import SourceConfig
from .base import SourceError, SourceListing, safe_key
from .cifar import is_cifar_uri, list_cifar, read_member
from .folder import list_folder
from .urls import LIST_SUFFIXES, list_urls


def detect_kind(uri: str) -> str:
    """'urls' for .txt/.csv/.parquet, 'cifar' for CIFAR batch files/folders, else 'folder' (no I/O)."""
    name = posixpath.basename(uri.split("?", 1)[0].rstrip("/"))
    if name.lower().endswith(LIST_SUFFIXES):
        return "urls"
    if is_cifar_uri(uri):
        return "cifar"
    return "folder"


def list_source(cfg: SourceConfig) -> SourceListing:
    """All items of the configured source, in deterministic order, with the label names table."""
    kind = detect_kind(cfg.uri) if cfg.kind == "auto" else cfg.kind
    if kind == "urls":
        return list_urls(cfg.uri, cfg.storage_options)
    if kind == "cifar":
        return list_cifar(cfg.uri, cfg.storage_options)
    return list_folder(cfg.uri, cfg.storage_options, cfg.labels)


__all__ = ["SourceError", "SourceListing", "detect_kind", "list_source", "read_member", "safe_key"]
