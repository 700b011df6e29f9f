"""What the client keeps per shard between a record's arrival and the index: columns, not objects.

A run's client used to hold a slim `ShardRecord` and a `LedgerTally` per committed shard (about
2 kB each, plus dict overhead) until the manifest was written. `ShardTable` holds the same facts
as numpy columns indexed by the shard's position in the plan (about 300 B per shard: counts,
bytes, sha256 as 32 raw bytes, start/end, per-stage seconds as float32, interned format /
encoding / shape / extension ids, per-status counts and the file identity resume compares), plus
ONE aggregate tally: status counts and the first few failure keys per status in shard order
(O(statuses)). The shard index (`manifest.ShardIndex` columns) is built from it directly.

Columns are allocated for the whole plan up front with np.zeros (calloc: pages never written are
never resident), so memory grows only with the shards actually filled.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np

from .layout import SHARDS_DIR
from .specs import ShardRecord
from .summary import LedgerTally

EXAMPLES = 2  # failure keys kept per status (shard order)
ID_INTS = ("size", "inode", "mtime_ns", "ctime_ns")
ID_TEXT = ("etag", "version")
_NO = -1


class Interned:
    """Small table of distinct values (formats, encodings, shapes, extensions) -> int16 ids."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self._ids: dict[Any, int] = {}

    def id(self, value: Any) -> int:
        found = self._ids.get(value)
        if found is None:
            found = self._ids[value] = len(self.values)
            self.values.append(value)
        return found


