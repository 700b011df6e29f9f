"""URL-list sources: .txt (one URL a line), .csv, .tsv, .jsonl and .parquet (url, optional label, key,
and the kept columns: convert.sources.columns), each optionally compressed (convert.sources.lists).

`plan_urls` turns one list, a glob or a folder of lists (sorted by path) into shard specs whose slices
the workers read themselves (`url_refs`). Relative entries resolve against each list's directory.
Schemes are not checked here: the fetch layer turns disallowed ones into per-item BAD_URL rows.

Labels: integer label columns are used as they are; if any label is a name, every label gets an id
into the sorted table of distinct names, found by a pass over the label column per slice that
returns only the distinct names. Keys: derived keys start with the global row index, so they are
unique by construction; with a key column, a pass over the 64-bit hashes of every row's key checks
uniqueness across the whole source (8 bytes per row in the client, for key-column lists only).
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..redact import redact_url
from ..specs import InputSlice, ItemRef, SourceRef
from .base import SourceError, has_scheme, safe_key
from .columns import SAMPLE_ROWS, Choice, FileSchema, arrow_schema, choose, roles, sample_schema, text_schema, unify
from .lists import (
    ROW_MODES,
    ListFile,
    find_lists,
    inflate_all,
    open_stream,
    parquet_file,
    scan_text,
    split_kind,
    text_slices,
)
from .rows import header_names, read_rows

MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]  # ordered, like map()


@dataclass(frozen=True)
class ColumnChoice:
    """source.caption_column / columns / hash_column, as the planner applies them to each file."""

    caption: str = "none"
    columns: tuple[str, ...] | str = ()
    hash_column: str | None = None


@dataclass(frozen=True)
class _Scanned:
    slices: list[InputSlice]  # first_row relative to the file
    count: int
    columns: frozenset[str]  # of url / label / key present
    int_labels: bool  # parquet: the label column is an integer type (no pass needed)
    schema: FileSchema
    choice: Choice
    digests: list[str]  # per slice (text lists; "" for parquet): convert.sources.lists.slice_digest


def _scan(lf: ListFile, step: int, storage_options: dict[str, Any] | None, want: ColumnChoice) -> _Scanned:
    fmt, codec = split_kind(lf.kind)
    with open_stream(lf.uri, lf.kind, storage_options) as f:
        if fmt == "parquet":
            return _scan_parquet(lf, inflate_all(f, lf.uri) if codec else f, step, want)
        mode = ROW_MODES[fmt]
        scan = scan_text(f, step, mode, SAMPLE_ROWS if fmt == "jsonl" else 0)
    if fmt == "jsonl":
        schema = sample_schema(lf.uri, scan.sample)
        present = set(roles(schema.types))
        if scan.count:
            _require_url(present, schema)
    elif fmt == "txt":
        schema, present = FileSchema(lf.uri, {}), {"url"}
    else:
        schema = text_schema(lf.uri, header_names(scan.header, mode))
        present = set(roles(schema.types))
        _require_url(present, schema)
    return _Scanned(
        text_slices(lf, scan, step, 0),
        scan.count,
        frozenset(present),
        False,
        schema,
        choose(schema, want.caption, want.columns, want.hash_column),
        scan.digests,
    )


def _require_url(present: set[str], schema: FileSchema) -> None:
    if "url" not in present:
        found = ", ".join(repr(c) for c in schema.types) or "none"
        raise SourceError(
            f"URL list {schema.uri!r} has no 'url' column (found: {found}); rename the URL column to 'url'"
        )


def _scan_parquet(lf: ListFile, f: Any, step: int, want: ColumnChoice) -> _Scanned:
    import pyarrow as pa

    pf = parquet_file(f, lf.uri)  # the footer only: no row data is read here
    schema = arrow_schema(lf.uri, pf.schema_arrow)
    cols = roles(schema.types)
    _require_url(set(cols), schema)
    n = pf.metadata.num_rows
    slices = [
        InputSlice(lf.kind, lf.uri, lf.version, lf.size, a, min(a + step, n), a, min(step, n - a))
        for a in range(0, n, step)
    ]
    label_type = pf.schema_arrow.field(cols["label"]).type if "label" in cols else None
    int_labels = label_type is not None and pa.types.is_integer(label_type) and _min_label(pf, cols["label"]) >= 0
    choice = choose(schema, want.caption, want.columns, want.hash_column)
    return _Scanned(slices, n, frozenset(cols), int_labels, schema, choice, [""] * len(slices))


def _min_label(pf: Any, name: str) -> float:
    """Smallest label from row-group statistics (-1 when unknown: then the pass checks it)."""
    meta, idx = pf.metadata, pf.schema_arrow.get_field_index(name)
    lows = []
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(idx).statistics
        if stats is None or not stats.has_min_max:
            if stats is not None and stats.null_count == meta.row_group(g).num_rows:
                continue
            return -1
        lows.append(stats.min)
    return min(lows, default=0)


@dataclass(frozen=True)
class UrlPlan:
    slices: list[InputSlice]
    count: int
    files: int
    label_names: list[str] | None
    explicit_keys: bool
    choice: Choice  # the kept columns: names to read, stored names and types
    digests: list[str]  # per slice, "" where none (parquet)


def plan_urls(
    uri: str,
    storage_options: dict[str, Any] | None,
    step: int,
    map_fn: MapFn = map,
    want: ColumnChoice = ColumnChoice(),
) -> UrlPlan:
    """Slices of `step` rows over every list the source names, the label table and the kept
    columns (the same in every file); no rows kept."""
    files = find_lists(uri, storage_options)
    scanned = list(map_fn(lambda lf: _scan(lf, step, storage_options, want), files))
    choice = unify([(s.schema, s.choice) for s in scanned])
    slices: list[InputSlice] = []
    digests: list[str] = []
    at = 0
    for s in scanned:
        slices.extend(replace(sl, first_row=sl.first_row + at) for sl in s.slices)
        digests.extend(s.digests)
        at += s.count
    if not at:
        raise SourceError(f"URL list {uri!r} has no URLs; add one URL (or path) per line/row")
    has = frozenset().union(*(s.columns for s in scanned))
    names = None
    needs_labels = "label" in has and not all(s.int_labels or "label" not in s.columns for s in scanned)
    if needs_labels or "key" in has:
        names = _column_pass(slices, storage_options, "key" in has, uri, map_fn)
    return UrlPlan(slices, at, len(files), names, "key" in has, choice, digests)


@dataclass(frozen=True)
class _Facts:
    names: frozenset[str]
    all_int: bool
    lowest: int
    hashes: np.ndarray | None


def _slice_facts(sl: InputSlice, storage_options: dict[str, Any] | None, keys: bool, uri: str) -> _Facts:
    names: set[str] = set()
    all_int, lowest, hashes = True, 0, []
    for i, url, label, key, _ in read_rows(sl, storage_options):
        if not url:
            raise SourceError(f"URL list {uri!r} row {i + 1} has an empty url; fill it in or delete the row")
        if not _blank(label):
            names.add(str(label).strip())
            n = _as_int(label)
            all_int = all_int and n is not None
            lowest = min(lowest, n) if n is not None else lowest
        if keys:
            hashes.append(key_hash(item_key(i, url, key, uri)))
    arr = np.sort(np.array(hashes, dtype=np.uint64)) if keys else None
    return _Facts(frozenset(names), all_int, lowest, arr)


def _column_pass(
    slices: list[InputSlice], storage_options: dict[str, Any] | None, keys: bool, uri: str, map_fn: MapFn
) -> list[str] | None:
    """Label names (None for integer labels) and the cross-source key check, one task per slice;
    the per-slice facts are folded as they arrive (only the distinct names and key hashes stay)."""
    names: set[str] = set()
    all_int, lowest, hashes = True, 0, []
    for facts in map_fn(lambda sl: _slice_facts(sl, storage_options, keys, uri), slices):
        names |= facts.names
        all_int = all_int and facts.all_int
        lowest = min(lowest, facts.lowest)
        if facts.hashes is not None:
            hashes.append(facts.hashes)
    if keys:
        _check_keys(hashes, slices, storage_options, uri, map_fn)
    if all_int:
        if lowest < 0:
            raise SourceError(
                f"URL list {uri!r}: label {lowest} is negative; use ids >= 0 or class names, empty for unlabelled"
            )
        return None
    return sorted(names)


def _check_keys(
    parts: list[Any], slices: list[InputSlice], storage_options: dict[str, Any] | None, uri: str, map_fn: MapFn
) -> None:
    hashes = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
    same = hashes[1:][hashes[1:] == hashes[:-1]]
    if not len(same):
        return
    wanted = set(same.tolist())  # a second pass names the keys (and ignores true hash collisions)

    def matching(sl: InputSlice) -> list[str]:
        keys = (item_key(i, url, key, uri) for i, url, _, key, _ in read_rows(sl, storage_options))
        return [k for k in keys if key_hash(k) in wanted]

    counts = Counter(k for found in map_fn(matching, slices) for k in found)
    dupes = sorted(k for k, n in counts.items() if n > 1)
    if dupes:
        shown = ", ".join(repr(k) for k in dupes[:5])
        more = f" and {len(dupes) - 5} more" if len(dupes) > 5 else ""
        raise SourceError(f"{uri}: duplicate keys {shown}{more}; every item needs a distinct key")


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def item_key(i: int, url: str, key: Any, uri: str) -> str:
    """The explicit key of row i, or one derived from the row index (sorts in input order, never collides)."""
    if key not in (None, ""):
        try:
            return safe_key(str(key))
        except SourceError:
            raise SourceError(f"URL list {uri!r} row {i + 1}: key {key!r} has no usable characters; fix it") from None
    safe = redact_url(url)  # a key never carries credentials given in the URL
    stem = posixpath.splitext(posixpath.basename(safe.split("?", 1)[0].split("#", 1)[0].rstrip("/")))[0]
    return safe_key(f"{i:06d}-{stem}") if stem.strip() else f"{i:06d}"


def url_refs(
    slices: Iterable[InputSlice],
    storage_options: dict[str, Any] | None,
    names: dict[str, int] | None,
    source: SourceRef | None = None,
) -> Iterator[ItemRef]:
    """The ItemRefs of a shard's slices, read from the list files, with the values of the plan's
    kept columns (worker side)."""
    src = source or SourceRef("urls")
    for sl in slices:
        base = posixpath.dirname(sl.uri)
        for i, url, label, key, values in read_rows(sl, storage_options, src.columns, src.column_types, src.text_limit):
            yield ItemRef(
                key=item_key(i, url, key, sl.uri),
                uri=_resolve(url, base) if url else "",
                label=_label(label, names),
                columns=values,
            )


def _label(cell: Any, names: dict[str, int] | None) -> int | None:
    if _blank(cell):
        return None
    if names is not None:
        return names[str(cell).strip()]
    return _as_int(cell)


def _resolve(entry: str, base: str) -> str:
    """Absolute URLs and paths unchanged; relative paths joined onto the list's directory."""
    if has_scheme(entry) or entry.startswith("/"):
        return entry
    if has_scheme(base):  # remote list: keep the protocol, normalise "a/../b"
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, entry))}"
    return posixpath.normpath(posixpath.join(base, entry))


def _blank(cell: Any) -> bool:
    if cell is None:
        return True
    if isinstance(cell, float):
        return math.isnan(cell)  # pandas writes missing labels of a float column as NaN
    return isinstance(cell, str) and not cell.strip()


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(str(value).strip())
    except ValueError:
        return None
