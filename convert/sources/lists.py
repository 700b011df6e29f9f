"""URL-list files as partitions: row offsets of .txt/.csv lists, row groups of .parquet lists.

The planner never holds a list's rows: a text list is scanned once in 8 MiB blocks with numpy,
recording the byte offset of every `step`-th row; a parquet list's row counts come from its footer.
A shard task later reads exactly its slice (`read_rows`) through the resilient reader.

Row rules (the planner and the worker use the same code, so their counts always agree):
- rows end at "\\n" ("\\r\\n" works: ASCII whitespace is stripped); a UTF-8 BOM at the start is skipped;
- .txt: a row is an item unless it is blank or starts with "#" (after ASCII whitespace);
- .csv: the first row is the header; a newline inside a double-quoted field belongs to the row
  (quote parity, RFC 4180 - a stray quote inside an unquoted field is not supported); a row holding
  only whitespace, commas and quote characters is blank and skipped.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..specs import InputSlice
from ..store import is_local
from .base import SourceError, full_uri, has_magic, open_fs

LIST_SUFFIXES = (".txt", ".csv", ".parquet")
BLOCK = 8 << 20
WS = b" \t\r\n\x0b\x0c"
_BOM = codecs.BOM_UTF8
Row = tuple[int, str, Any, Any]  # (global row index, url, label cell, key cell)


def _table(chars: bytes) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(chars)] = True
    return table


_SPECIAL = {False: _table(WS + b"#"), True: _table(WS + b',"')}  # first bytes that need a closer look


@dataclass(frozen=True)
class ListFile:
    """One list file as planned: where it is and what it was (size, version)."""

    uri: str  # full URI the fetch layer can open
    suffix: str
    size: int
    version: str
    base: str  # the list's directory: relative entries resolve against it


def find_lists(uri: str, storage_options: dict[str, Any] | None) -> list[ListFile]:
    """The list files a source names: one file, a glob, or a folder of list files; sorted by path."""
    fs, path = open_fs(uri, storage_options)
    try:
        info = None if has_magic(path) else fs.info(path)
    except FileNotFoundError:
        raise SourceError(f"URL list {uri!r} not found; check the path (and storage_options for object stores)") from None
    if info is None:
        infos = fs.glob(path, detail=True)
    elif info.get("type") == "directory":
        infos = {i["name"]: i for i in fs.ls(path, detail=True)}
    else:
        infos = {path: info}
    files = []
    for p in sorted(infos):
        info = infos[p]
        suffix = posixpath.splitext(p)[1].lower()
        if info.get("type") != "file" or suffix not in LIST_SUFFIXES:
            continue
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        files.append(ListFile(full_uri(fs, p), suffix, int(info.get("size") or 0), f"{info.get('size')}-{version}",
                              full_uri(fs, posixpath.dirname(p))))  # fmt: skip
    if not files:
        raise SourceError(f"no URL lists (.txt, .csv, .parquet) in {uri!r}; check the path or pattern")
    return files


def open_list(uri: str, storage_options: dict[str, Any] | None) -> Any:
    """A seekable binary file: plain open for local lists, the resilient reader for remote ones."""
    if is_local(uri):
        return open(uri.removeprefix("file://"), "rb")
    from ..fetch.resilient import open_resilient

    return open_resilient(uri, storage_options)


def _row_ends(buf: bytes, csv_rows: bool) -> np.ndarray:
    """Positions of the newlines that end rows (for CSV: outside double quotes; `buf` starts a row)."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    nl = np.flatnonzero(arr == 10)
    if csv_rows and b'"' in buf:
        nl = nl[np.searchsorted(np.flatnonzero(arr == 34), nl) % 2 == 0]
    return nl


