"""The kept columns of a URL list: each file's schema, the configured choice, and typed values.

Decided on the client from what each list file declares: a CSV/TSV header, a parquet schema, or
for JSON Lines the union of the keys of its first `SAMPLE_ROWS` objects (`sample_schema`). The
choice (`choose`) is the caption first, stored as "caption" whatever the list calls it, then
`source.columns` (names, or "*" = every column but url/label/key and the caption), then
`source.hash_column` when not already kept. Every list file must give the same choice.

Types (`COLUMN_TYPES`): CSV/TSV cells are strings (CSV has no types; an empty cell is null);
parquet maps integers to int64 (uint64 to string), floats to float64, bool to bool, strings to
string, binary to its hex digits, anything else (dates, decimals, lists, structs) to its text;
JSON values keep their type, a column mixing int and float is float64, other mixes (and a column
null in the whole sample) are string. Worker side, `coerce` fits a JSON value to its column's type.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..specs import Column
from .base import SourceError

SAMPLE_ROWS = 1000  # JSON Lines: the objects whose keys and value types make a file's schema
MAX_COLUMNS = 1024
CAPTION = "caption"
AUTO_CAPTIONS = ("caption", "text", "TEXT", "txt")
ROLES = ("url", "label", "key")  # matched case-insensitively, never kept by "*"
RESERVED = frozenset({"image", "key", "label"})  # names of the stored item's own fields
_INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_NAME_BYTES = 255  # a stored column's name becomes an HDF5 dataset name / an LMDB key part
_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")  # a path separator or a control character (NUL included)


@dataclass(frozen=True)
class FileSchema:
    """What one list file declares: its columns (name -> type, in file order)."""

    uri: str
    types: dict[str, str | None]  # None: only nulls in a JSON sample (the type is still open)
    sampled: bool = False  # JSON Lines: types from a sample of rows, not declared

    def role(self, name: str) -> str | None:
        """The file's column for url / label / key, or None."""
        return roles(self.types).get(name)


def roles(names: Iterable[str]) -> dict[str, str]:
    """{'url' | 'label' | 'key': the column of that role} (any case); the later of two wins."""
    return {name.strip().lower(): name for name in names if name.strip().lower() in ROLES}


@dataclass(frozen=True)
class Choice:
    """The kept columns: the names to read from the list and how they are stored (same order)."""

    read: tuple[str, ...]
    stored: tuple[Column, ...]


def text_schema(uri: str, names: Sequence[str]) -> FileSchema:
    """A CSV/TSV header: every column a string; a name given twice is refused."""
    seen: dict[str, str | None] = {}
    for name in names:
        if name in seen:
            raise SourceError(f"URL list {uri!r}: column {name!r} appears twice in the header; rename one")
        if name:  # an unnamed column (a trailing comma) is not kept
            seen[name] = "string"
    return FileSchema(uri, seen)


def arrow_type(t: Any) -> str:
    """The column type a parquet (arrow) type is kept as."""
    import pyarrow as pa  # only parquet lists come here (pyarrow is the parquet extra)

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) and not pa.types.is_uint64(t):
        return "int64"
    if pa.types.is_floating(t):
        return "float64"
    return "string"


def arrow_schema(uri: str, schema: Any) -> FileSchema:
    return FileSchema(uri, {f.name: arrow_type(f.type) for f in schema})


def json_type(value: Any) -> str | None:
    """The type a JSON value suggests (None for null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if _INT64[0] <= value <= _INT64[1] else "string"
    if isinstance(value, float):
        return "float64"
    return "string"


def merge_types(found: Iterable[str | None]) -> str | None:
    """One column's type from its sampled values' types: None while only nulls were seen."""
    kinds = {t for t in found if t is not None}
    if not kinds:
        return None
    if kinds == {"int64", "float64"}:
        return "float64"
    return kinds.pop() if len(kinds) == 1 else "string"


def sample_schema(uri: str, rows: Iterable[bytes]) -> FileSchema:
    """A JSON Lines file's schema: the keys of its sampled objects (first seen first), typed."""
    seen: dict[str, set[str | None]] = {}
    for n, raw in enumerate(rows):
        obj = parse_object(raw, uri, n)
        for name, value in obj.items():
            seen.setdefault(name, set()).add(json_type(value))
    return FileSchema(uri, {name: merge_types(types) for name, types in seen.items()}, sampled=True)


