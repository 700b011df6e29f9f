"""Views of a converted dataset without rewriting it: deterministic splits and column filters.

    train = View(ds, split="train[:90%]", seed=0)          # the same 90 % on every machine
    val = View(ds, split="train[90%:]", seed=0)            # the other 10 %: disjoint, covering
    big = View(train, filter="width >= 256 and label != 3") # views compose

A view is a small frozen `ViewSpec` over a base (a `Dataset` or another view). Its member indices
are a pure function of the base and the spec, computed lazily once per process and never pickled:
a view sent to a DataLoader worker is the base's pickle plus the spec (a few hundred bytes).

Splits: `NAME[START:STOP]` (NAME is a label only), bounds are counts (`1000`, negative from the
end) or percents (`90%`, `12.5%`). With `seed` an int (default 0) the base is first permuted by
`numpy.random.default_rng(seed)`, so a split of a label-sorted folder is not whole labels; with
`seed=None` slices are taken in dataset order. Percent bounds
round the same way wherever they appear, so `[:90%]` and `[90%:]` tile the base exactly.
`stratify=True` orders each label's items by their fractional rank within the label, so every
slice holds each label within one item of its share. Members are listed in base order (reads stay
shard-sequential; shuffle when training).

Filters: `COLUMN OP VALUE [and COLUMN OP VALUE ...]`, OP one of == != < <= > >=, VALUE a number or a
quoted string. A tiny parser (never eval) evaluated on whole columns with NumPy (convert.viewcols:
`ds.column`, else the ledger's columns; cached per dataset version): image bytes are never read.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .fetch import prefetch
from .viewcols import dataset_column

ITER_CHUNK = 256  # items per batched read during iteration
SPLIT_SYNTAX = (
    "use NAME[START:STOP] with counts or percents, e.g. 'train[:90%]', 'train[90%:]', 'train[:1000]', 'train[10%:20%]'"
)
FILTER_SYNTAX = (
    "use COLUMN OP VALUE joined by 'and', OP one of == != < <= > >=, e.g. \"width >= 256 and caption != ''\""
)
_SPLIT = re.compile(r"^\s*(?P<name>[A-Za-z_][\w-]*)?\s*(?:\[\s*(?P<start>[^:\]]*?)\s*:\s*(?P<stop>[^:\]]*?)\s*\])?\s*$")
_BOUND = re.compile(r"^(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+))(?P<pct>%?)$")
_TOKEN = re.compile(
    r"""\s*(?:(?P<op>==|!=|<=|>=|<|>)|(?P<str>'[^']*'|"[^"]*")|(?P<num>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<word>[A-Za-z_][\w.]*))"""
)
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class Readable(Protocol):
    """What a view needs of its base: a Dataset or another view."""

    def __len__(self) -> int: ...
    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]: ...


# -- the spec -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Bound:
    value: float
    percent: bool

    def resolve(self, n: int) -> int:
        """Position in a base of `n` items (percents round half up, so adjacent splits tile)."""
        pos = int(np.floor(self.value * n / 100 + 0.5)) if self.percent else int(self.value)
        if pos < 0:
            pos += n
        return min(max(pos, 0), n)


@dataclass(frozen=True, slots=True)
class Split:
    name: str
    start: Bound | None
    stop: Bound | None

    def resolve(self, n: int) -> tuple[int, int]:
        a = self.start.resolve(n) if self.start else 0
        b = self.stop.resolve(n) if self.stop else n
        return a, max(a, b)


@dataclass(frozen=True, slots=True)
class Condition:
    column: str
    op: str
    value: float | str


@dataclass(frozen=True, slots=True)
class ViewSpec:
    """What a view is: a split and/or filter (as text) and how the split is drawn."""

    split: str | None = None
    filter: str | None = None
    seed: int | None = 0
    stratify: bool = False

    def __post_init__(self) -> None:  # parse now: a bad string fails where it was written
        if self.split is not None:
            parse_split(self.split)
        if self.filter is not None:
            parse_filter(self.filter)
        if self.stratify and self.split is None:
            raise ValueError("stratify=True needs a split, e.g. split='train[:90%]'")


