"""Reading one input slice's rows: url, label and key cells plus the kept columns' values.

Worker side (and the planner's label/key passes). A text slice is the byte range the planner cut
(of the decompressed stream for a compressed list); a parquet slice reads only its row groups and
only the columns it needs. Values come in the order of the columns asked for: str, int, float,
bool or None (null), or `columns.Unfit` for a JSON value its column's sampled type cannot hold
or a JSON Lines row that is not an object (that item fails, not the shard). Text values longer than the plan's `text_limit` bytes are cut here to
`text_limit + 1` characters, so a giant cell is held once, briefly, and the worker's cap
(convert.itemcols) still sees it over the limit and counts it as truncated.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

from ..specs import InputSlice
from .base import SourceError
from .columns import ROLES, Unfit, arrow_type, fit, parse_object, roles
from .lists import (
    _BOM,
    BLOCK,
    ROW_MODES,
    WS,
    inflate_all,
    inflating,
    item_spans,
    open_raw,
    open_stream,
    parquet_file,
    row_ends,
    split_kind,
)
from .seekable import frame_start

Row = tuple[int, str, Any, Any, tuple[Any, ...]]  # (global row index, url, label cell, key cell, column values)
# A CSV cell may be as long as its row (csv's default limit of 128 Ki characters raises on more):
# bounded by the slice, and text values are cut right after parsing.
csv.field_size_limit(2**31 - 1)
_STR_WS = WS.decode()


def read_rows(
    sl: InputSlice,
    storage_options: dict[str, Any] | None,
    columns: Sequence[str] = (),
    types: Sequence[str] = (),
    text_limit: int = 0,
) -> Iterator[Row]:
    """The rows of a list slice (or a folder listing slice) with the values of `columns`."""
    fmt = split_kind(sl.kind)[0]
    if fmt == "parquet":
        return _parquet_rows(sl, storage_options, tuple(columns), tuple(types), text_limit)
    return _text_rows(sl, storage_options, tuple(columns), tuple(types), text_limit)


def clip(value: Any, limit: int) -> Any:
    """A text value cut to `limit + 1` characters when longer (0: no limit)."""
    if limit and isinstance(value, str) and len(value) > limit + 1:
        return value[: limit + 1]
    return value


def _slice_bytes(sl: InputSlice, storage_options: dict[str, Any] | None, mode: str) -> tuple[bytes, bytes]:
    """(header row, the slice's bytes) of a text slice. A compressed stream is read from its start
    (the header) and then from the frame holding the slice (a seekable .zst) or on from there."""
    codec = split_kind(sl.kind)[1]
    with open_raw(sl.uri, sl.kind, storage_options, sl.size) as raw:
        entry = frame_start(raw, sl.size, sl.start) if codec == "zst" and sl.start else None
        raw.seek(0)
        f = inflating(raw, codec, sl.uri) if codec else raw
        header, head = _first_row(f, mode) if mode in ("csv", "tsv") else (b"", b"")
        if not codec:
            f.seek(sl.start)
            return header, f.read(sl.stop - sl.start)
        pos, parts = len(head), [head[sl.start : sl.stop]]
        if entry is not None and entry[1] > pos:  # enter the stream at the slice's own frame
            raw.seek(entry[0])
            f, pos = inflating(raw, codec, sl.uri), entry[1]
        while pos < sl.stop:
            chunk = f.read(min(BLOCK, sl.stop - pos))
            if not chunk:
                break
            if pos + len(chunk) > sl.start:
                parts.append(chunk[max(0, sl.start - pos) :])
            pos += len(chunk)
        return header, b"".join(parts)


def _first_row(f: Any, mode: str) -> tuple[bytes, bytes]:
    """(a CSV/TSV's header row, every byte read so far) - read in growing steps until its end."""
    head = b""
    while True:
        more = f.read(max(1 << 16, len(head)))
        head += more
        body = head.removeprefix(_BOM)
        ends = row_ends(body, mode)
        if len(ends) or not more:
            return (body[: int(ends[0])] if len(ends) else body), head


def header_names(header: bytes, mode: str) -> list[str]:
    """A CSV/TSV header's column names (stripped)."""
    text = header.decode("utf-8", "replace")
    cells = text.rstrip("\r").split("\t") if mode == "tsv" else next(csv.reader([text]), [])
    return [name.strip() for name in cells]


def _text_rows(
    sl: InputSlice, storage_options: dict[str, Any] | None, columns: tuple[str, ...], types: tuple[str, ...], limit: int
) -> Iterator[Row]:
    fmt = split_kind(sl.kind)[0]
    mode = ROW_MODES[fmt]
    header, buf = _slice_bytes(sl, storage_options, mode)
    if sl.version.startswith("sha256:") and hashlib.sha256(buf).hexdigest() != sl.version[7:]:
        raise SourceError(f"{sl.uri} bytes {sl.start}-{sl.stop} changed since planning; rerun to plan again")
    if not buf.endswith(b"\n"):
        buf += b"\n"
    starts, ends, _ = item_spans(buf, mode)
    view = memoryview(buf)  # decoded from the buffer itself: a giant row is not copied first
    texts = (str(view[s:e], "utf-8", "replace") for s, e in zip(starts.tolist(), ends.tolist()))
    if fmt == "jsonl":
        yield from _json_rows(sl, texts, columns, types, limit)
    elif mode == "lines":
        for j, text in enumerate(texts):
            yield sl.first_row + j, text.strip(_STR_WS), None, None, ()
    else:
        yield from _table_rows(sl, header_names(header, mode), texts, mode, columns, limit)


def _table_rows(
    sl: InputSlice, names: list[str], texts: Iterator[str], mode: str, columns: tuple[str, ...], limit: int
) -> Iterator[Row]:
    index = {name: i for i, name in enumerate(names)}
    found = roles(names)
    if "url" not in found:
        raise SourceError(
            f"URL list {sl.uri!r} has no 'url' column (found: {', '.join(map(repr, names)) or 'none'}); "
            "rename the URL column to 'url'"
        )
    url, label, key = (index.get(found.get(r, "")) for r in ROLES)
    wanted = [index.get(c) for c in columns]
    # one csv reader over the spans: each span is one whole record (quoted newlines included), so
    # it yields exactly one row per span ([] for an empty one) - a reader per row cost ~5 us/item
    rows = (t.rstrip("\r").split("\t") for t in texts) if mode == "tsv" else csv.reader(texts)
    for j, cells in enumerate(rows):
        n = len(cells)
        values = tuple(clip(cells[i], limit) or None if i is not None and i < n else None for i in wanted)
        yield sl.first_row + j, _cell(cells, url) or "", _cell(cells, label), _cell(cells, key), values


def _cell(cells: list[str], index: int | None) -> str | None:
    if index is None or index >= len(cells):
        return None
    return cells[index].strip() or None


def _json_rows(
    sl: InputSlice, texts: Iterator[str], columns: tuple[str, ...], types: tuple[str, ...], limit: int
) -> Iterator[Row]:
    for j, text in enumerate(texts):
        try:
            obj = parse_object(text, sl.uri, sl.first_row + j)
        except SourceError as exc:  # one bad row past the planner's sample: that item fails, not the shard
            yield sl.first_row + j, "", None, None, (Unfit(str(exc)),) + (None,) * max(0, len(columns) - 1)
            continue
        url, label, key = (_role(obj, r) for r in ROLES)
        where = f"URL list {sl.uri!r} item row {sl.first_row + j + 1}"
        values = tuple(clip(fit(obj.get(c), t, where, c), limit) for c, t in zip(columns, types))
        yield sl.first_row + j, str(url if url is not None else "").strip(), label, key, values


def _role(obj: dict[str, Any], role: str) -> Any:
    if role in obj:
        return obj[role]
    return next((v for k, v in obj.items() if k.lower() == role), None)


def _parquet_rows(
    sl: InputSlice, storage_options: dict[str, Any] | None, columns: tuple[str, ...], types: tuple[str, ...], limit: int
) -> Iterator[Row]:
    """The rows [start, stop) of a parquet list: only the row groups and columns they need."""
    with open_stream(sl.uri, sl.kind, storage_options, sl.size) as f:
        pf = parquet_file(inflate_all(f, sl.uri) if split_kind(sl.kind)[1] else f, sl.uri)
        found = roles(pf.schema_arrow.names)
        if "url" not in found:
            raise SourceError(f"URL list {sl.uri!r} has no 'url' column; rename the URL column to 'url'")
        meta = pf.metadata
        groups: list[int] = []
        first, at = 0, 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if at < sl.stop and at + n > sl.start:
                first = at if not groups else first
                groups.append(g)
            at += n
        wanted = list(dict.fromkeys([found[r] for r in ROLES if r in found] + list(columns)))
        table = pf.read_row_groups(groups, columns=wanted) if groups else None
    if table is None:
        return
    table = table.slice(sl.start - first, sl.stop - sl.start)
    n = table.num_rows
    url, label, key = (
        _pylist(table, found[r], "int64" if r == "label" else "string", sl.uri) if r in found else [None] * n
        for r in ROLES
    )
    values = [[clip(v, limit) for v in _pylist(table, c, t, sl.uri)] for c, t in zip(columns, types)]
    for j in range(n):
        yield sl.first_row + j, str(url[j] or "").strip(), label[j], key[j], tuple(col[j] for col in values)


def _pylist(table: Any, name: str, kind: str, uri: str) -> list[Any]:
    """One column as Python values of its kept type (see convert.sources.columns)."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return col.to_pylist()
        except UnicodeDecodeError:  # parquet does not validate UTF-8: replace, the worker counts it
            raw = col.cast(pa.large_binary() if pa.types.is_large_string(t) else pa.binary()).to_pylist()
            return [None if v is None else v.decode("utf-8", "replace") for v in raw]
    if kind != "string" or arrow_type(t) != "string":
        return col.to_pylist()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [None if v is None else v.hex() for v in col.to_pylist()]
    return [None if v is None else v if isinstance(v, str) else _text(v) for v in col.to_pylist()]


def _text(value: Any) -> str:
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)