def parse_object(raw: bytes | str, uri: str, n: int) -> dict[str, Any]:
    """One JSON Lines row as a dict (invalid UTF-8 replaced); SourceError for anything else."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    hint = " (a .json list holds one object a line, JSON Lines, not an array)" if text.lstrip()[:1] == "[" else ""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise SourceError(f"URL list {uri!r} item row {n + 1} is not valid JSON ({exc}){hint}; fix the row") from None
    if not isinstance(obj, dict):
        raise SourceError(
            f"URL list {uri!r} item row {n + 1} is a JSON {type(obj).__name__}, not an object "
            f'like {{"url": ...}}{hint}; write one object a line'
        )
    return obj


def choose(schema: FileSchema, caption: str, columns: tuple[str, ...] | str, hash_column: str | None) -> Choice:
    """The kept columns of one file under source.caption_column / columns / hash_column."""
    types, uri = schema.types, schema.uri
    cap = _caption(schema, caption)
    pairs: list[tuple[str, str]] = [(cap, CAPTION)] if cap else []
    if columns == "*":
        roles = {schema.role(r) for r in ROLES}
        pairs += [(c, c) for c in types if c not in roles and c != cap and c.strip()]
        if len(pairs) > MAX_COLUMNS:
            raise SourceError(
                f"URL list {uri!r} has {len(pairs)} columns, over the {MAX_COLUMNS} that "
                'source.columns "*" keeps; name the ones to keep in source.columns'
            )
    else:
        pairs += [(c, c) for c in columns if c != cap]  # the caption is kept already
    if hash_column and hash_column not in {stored for _, stored in pairs}:
        pairs.append((hash_column, hash_column))
    missing = [src for src, _ in pairs if src not in types]
    if missing:
        have = ", ".join(repr(c) for c in types) or "none"
        sampled = f" (keys of its first {SAMPLE_ROWS} rows)" if schema.sampled else ""
        raise SourceError(
            f"URL list {uri!r} has no column {missing[0]!r}; it has {have}{sampled}: fix "
            "source.columns / caption_column / hash_column or the list"
        )
    _check_names([stored for _, stored in pairs], uri)
    stored = tuple(Column(name, types[src]) for src, name in pairs)  # type: ignore[arg-type]  # None: still open
    return Choice(tuple(src for src, _ in pairs), stored)


def _caption(schema: FileSchema, caption: str) -> str | None:
    if caption == "none":
        return None
    if caption == "auto":
        return next((c for c in AUTO_CAPTIONS if c in schema.types), None)
    return caption


def _check_names(names: list[str], uri: str) -> None:
    seen: set[str] = set()
    for name in names:
        _check_safe(name, uri)
        if name.strip().lower() in RESERVED:
            raise SourceError(
                f"URL list {uri!r}: column {name!r} is named like the stored item's own {name.lower()!r} "
                "field; rename it in the list or leave it out of source.columns"
            )
        if name in seen:
            why = f"the caption is stored as {CAPTION!r}" if name == CAPTION else "source.columns names it twice"
            raise SourceError(
                f"URL list {uri!r}: column {name!r} would be stored twice ({why}); leave it out of "
                "source.columns or set source.caption_column"
            )
        seen.add(name)


def _check_safe(name: str, uri: str) -> None:
    """A stored column's name is one safe segment: it names a dataset inside each shard file."""
    why = ""
    if _UNSAFE_NAME.search(name):
        why = "holds a '/', a '\\' or a control character"
    elif name.strip() in (".", ".."):
        why = "is '.' or '..'"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        why = f"is longer than {MAX_NAME_BYTES} bytes"
    if why:
        raise SourceError(
            f"URL list {uri!r}: column {name[:60]!r} {why}, which a shard cannot store as a column "
            "name; rename it in the list or leave it out of source.columns"
        )