def item_spans(buf: bytes, csv_rows: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(starts, ends) of the item rows completed in `buf`, and the bytes consumed.

    `buf` starts at a row boundary; bytes after the last row end are not consumed (the caller
    carries them into the next block).
    """
    nl = _row_ends(buf, csv_rows)
    if not len(nl):
        return nl, nl, 0
    arr = np.frombuffer(buf, dtype=np.uint8)
    starts = np.concatenate(([0], nl[:-1] + 1))
    first = np.where(starts < nl, arr[np.minimum(starts, len(arr) - 1)], 10)
    keep = ~_SPECIAL[csv_rows][first]
    for i in np.flatnonzero(~keep):  # blank, comment or indented rows: the rare, slow path
        line = buf[starts[i] : nl[i]]
        stripped = line.strip(WS + b',"') if csv_rows else line.strip(WS)
        keep[i] = bool(stripped) and (csv_rows or not stripped.startswith(b"#"))
    return starts[keep], nl[keep], int(nl[-1]) + 1


@dataclass(frozen=True)
class TextScan:
    offsets: list[int]  # byte offset of items 0, step, 2*step, ...
    count: int
    header: bytes  # CSV header row (b"" for .txt)


def scan_text(f: Any, step: int, csv_rows: bool, uri: str) -> TextScan:
    """One streaming pass over a text list: item count and the offset of every step-th item."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offsets: list[int] = []
    count, pos, carry, header = 0, 0, b"", None if csv_rows else b""
    while True:
        block = f.read(BLOCK)
        try:
            decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            raise SourceError(f"URL list {uri!r} is not UTF-8 text (near byte {pos + len(carry) + exc.start}); "
                              "re-save it as UTF-8") from None  # fmt: skip
        if pos == 0 and not carry and block.startswith(_BOM):
            block, pos = block[len(_BOM) :], len(_BOM)
        buf = carry + block
        if not block and buf and not buf.endswith(b"\n"):
            buf += b"\n"  # the last row needs no newline
        if header is None:  # CSV: the first row is the header
            ends = _row_ends(buf, True)
            if not len(ends) and block:
                carry = buf
                continue
            end = int(ends[0]) if len(ends) else len(buf)
            header, buf, pos = buf[:end], buf[end + 1 :], pos + end + 1
        starts, _, used = item_spans(buf, csv_rows)
        index = count + np.arange(len(starts))
        offsets.extend((starts[index % step == 0] + pos).tolist())
        count += len(starts)
        pos += used
        carry = buf[used:]
        if not block:
            break
    return TextScan(offsets, count, header)


def header_columns(header: bytes, uri: str) -> dict[str, int]:
    """{lower-case column name: index} of a CSV header row; needs a 'url' column."""
    cells = next(csv.reader(io.StringIO(header.decode("utf-8"), newline="")), [])
    cols = {name.strip().lower(): i for i, name in enumerate(cells)}
    require_url(cols, uri)
    return cols


def require_url(cols: dict[str, Any], uri: str) -> None:
    if "url" not in cols:
        found = ", ".join(repr(c) for c in cols) or "none"
        raise SourceError(f"URL list {uri!r} has no 'url' column (found: {found}); rename the URL column to 'url'")


def text_slices(lf: ListFile, scan: TextScan, step: int, first_row: int) -> list[InputSlice]:
    """One slice per `step` items of a scanned text list (the last may be shorter)."""
    ends = scan.offsets[1:] + [lf.size]
    kind = lf.suffix.lstrip(".")
    return [
        InputSlice(kind, lf.uri, lf.version, lf.size, start, stop, first_row + j * step, min(step, scan.count - j * step))
        for j, (start, stop) in enumerate(zip(scan.offsets, ends))
    ]


def read_text_rows(sl: InputSlice, storage_options: dict[str, Any] | None) -> Iterator[Row]:
    """The rows of a .txt / .csv slice (or a folder listing slice) as (index, url, label, key)."""
    csv_rows = sl.kind == "csv"
    with open_list(sl.uri, storage_options) as f:
        _check_size(f, sl)
        cols = header_columns(_first_row(f), sl.uri) if csv_rows else {}
        f.seek(sl.start)
        buf = f.read(sl.stop - sl.start)
    if sl.version.startswith("sha256:") and hashlib.sha256(buf).hexdigest() != sl.version[7:]:
        raise SourceError(f"{sl.uri} bytes {sl.start}-{sl.stop} changed since planning; rerun to plan again")
    if not buf.endswith(b"\n"):
        buf += b"\n"
    starts, ends, _ = item_spans(buf, csv_rows)
    texts = (buf[s:e].decode("utf-8") for s, e in zip(starts.tolist(), ends.tolist()))
    if not csv_rows:
        for j, text in enumerate(texts):
            yield sl.first_row + j, text.strip(WS.decode()), None, None
        return
    url, label, key = cols.get("url"), cols.get("label"), cols.get("key")
    # one reader over the spans: each span is one whole record (quoted newlines included), so it
    # yields exactly one row per span ([] for an empty one) - a reader per row cost ~5 us/item
    for j, cells in enumerate(csv.reader(texts)):
        yield sl.first_row + j, _cell(cells, url) or "", _cell(cells, label), _cell(cells, key)


def _check_size(f: Any, sl: InputSlice) -> None:
    """Refuse a list that changed size since planning (its slices would name other rows)."""
    size = getattr(f, "size", None)
    if size is None:
        size = os.fstat(f.fileno()).st_size
    if size != sl.size:
        raise SourceError(f"{sl.uri} changed since planning ({size} bytes, planned {sl.size}); "
                          "rerun the same command to plan again")  # fmt: skip


def _first_row(f: Any) -> bytes:
    """A CSV's header row (read in 64 KiB steps until its end)."""
    head = b""
    while True:
        more = f.read(1 << 16)
        head += more
        body = head[len(_BOM) :] if head.startswith(_BOM) else head
        ends = _row_ends(body, True)
        if len(ends) or not more:
            return body[: int(ends[0])] if len(ends) else body


def _cell(cells: list[str], index: int | None) -> str | None:
    if index is None or index >= len(cells):
        return None
    return cells[index].strip() or None


def parquet_file(f: Any, uri: str) -> Any:
    try:
        import pyarrow.parquet as pq  # lazy: only parquet lists need pyarrow
    except ImportError:
        raise SourceError(
            f"reading {uri!r} needs pyarrow; install it with: pip install 'convert[parquet]' (or pip install pyarrow)"
        ) from None
    try:
        return pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for non-parquet bytes
        raise SourceError(f"{uri!r} is not a readable parquet file ({exc}); check the file") from None


def parquet_columns(pf: Any, uri: str) -> dict[str, str]:
    cols = {name.strip().lower(): name for name in pf.schema_arrow.names}
    require_url(cols, uri)
    return cols


def read_parquet_rows(sl: InputSlice, storage_options: dict[str, Any] | None, columns: tuple[str, ...] = ("url", "label", "key")) -> Iterator[Row]:
    """The rows [start, stop) of a parquet list: only the row groups and columns they need."""
    with open_list(sl.uri, storage_options) as f:
        _check_size(f, sl)
        pf = parquet_file(f, sl.uri)
        cols = parquet_columns(pf, sl.uri)
        meta = pf.metadata
        groups, first, at = [], None, 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if at < sl.stop and at + n > sl.start:
                groups.append(g)
                first = at if first is None else first
            at += n
        wanted = [cols[c] for c in columns if c in cols]
        table = pf.read_row_groups(groups, columns=wanted) if groups else None
    if table is None:
        return
    table = table.slice(sl.start - (first or 0), sl.stop - sl.start)
    n = table.num_rows
    data = {c: table.column(cols[c]).to_pylist() if c in cols and c in columns else [None] * n for c in ("url", "label", "key")}
    for j, (u, lab, k) in enumerate(zip(data["url"], data["label"], data["key"])):
        yield sl.first_row + j, str(u or "").strip(), lab, k


def read_rows(sl: InputSlice, storage_options: dict[str, Any] | None) -> Iterator[Row]:
    return read_parquet_rows(sl, storage_options) if sl.kind == "parquet" else read_text_rows(sl, storage_options)


__all__ = ["LIST_SUFFIXES", "ListFile", "Row", "find_lists", "read_rows", "scan_text"]
