"""Input sources: plan a folder/glob, URL list(s) or CIFAR batches as shard slices (never items, never bytes).

`plan_source(cfg, shard_size, work)` is the planner's entry point: it returns the shard specs (each
naming its input slices) and the label table, holding O(shards) state. `shard_refs(spec, ...)` is
the worker's: the ItemRefs of one shard, read from its slices. `list_source(cfg)` materialises every
item (tests, small sources). `detect_kind(uri)` picks the lister when cfg.kind == "auto".
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..config import SourceConfig
from ..fetch.prefetch import prefetch
from ..plan import cut_rows, make_specs
from ..specs import Column, InputSlice, ItemRef, ShardSpec, SourceRef
from .base import IMAGE_EXTENSIONS, SourceError, SourceListing, Workdir, list_dir, open_fs, safe_key
from .cifar import cifar_refs, is_cifar_uri, plan_cifar, read_member
from .columns import Unfit
from .folder import folder_refs, plan_folder
from .lists import LIST_SUFFIXES, open_list
from .rows import read_rows
from .urls import ColumnChoice, plan_urls, url_refs

LABELS = "partitions/labels.json"
PASS_THREADS = 8


@dataclass(frozen=True)
class SourcePlan:
    """What the planner found: shard specs (slices, not items), label names, counts."""

    kind: str
    specs: list[ShardSpec]
    label_names: list[str] | None
    items: int
    partitions: int  # list files, listing groups or CIFAR batches
    columns: tuple[Column, ...] = ()  # the kept columns of a list source (caption first), names as stored
    digests: tuple[str, ...] = ()  # per spec of a text list: its slice's digest (`run --append` checks them)


def detect_kind(uri: str) -> str:
    """'urls' for list files (.txt/.csv/.tsv/.jsonl/.json/.parquet, optionally .gz/.zst/.bz2), 'cifar'
    for CIFAR batch files/folders, else 'folder' (no I/O)."""
    name = posixpath.basename(uri.split("?", 1)[0].rstrip("/"))
    if name.lower().endswith(LIST_SUFFIXES):
        return "urls"
    if is_cifar_uri(uri):
        return "cifar"
    return "folder"


def resolve_kind(cfg: SourceConfig) -> str:
    """cfg.kind, or the detected one; a folder holding only list files is a set of URL lists."""
    kind = detect_kind(cfg.uri) if cfg.kind == "auto" else cfg.kind
    if cfg.kind == "auto" and kind == "folder":
        fs, path = open_fs(cfg.uri, cfg.storage_options)
        if fs.isdir(path):
            entries = list_dir(fs, path)
            names = [posixpath.basename(name.rstrip("/")).lower() for name, kind in entries if kind == "file"]
            lists = [n for n in names if n.endswith(LIST_SUFFIXES)]
            images = [n for n in names if posixpath.splitext(n)[1] in IMAGE_EXTENSIONS]
            if lists and not images and all(kind == "file" for _, kind in entries):
                return "urls"
    return kind


def thread_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """Ordered map on a few threads with a bounded number in flight (listing and column passes are
    I/O and pyarrow bound); results stream in input order, so O(threads) are held at a time."""
    results = prefetch(items, fn, depth=PASS_THREADS)
    try:
        for got in results:
            if got.error is not None:
                raise got.error
            yield got.value
    finally:
        results.close()


def plan_source(
    cfg: SourceConfig, shard_size: int, work: Workdir, map_fn: Callable[..., Any] = thread_map
) -> SourcePlan:
    """Plan the configured source into shards of `shard_size` items, in deterministic order."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    kind = resolve_kind(cfg)
    columns: tuple[Column, ...] = ()
    digests: tuple[str, ...] = ()
    if kind == "urls":
        want = ColumnChoice(cfg.caption_column, cfg.columns, cfg.hash_column)
        up = plan_urls(cfg.uri, cfg.storage_options, shard_size, map_fn, want)
        groups: list[tuple[InputSlice, ...]]
        groups, names, parts, columns = [(s,) for s in up.slices], up.label_names, up.files, up.choice.stored
        digests = tuple(up.digests)
        source = SourceRef(
            "urls",
            keys="explicit" if up.explicit_keys else "derived",
            columns=up.choice.read,
            column_types=tuple(c.type for c in columns),
            text_limit=cfg.max_text_bytes,
        )
    elif kind == "cifar":
        batches, names = plan_cifar(cfg.uri, cfg.storage_options)
        groups, parts, source = cut_rows(batches, "cifar", shard_size), len(batches), SourceRef("cifar")
    else:
        fp = plan_folder(cfg.uri, cfg.storage_options, cfg.labels, shard_size, work)
        groups, names, parts, source = (
            [(s,) for s in fp.slices],
            fp.label_names,
            fp.groups,
            SourceRef("folder", fp.root),
        )
    if names is not None and kind != "cifar":
        data = json.dumps(names).encode()
        with work.create(LABELS) as f:
            f.write(data)
        source = replace(source, labels=work.url(LABELS), labels_sha=hashlib.sha256(data).hexdigest()[:16])
    specs = make_specs(groups, source)
    return SourcePlan(kind, specs, names, sum(len(s) for s in specs), parts, columns, digests)