def unify(found: Sequence[tuple[FileSchema, Choice]]) -> Choice:
    """The one choice of every list file; a difference is one line naming both files and what.

    The order of the columns in a file does not matter (each file is read by name; the first
    file's order is kept). JSON Lines types were sampled, so they may still meet: a column null
    in one file's sample takes the other's type, int64 and float64 make float64. Declared types
    (CSV, parquet) must be equal."""
    first, merged = found[0], list(found[0][1].stored)
    for schema, choice in found[1:]:
        if _names(choice) != _names(first[1]):  # the same columns, stored under the same names
            raise SourceError(_difference(first, (schema, choice), "names"))
        by_name = dict(zip(choice.read, choice.stored))
        for i, (mine, theirs) in enumerate(zip(merged, (by_name[n] for n in first[1].read))):
            if mine.type == theirs.type:
                continue
            kinds = {mine.type, theirs.type} - {None}
            sampled = first[0].sampled and schema.sampled
            if sampled and len(kinds) <= 1:
                merged[i] = Column(mine.name, kinds.pop() if kinds else None)  # type: ignore[arg-type]
            elif sampled and kinds == {"int64", "float64"}:
                merged[i] = Column(mine.name, "float64")
            else:
                raise SourceError(
                    _difference(first, (schema, choice), f"{first[1].read[i]!r} is {mine.type} vs {theirs.type}")
                )
    return Choice(first[1].read, tuple(Column(c.name, c.type or "string") for c in merged))


def _names(choice: Choice) -> dict[str, str]:
    return {src: col.name for src, col in zip(choice.read, choice.stored)}


def _difference(first: tuple[FileSchema, Choice], other: tuple[FileSchema, Choice], what: str) -> str:
    (a, ca), (b, cb) = first, other
    if what == "names":
        only_a = [n for n in ca.read if n not in cb.read]
        only_b = [n for n in cb.read if n not in ca.read]
        parts = [
            f"only the first has {', '.join(map(repr, only_a))}" if only_a else "",
            f"only the second has {', '.join(map(repr, only_b))}" if only_b else "",
        ]
        what = "; ".join(p for p in parts if p) or f"{ca.read} vs {cb.read}"
    return (
        f"URL lists {a.uri!r} and {b.uri!r} have different columns ({what}); give every list file the "
        "same columns, name the ones to keep in source.columns, or select the lists with a glob (lists/*.parquet)"
    )


@dataclass(frozen=True)
class Unfit:
    """A JSON value its column's (sampled) type cannot hold: the item fails with `message`, the
    shard's other items are kept (a row past the sample may differ from it)."""

    message: str


def fit(value: Any, kind: str, where: str, name: str) -> Any:
    """`coerce`, with a value that does not fit as an `Unfit` in its place instead of an error."""
    try:
        return coerce(value, kind, where, name)
    except SourceError as exc:
        return Unfit(str(exc))


def coerce(value: Any, kind: str, where: str, name: str) -> Any:
    """A JSON value fitted to its column's type; SourceError when it cannot be without loss."""
    if value is None:
        return None
    if kind == "string":
        if isinstance(value, str):
            return value
        return json.dumps(value, ensure_ascii=False)
    is_bool = isinstance(value, bool)
    if kind == "float64" and isinstance(value, (int, float)) and not is_bool:
        return float(value)
    if kind == "int64" and not is_bool:
        if isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
    if kind == "bool" and is_bool:
        return value
    raise SourceError(
        f"{where}: column {name!r} holds {json.dumps(value)[:40]}, not {kind} as the list's "
        f"first {SAMPLE_ROWS} rows said; give the column one type throughout (e.g. 3.0 for a float)"
    )