def parse_split(text: str) -> Split:
    """'train[:90%]' -> Split; ValueError (one line, the syntax) when it does not parse."""
    m = _SPLIT.match(text) if isinstance(text, str) else None
    bounds = [_bound(m.group(g)) if m else None for g in ("start", "stop")]
    if m is None or not (m.group("name") or m.group("start") is not None) or False in bounds:
        raise ValueError(f"split {text!r} does not parse: {SPLIT_SYNTAX}")
    start, stop = (b if isinstance(b, Bound) else None for b in bounds)
    if start and stop and start.percent == stop.percent and (start.value < 0) == (stop.value < 0):
        if start.value > stop.value:  # 'train[90%:10%]': an empty split, surely not meant
            raise ValueError(f"split {text!r} does not parse: START is past STOP; {SPLIT_SYNTAX}")
    return Split(m.group("name") or "", start, stop)


def _bound(text: str | None) -> Bound | None | bool:
    """A Bound, None for an empty bound, False when it does not parse."""
    if not text:
        return None
    m = _BOUND.match(text)
    if m is None or (not m.group("pct") and "." in m.group("num")):
        return False
    value = float(m.group("num"))
    if m.group("pct") and not -100 <= value <= 100:
        return False
    return Bound(value, bool(m.group("pct")))


def parse_filter(text: str) -> tuple[Condition, ...]:
    """'width >= 256 and caption != ""' -> conditions; ValueError naming the syntax otherwise."""
    tokens, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"filter {text!r}: cannot read {text[pos:].strip()[:20]!r}; {FILTER_SYNTAX}")
        tokens.append((m.lastgroup, m.group(m.lastgroup or "")))
        pos = m.end()
    conditions = []
    for i in range(0, len(tokens), 4):
        part = tokens[i : i + 4]
        kinds = [k for k, _ in part[:3]]
        joined = len(part) < 4 or part[3] == ("word", "and")
        if kinds[:2] != ["word", "op"] or len(kinds) < 3 or kinds[2] not in ("num", "str") or not joined:
            raise ValueError(f"filter {text!r} does not parse: {FILTER_SYNTAX}")
        raw = part[2][1]
        value: float | str = raw[1:-1] if part[2][0] == "str" else float(raw)
        conditions.append(Condition(part[0][1], part[1][1], value))
    if not conditions or tokens[-1] == ("word", "and"):
        raise ValueError(f"filter {text!r} does not parse: {FILTER_SYNTAX}")
    return tuple(conditions)


# -- computing members ----------------------------------------------------------------------
def column_of(base: Any, name: str) -> np.ndarray:
    """One column of `base` (a Dataset, a view or any object with `column`), without reading images."""
    if isinstance(base, (View, _Subset)):
        return base.column(name)
    return dataset_column(base, name)


def evaluate(base: Any, conditions: Sequence[Condition]) -> np.ndarray:
    """Boolean mask over `base` where every condition holds (column-wise NumPy)."""
    mask = np.ones(len(base), dtype=bool)
    for c in conditions:
        col = column_of(base, c.column)
        if isinstance(c.value, str) != (col.dtype.kind in "USO"):
            kind = "text" if col.dtype.kind in "USO" else "numeric"
            raise ValueError(
                f"filter: column {c.column!r} is {kind}; compare it with a "
                f"{'quoted string' if kind == 'text' else 'number'}"
            )
        null = np.ma.getmaskarray(col) if isinstance(col, np.ma.MaskedArray) else np.zeros(len(col), bool)
        if col.dtype.kind == "O":  # text with nulls: a null matches no condition
            null = np.fromiter((v is None for v in col), bool, len(col))
            col = np.where(null, "", col).astype(str)
        held = _OPS[c.op](np.ma.getdata(col), c.value)
        mask &= np.asarray(held, dtype=bool) & ~null
    return mask