_LABEL_CACHE: dict[tuple[str, str], dict[str, int]] = {}
_LABEL_LOCK = threading.Lock()


def _label_index(source: SourceRef, options: dict[str, Any] | None) -> dict[str, int] | None:
    """name -> id from the plan's label table (read once per process; checked against its digest)."""
    if not source.labels:
        return None
    with _LABEL_LOCK:
        found = _LABEL_CACHE.get((source.labels, source.labels_sha))
        if found is None:
            with open_list(source.labels, options) as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest()[:16] != source.labels_sha:
                raise SourceError(f"{source.labels} changed since planning; rerun the same command to plan again")
            if len(_LABEL_CACHE) > 8:
                _LABEL_CACHE.clear()
            found = _LABEL_CACHE[(source.labels, source.labels_sha)] = {n: i for i, n in enumerate(json.loads(data))}
        return found


def shard_refs(
    spec: ShardSpec,
    source_options: dict[str, Any] | None,
    work_options: dict[str, Any] | None = None,
    on_unfit: str = "raise",
) -> Iterator[ItemRef]:
    """The ItemRefs of one shard, in order, read from its slices (worker side).

    `source_options` open the input files; `work_options` the planner's files (output root).
    A JSON Lines row that is not an object, or a value its column's sampled type cannot hold:
    `on_unfit="raise"` (SourceError)
    or `"keep"` (a `columns.Unfit` in its place, for the worker to fail that item alone).
    """
    names = _label_index(spec.source, work_options)
    for i, sl in enumerate(spec.slices):
        refs = _slice_refs(sl, spec.source, names, source_options, work_options)
        refs = refs if i == 0 else (replace(ref, slice=i) for ref in refs)  # its fetch policy: policies[i]
        yield from (refs if on_unfit == "keep" else _raise_unfit(refs))


def _raise_unfit(refs: Iterator[ItemRef]) -> Iterator[ItemRef]:
    for ref in refs:
        unfit = next((v for v in ref.columns if isinstance(v, Unfit)), None)
        if unfit is not None:
            raise SourceError(unfit.message)
        yield ref


def _slice_refs(
    sl: InputSlice, source: SourceRef, names: dict[str, int] | None, source_options: Any, work_options: Any
) -> Iterator[ItemRef]:
    if sl.kind == "cifar":
        yield from cifar_refs(sl.uri, sl.start, sl.stop, source_options)
    elif sl.kind == "folder":
        yield from folder_refs(read_rows(sl, work_options), source.root, names)
    else:
        yield from url_refs([sl], source_options, names, source)


def list_source(cfg: SourceConfig) -> SourceListing:
    """Every item of the configured source, in order, with the label names table (small sources)."""
    with tempfile.TemporaryDirectory(prefix="convert-list-") as tmp:
        plan = plan_source(cfg, 1 << 20, Workdir(tmp))
        items = [ref for spec in plan.specs for ref in shard_refs(spec, cfg.storage_options)]
    for i, ref in enumerate(items):
        if not ref.uri:
            raise SourceError(f"URL list {cfg.uri!r} row {i + 1} has an empty url; fill it in or delete the row")
    return SourceListing(kind=plan.kind, items=items, label_names=plan.label_names)


__all__ = [
    "SourceError",
    "SourceListing",
    "SourcePlan",
    "Workdir",
    "detect_kind",
    "list_source",
    "plan_source",
    "read_member",
    "resolve_kind",
    "safe_key",
    "shard_refs",
]
