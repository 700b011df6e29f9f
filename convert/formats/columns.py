"""Columns beside the images (caption, list columns, the source digest), shared by every format.

Writer side: `batch_values` turns one batch's `Sample.columns` into one typed array per column
(nulls filled with `FILL`) and a null mask, the form every format stores. Reader side:
`StoredColumn` is one shard's column as loaded (values + null mask), answering a row's value
(None for a null) or the whole column (`list[str | None]` for strings, a NumPy array for numbers;
a masked array when the shard holds nulls). Values are never pickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..specs import COLUMN_TYPES, Column

#: what a null is stored as in the values array (the mask says it is null)
FILL: dict[str, Any] = {"string": "", "int64": 0, "float64": math.nan, "bool": False}
NUMPY: dict[str, Any] = {"int64": np.int64, "float64": np.float64, "bool": np.bool_}


def check_schema(columns: Sequence[Column]) -> None:
    """ValueError for an unknown type or a repeated name (a bug upstream, never user data)."""
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise ValueError(f"column names repeat: {names}")
    for c in columns:
        if c.type not in COLUMN_TYPES:
            raise ValueError(f"column {c.name!r}: type {c.type!r} is not one of {COLUMN_TYPES}")


def _typed(col: Column, key: str, value: Any) -> Any:
    """`value` as the column's Python type; ValueError naming the item and column otherwise."""
    kind = col.type
    ok = (
        isinstance(value, str)
        if kind == "string"
        else isinstance(value, (bool, np.bool_))
        if kind == "bool"
        else isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if kind == "int64"
        else isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    )
    if not ok:
        raise ValueError(f"{key!r}: column {col.name!r} holds {kind} values, got {type(value).__name__} {value!r:.40}")
    return value


def batch_values(columns: Sequence[Column], samples: Sequence[Any]) -> list[tuple[Any, np.ndarray]]:
    """Per column of `columns`: (values of the batch with nulls filled, null mask (bool))."""
    out: list[tuple[Any, np.ndarray]] = []
    for j, col in enumerate(columns):
        raw = [s.columns[j] if j < len(s.columns) else None for s in samples]
        nulls = np.fromiter((v is None for v in raw), np.bool_, len(raw))
        fill = FILL[col.type]
        vals = [fill if v is None else _typed(col, s.key, v) for v, s in zip(raw, samples)]
        if col.type == "string":
            out.append((vals, nulls))
        else:
            try:
                out.append((np.asarray(vals, dtype=NUMPY[col.type]), nulls))
            except OverflowError:
                raise ValueError(f"column {col.name!r}: a value does not fit in int64") from None
    return out


@dataclass(frozen=True, slots=True)
class StoredColumn:
    """One shard's column as read back: values (nulls filled) and the null mask (None: no nulls)."""

    column: Column
    values: Any  # list[str] for strings, else a NumPy array of the column's dtype
    nulls: np.ndarray | None

    def check(self, count: int, where: str) -> StoredColumn:
        """Itself, if it holds `count` values of its type (and as many null flags); else
        ValueError naming the shard (a corrupt or edited file, never a conversion's own)."""
        col, values, nulls = self.column, self.values, self.nulls
        if col.type == "string":
            ok = isinstance(values, list) and all(isinstance(v, str) for v in values)
        else:
            ok = isinstance(values, np.ndarray) and values.dtype == np.dtype(col.type) and values.ndim == 1
        ok = ok and len(values) == count
        if nulls is not None:
            ok = ok and isinstance(nulls, np.ndarray) and nulls.dtype == np.bool_ and nulls.shape == (count,)
        if not ok:
            raise ValueError(
                f"{where}: column {col.name!r} does not hold {count} {col.type} values (corrupt shard); "
                "run `convert-dataset verify --repair` or rerun the conversion"
            )
        return self

    def cells(self) -> tuple[list[Any], list[bool] | None]:
        """(values as a list of Python values, null flags or None): what rows are built from."""
        values = self.values if isinstance(self.values, list) else self.values.tolist()
        return values, None if self.nulls is None or not self.nulls.any() else self.nulls.tolist()

    def whole(self) -> Any:
        """The whole column: list[str | None] for strings; an array for numbers (masked if nulls)."""
        if self.column.type == "string":
            if self.nulls is None or not self.nulls.any():
                return list(self.values)
            return [None if n else v for v, n in zip(self.values, self.nulls.tolist())]
        if self.nulls is None or not self.nulls.any():
            return self.values
        return np.ma.MaskedArray(self.values, mask=self.nulls)