def split_members(base: Any, split: Split, seed: int | None, stratify: bool) -> np.ndarray:
    """Sorted base indices in `split`, drawn as the module doc says."""
    n = len(base)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    if stratify:
        labels = column_of(base, "label")[order]
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        rank = np.empty(n, np.int64)  # position of each item within its label, in `order`
        by_label = np.argsort(inverse, kind="stable")
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        rank[by_label] = np.arange(n) - np.repeat(starts, counts)
        order = order[np.lexsort((inverse, (rank + 0.5) / counts[inverse]))]
    a, b = split.resolve(n)
    return np.sort(order[a:b])


# -- the view -------------------------------------------------------------------------------
class View:
    """A subset of `base` (a Dataset or view): len, [i], get_batch, iteration, in base order."""

    def __init__(
        self,
        base: Readable,
        split: str | None = None,
        filter: str | None = None,
        seed: int | None = 0,
        stratify: bool = False,
    ) -> None:
        self.base = base
        self.spec = ViewSpec(split, filter, seed, stratify)
        self._indices: np.ndarray | None = None

    @property
    def indices(self) -> np.ndarray:
        """Base indices of the members (int64, sorted); computed once per process."""
        if self._indices is None:
            members = np.arange(len(self.base), dtype=np.int64)
            if self.spec.filter is not None:
                members = np.flatnonzero(evaluate(self.base, parse_filter(self.spec.filter)))
            if self.spec.split is not None:
                sub = _Subset(self.base, members)
                members = members[split_members(sub, parse_split(self.spec.split), self.spec.seed, self.spec.stratify)]
            self._indices = members.astype(np.int64)
        return self._indices

    def __getstate__(self) -> dict[str, Any]:
        return {"base": self.base, "spec": self.spec}  # never the index array: recomputed on use

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.base, self.spec, self._indices = state["base"], state["spec"], None

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get_batch([index])[0]

    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        n = len(self)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for a view of {n} items: {list(indices)[:10]}")
        return self.base.get_batch(self.indices[idx].tolist())

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """torch DataLoader's batched fetch."""
        return self.get_batch(indices)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """In order; the next chunk is read in the background while this one is consumed."""
        chunks = (range(s, min(s + ITER_CHUNK, len(self))) for s in range(0, len(self), ITER_CHUNK))
        results = prefetch(chunks, lambda r: self.get_batch(list(r)), depth=2)
        try:
            for fetched in results:
                if fetched.error is not None:
                    raise fetched.error
                yield from fetched.value or ()
        finally:
            results.close()  # type: ignore[attr-defined]  # a generator: joins the read-ahead threads

    def column(self, name: str) -> np.ndarray:
        return column_of(self.base, name)[self.indices]

    @property
    def label_names(self) -> list[str] | None:
        return getattr(self.base, "label_names", None)

    @property
    def uri(self) -> str:
        return str(getattr(self.base, "uri", ""))

    def __repr__(self) -> str:
        parts = [
            f"{k}={v!r}"
            for k, v in (
                ("split", self.spec.split),
                ("filter", self.spec.filter),
                ("seed", self.spec.seed),
                ("stratify", self.spec.stratify),
            )
            if v not in (None, False)
        ]
        return f"View({self.uri!r}, {', '.join(parts)}, items={len(self)})"


class _Subset:
    """The members a filter kept, as a base for the split (length and columns only)."""

    def __init__(self, base: Any, members: np.ndarray) -> None:
        self.base, self.members = base, members

    def __len__(self) -> int:
        return int(self.members.size)

    def column(self, name: str) -> np.ndarray:
        return column_of(self.base, name)[self.members]


def view(
    base: Readable, split: str | None = None, filter: str | None = None, seed: int | None = 0, stratify: bool = False
) -> Readable:
    """`base` itself when nothing is asked, else a View (what `open_dataset(split=, filter=)` returns)."""
    if split is None and filter is None:
        if stratify:
            raise ValueError("stratify=True needs a split, e.g. split='train[:90%]'")
        return base
    return View(base, split=split, filter=filter, seed=seed, stratify=stratify)
