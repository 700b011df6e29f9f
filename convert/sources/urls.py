"""URL-list sources: .txt (one URL a line), .csv and .parquet (columns url, optional label, key).

The list may live on any fsspec URL. Relative entries resolve against the list's directory.
Schemes are not checked here: the fetch layer turns disallowed ones into per-item BAD_URL rows.
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
from collections.abc import Iterable
from typing import Any

from ..specs import ItemRef
from .base import SourceError, SourceListing, full_uri, has_scheme, open_fs, require_unique, safe_key

LIST_SUFFIXES = (".txt", ".csv", ".parquet")
_COLUMNS = ("url", "label", "key")
Row = tuple[str, Any, Any]  # (url, label cell, key cell)


def list_urls(uri: str, storage_options: dict[str, Any] | None = None) -> SourceListing:
    """List the items of a .txt / .csv / .parquet URL list."""
    fs, path = open_fs(uri, storage_options)
    if not fs.isfile(path):
        raise SourceError(f"URL list {uri!r} not found; check the path (and storage_options for object stores)")
    suffix = posixpath.splitext(path)[1].lower()
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise SourceError(f"cannot read URL list {uri!r} ({exc}); check permissions / storage_options") from None
    if suffix == ".parquet":
        rows = _parquet_rows(raw, uri)
    elif suffix == ".csv":
        rows = _csv_rows(_text(raw, uri), uri)
    else:
        rows = _txt_rows(_text(raw, uri))
    if not rows:
        raise SourceError(f"URL list {uri!r} has no URLs; add one URL (or path) per line/row")
    base = full_uri(fs, posixpath.dirname(path))
    return _build(rows, base, uri)


def _text(raw: bytes, uri: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as exc:
        raise SourceError(f"URL list {uri!r} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None


def _txt_rows(text: str) -> list[Row]:
    lines = (line.strip() for line in text.splitlines())
    return [(line, None, None) for line in lines if line and not line.startswith("#")]


def _csv_rows(text: str, uri: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise SourceError(f"URL list {uri!r} is empty; expected a header row with a 'url' column")
    cols = {name.strip().lower(): i for i, name in enumerate(header)}
    _require_url(cols, uri)
    rows = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        get = lambda name: _cell(cells, cols.get(name))  # noqa: E731
        rows.append((get("url") or "", get("label"), get("key")))
    return rows


def _cell(cells: list[str], index: int | None) -> str | None:
    if index is None or index >= len(cells):
        return None
    return cells[index].strip() or None


def _parquet_rows(raw: bytes, uri: str) -> list[Row]:
    try:
        import pyarrow.parquet as pq  # lazy: only parquet lists need pyarrow
    except ImportError:
        raise SourceError(
            f"reading {uri!r} needs pyarrow; install it with: pip install 'convert[parquet]' (or pip install pyarrow)"
        ) from None
    try:
        pf = pq.ParquetFile(io.BytesIO(raw))
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for non-parquet bytes
        raise SourceError(f"{uri!r} is not a readable parquet file ({exc}); check the file") from None
    cols = {name.strip().lower(): name for name in pf.schema_arrow.names}
    _require_url(cols, uri)
    wanted = [cols[c] for c in _COLUMNS if c in cols]
    table = pf.read(columns=wanted)
    data = {c: table.column(cols[c]).to_pylist() for c in _COLUMNS if c in cols}
    n = table.num_rows
    urls, labels, keys = (data.get(c, [None] * n) for c in _COLUMNS)
    return [(str(u or "").strip(), lab, k) for u, lab, k in zip(urls, labels, keys)]


def _require_url(cols: dict[str, Any], uri: str) -> None:
    if "url" not in cols:
        found = ", ".join(repr(c) for c in cols) or "none"
        raise SourceError(f"URL list {uri!r} has no 'url' column (found: {found}); rename the URL column to 'url'")


def _build(rows: list[Row], base: str, uri: str) -> SourceListing:
    label_ids, label_names = _labels([r[1] for r in rows], uri)
    items = []
    for i, ((url, _, key), label) in enumerate(zip(rows, label_ids)):
        if not url:
            raise SourceError(f"URL list {uri!r} row {i + 1} has an empty url; fill it in or delete the row")
        if key not in (None, ""):
            k = _explicit_key(key, i, uri)
        else:  # derived: row index first, so keys sort in input order and never collide
            stem = posixpath.splitext(posixpath.basename(url.split("?", 1)[0].split("#", 1)[0].rstrip("/")))[0]
            k = safe_key(f"{i:06d}-{stem}") if stem.strip() else f"{i:06d}"
        items.append(ItemRef(key=k, uri=_resolve(url, base), label=label))
    require_unique([it.key for it in items], uri)
    return SourceListing(kind="urls", items=items, label_names=label_names)


def _explicit_key(key: Any, i: int, uri: str) -> str:
    try:
        return safe_key(str(key))
    except SourceError:
        raise SourceError(f"URL list {uri!r} row {i + 1}: key {key!r} has no usable characters; fix it") from None


def _resolve(entry: str, base: str) -> str:
    """Absolute URLs and paths unchanged; relative paths joined onto the list's directory."""
    if has_scheme(entry) or entry.startswith("/"):
        return entry
    if has_scheme(base):  # remote list: keep the protocol, normalise "a/../b"
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, entry))}"
    return posixpath.normpath(posixpath.join(base, entry))


def _labels(cells: Iterable[Any], uri: str) -> tuple[list[int | None], list[str] | None]:
    """Integer label ids as given; or, if any label is a name, ids into the sorted names table."""
    values = [None if _blank(c) else c for c in cells]
    ints = [None if v is None else _as_int(v) for v in values]
    if all(n is not None for n, v in zip(ints, values) if v is not None):
        negative = next((n for n in ints if n is not None and n < 0), None)
        if negative is not None:
            raise SourceError(
                f"URL list {uri!r}: label {negative} is negative; use ids >= 0 or class names, empty for unlabelled"
            )
        return ints, None
    names = sorted({str(v).strip() for v in values if v is not None})
    index = {n: i for i, n in enumerate(names)}
    return [None if v is None else index[str(v).strip()] for v in values], names


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