class ShardTable:
    """Per-shard columns by plan position; `add` files a record (or an index row), `index_cols`
    returns the shard index's columns for the filled rows, in plan order."""

    def __init__(self, names: Sequence[str], fingerprints: Sequence[str]) -> None:
        n = len(names)
        self.names, self.fingerprints = names, fingerprints  # the plan's own lists, not copied
        self.position = {name: i for i, name in enumerate(names)}
        self.filled = np.zeros(n, bool)
        self.new = np.zeros(n, bool)  # converted by this run
        self.ints = {k: np.zeros(n, np.int64) for k in ("count", "ok", "failed", "bytes")}
        self.sha = np.zeros((n, 32), np.uint8)
        self.times = {k: np.zeros(n, np.float64) for k in ("started", "finished")}
        self.stages: dict[str, np.ndarray] = {}
        self.ids = {k: np.zeros(n, np.int16) for k in ("format", "encoding", "shape", "ext")}
        self.interned = {k: Interned() for k in self.ids}
        self.by_status: dict[str, np.ndarray] = {}
        self.transient: dict[str, np.ndarray] = {}
        self.id_ints = {k: np.full(n, _NO, np.int64) for k in ID_INTS}
        self.id_text: dict[str, np.ndarray] = {}  # S-dtype columns, widened as values need
        self.edges = np.zeros((n, 32), np.uint8)
        self.has_edges = np.zeros(n, bool)
        self.examples: dict[str, list[tuple[int, int, str]]] = {}  # status -> [(shard, row, key)] first few

    def __len__(self) -> int:
        return int(self.filled.sum())

    # -- filling ------------------------------------------------------------------------------
    def add(
        self, record: ShardRecord, tally: LedgerTally, identity: dict[str, Any] | None = None, new: bool = False
    ) -> None:
        """File one shard's record (ledger already folded into `tally`) and its file identity."""
        i = self.position[record.name]
        self.filled[i], self.new[i] = True, new
        for key, col in self.ints.items():
            col[i] = getattr(record, key)
        self.sha[i] = np.frombuffer(bytes.fromhex(record.sha256), np.uint8)
        self.times["started"][i], self.times["finished"][i] = record.started, record.finished
        for stage, seconds in record.stages.items():
            self._col(self.stages, stage, np.float32, np.nan)[i] = seconds
        self._set_ids(i, record.format, record.encoding, record.image_shape, record.path)
        for status, count in tally.counts.items():
            self._col(self.by_status, status, np.int32, 0)[i] = count
        for status, count in tally.transient.items():
            self._col(self.transient, status, np.int32, 0)[i] = count
        for status, keys in tally.examples.items():
            self._example(status, i, keys)
        self.set_identity(i, identity or {})

    def _set_ids(self, i: int, fmt: str, encoding: str, shape: Any, path: str) -> None:
        ext = path[len(f"{SHARDS_DIR}/{self.names[i]}") :]
        for key, value in (
            ("format", fmt),
            ("encoding", encoding),
            ("ext", ext),
            ("shape", tuple(int(v) for v in shape) if shape else None),
        ):
            self.ids[key][i] = self.interned[key].id(value)

    def set_identity(self, i: int, identity: dict[str, Any]) -> None:
        for key in ID_INTS:
            value = identity.get(key)
            self.id_ints[key][i] = value if isinstance(value, int) and not isinstance(value, bool) else _NO
        for key in ID_TEXT:
            text = str(identity.get(key) or "").encode()
            col = self.id_text.get(key)
            if col is None or col.dtype.itemsize < len(text):
                width = max(len(text), 1 if col is None else col.dtype.itemsize)
                self.id_text[key] = col = (
                    np.zeros(len(self.names), f"S{width}") if col is None else col.astype(f"S{width}")
                )
            col[i] = text
        edges = identity.get("edges")
        self.has_edges[i] = isinstance(edges, str) and len(edges) == 64
        if self.has_edges[i]:
            self.edges[i] = np.frombuffer(bytes.fromhex(edges), np.uint8)

    def _col(self, cols: dict[str, np.ndarray], key: str, dtype: Any, fill: Any) -> np.ndarray:
        col = cols.get(key)
        if col is None:
            col = cols[key] = np.full(len(self.names), fill, dtype)
        return col

    def _example(self, status: str, shard: int, keys: Sequence[str]) -> None:
        """Keep the first EXAMPLES keys of `status` in shard order (records arrive in any order)."""
        kept = self.examples.setdefault(status, [])
        kept.extend((shard, row, key) for row, key in enumerate(keys[:EXAMPLES]))
        kept.sort()
        del kept[EXAMPLES:]

    def drop(self, mask: np.ndarray) -> None:
        """Forget the rows in `mask` (e.g. shards `--retry-failed` rebuilds)."""
        self.filled &= ~mask
        for col in (*self.by_status.values(), *self.transient.values()):
            col[mask] = 0
        for col in self.stages.values():
            col[mask] = np.nan
        for status, kept in self.examples.items():
            self.examples[status] = [e for e in kept if not mask[e[0]]]

    # -- reading ------------------------------------------------------------------------------
    def identity(self, i: int) -> dict[str, Any]:
        """Row i's recorded file identity as records.py writes it (keys absent where unknown)."""
        found: dict[str, Any] = {k: int(v[i]) for k, v in self.id_ints.items() if v[i] != _NO}
        found.update({k: v[i].decode() for k, v in self.id_text.items() if v[i]})
        if self.has_edges[i]:
            found["edges"] = self.edges[i].tobytes().hex()
        return found

    def tally(self) -> LedgerTally:
        """The aggregate over filled rows: counts per status and the first failure keys (shard order)."""
        counts = {s: int(c[self.filled].sum()) for s, c in self.by_status.items()}
        examples = {s: tuple(k for _, _, k in kept) for s, kept in self.examples.items() if kept}
        return LedgerTally({s: c for s, c in counts.items() if c}, examples, {})

    def new_ok(self) -> int:
        return int(self.ints["ok"][self.filled & self.new].sum())

    def index_cols(self) -> dict[str, Any]:
        """The shard index's columns (manifest.ShardIndex) for the filled rows, in plan order."""
        rows = np.flatnonzero(self.filled)
        names = np.array([self.names[i] for i in rows], dtype=str).reshape(len(rows))
        ext = np.array(self.interned["ext"].values or [""], dtype=str)[self.ids["ext"][rows]]
        shapes = [list(s) if s else [-1, -1, -1] for s in self.interned["shape"].values] or [[-1, -1, -1]]
        cols: dict[str, Any] = {
            "name": names,
            "path": np.strings.add(np.strings.add(f"{SHARDS_DIR}/", names), ext).astype(str),
            "format": np.array(self.interned["format"].values or [""], dtype=str)[self.ids["format"][rows]],
            "encoding": np.array(self.interned["encoding"].values or [""], dtype=str)[self.ids["encoding"][rows]],
            "sha256": np.frombuffer(binascii.hexlify(self.sha[rows].tobytes()), "S64").copy(),
            "image_shape": np.array(shapes, dtype=np.int32).reshape(-1, 3)[self.ids["shape"][rows]],
            **{k: v[rows] for k, v in self.times.items()},
            "stages": {k: v[rows].astype(np.float64) for k, v in sorted(self.stages.items())},
            **{k: v[rows] for k, v in self.ints.items()},
            "fingerprint": np.array([self.fingerprints[i] for i in rows], dtype="S64").reshape(len(rows)),
            "by_status": {k: v[rows] for k, v in sorted(self.by_status.items())},
            "transient": {k: v[rows] for k, v in sorted(self.transient.items())},
            "identity": self._identity_cols(rows),
        }
        return cols

    def _identity_cols(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        edges = np.frombuffer(binascii.hexlify(self.edges[rows].tobytes()), "S64")
        return {
            **{k: v[rows] for k, v in self.id_ints.items()},
            **{k: v[rows] for k, v in self.id_text.items()},
            "edges": np.where(self.has_edges[rows], edges, b""),
        }

    def fill_from_index(self, at: np.ndarray, cols: dict[str, Any], rows: np.ndarray) -> None:
        """File plan rows `at` from rows `rows` of a previous index (shards resume trusted by their
        listing), column by column: no per-shard Python objects at 10^5 shards."""
        if not len(at):
            return
        self.filled[at] = True
        for key, col in self.ints.items():
            col[at] = cols[key][rows]
        self.sha[at] = np.frombuffer(binascii.unhexlify(cols["sha256"][rows].tobytes()), np.uint8).reshape(-1, 32)
        for key, col in self.times.items():
            col[at] = cols[key][rows]
        for stage, values in cols["stages"].items():
            self._col(self.stages, stage, np.float32, np.nan)[at] = values[rows]
        for key, source in (
            ("format", cols["format"]),
            ("encoding", cols["encoding"]),
            ("ext", _extensions(cols["path"], cols["name"])),
        ):
            values, inverse = np.unique(source[rows], return_inverse=True)
            self.ids[key][at] = np.array([self.interned[key].id(str(v)) for v in values], np.int16)[inverse]
        shapes, inverse = np.unique(cols["image_shape"][rows], axis=0, return_inverse=True)
        ids = [self.interned["shape"].id(None if s[0] < 0 else tuple(int(v) for v in s)) for s in shapes]
        self.ids["shape"][at] = np.array(ids, np.int16)[inverse.reshape(-1)]
        for target, source in ((self.by_status, cols["by_status"]), (self.transient, cols.get("transient", {}))):
            for status, values in source.items():
                self._col(target, status, np.int32, 0)[at] = values[rows]
        ident = cols["identity"]
        for key in ID_INTS:
            self.id_ints[key][at] = ident[key][rows] if key in ident else _NO
        for key in ID_TEXT:
            if key in ident:
                width = max(ident[key].dtype.itemsize, self.id_text[key].dtype.itemsize if key in self.id_text else 1)
                col = self.id_text.get(key)
                col = self.id_text[key] = (
                    np.zeros(len(self.names), f"S{width}") if col is None else col.astype(f"S{width}")
                )
                col[at] = ident[key][rows]
        edges = ident.get("edges")
        if edges is not None:
            has = np.strings.str_len(edges[rows]) == 64
            self.has_edges[at] = has
            hexed = np.where(has, edges[rows], b"0" * 64).astype("S64")
            self.edges[at] = np.frombuffer(binascii.unhexlify(hexed.tobytes()), np.uint8).reshape(-1, 32)


def _extensions(paths: np.ndarray, names: np.ndarray) -> np.ndarray:
    """Each path's part after shards/<name> (".h5", ".lmdb", ...)."""
    start = len(f"{SHARDS_DIR}/") + np.strings.str_len(names)
    return np.array([p[k:] for p, k in zip(paths.tolist(), start.tolist())], dtype=str)


def index_identity(cols: dict[str, Any], row: int) -> dict[str, Any]:
    """The file identity stored in an index row, as records.py writes it."""
    ident = cols.get("identity") or {}
    found: dict[str, Any] = {k: int(ident[k][row]) for k in ID_INTS if k in ident and ident[k][row] != _NO}
    for key in (*ID_TEXT, "edges"):
        if key in ident and ident[key][row]:
            found[key] = ident[key][row].decode()
    return found
