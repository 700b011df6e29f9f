"""The manifest and its compact shard index: written last by a run, read (and validated) by everyone.

Layout under the dataset root:
    shards/shard-00000.h5            the shard (or .lmdb, or a directory for directory formats)
    shards/shard-00000.record.gz     its record: counts, sha256, identity, ledger rows (convert.records)
    plan.gz                          the shard plan: each shard's input slices (convert.plan)
    failed.gz                        ledger rows of shards that failed after their retries (if any)
    index.gz                         the shard index: one column per summary field (numpy arrays)
    manifest.json                    written LAST: config, label names, aggregate counts, index digest

The manifest holds aggregates only; the per-shard table is the columnar index (about 150 B per
shard compressed, loaded as arrays: cheap in every DataLoader worker at 10^6 shards). Ledgers are
never concatenated: `convert.ledger` streams them from the records; verification, repair and
cleanup of shard files are `convert.shards`. Everything read back is validated (names safe, paths
inside shards/ and their own shard's, non-negative consistent counts, local files regular):
anything else is a one-line ManifestError.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np

from . import persist
from .layout import SHARDS_DIR
from .parts import load_parts
from .records import ManifestError, check_names, check_rel_paths, check_summary, dump_bytes, ledger_columns, read_meta
from .specs import Column, ItemResult, ShardRecord, Status
from .store import Store

MANIFEST = "manifest.json"
INDEX = "index.gz"
FAILED = "failed.gz"
LEDGER = "ledger.gz"  # wave-1 outputs only (a concatenated ledger); removed when such an output is rerun
PLAN = "plan.gz"
VERSION = 2
_INT_FIELDS = ("count", "ok", "failed", "bytes")

__all__ = [
    "FAILED",
    "INDEX",
    "LEDGER",
    "MANIFEST",
    "PLAN",
    "ManifestError",
    "ShardIndex",
    "check_opened",
    "read_manifest",
    "write_manifest",
]


class ShardIndex(Sequence[dict[str, Any]]):
    """The per-shard table as columns; `index[i]` is the i-th shard's summary dict."""

    def __init__(self, cols: dict[str, Any]) -> None:
        self.cols = cols

    @classmethod
    def from_summaries(cls, summaries: Sequence[dict[str, Any]]) -> "ShardIndex":
        stage_keys = sorted({k for s in summaries for k in s.get("stages", {})})
        n = len(summaries)
        cols: dict[str, Any] = {
            "name": np.array([s["name"] for s in summaries], dtype=str).reshape(n),
            "path": np.array([s["path"] for s in summaries], dtype=str).reshape(n),
            "format": np.array([s["format"] for s in summaries], dtype=str).reshape(n),
            "encoding": np.array([s["encoding"] for s in summaries], dtype=str).reshape(n),
            "sha256": np.array([s["sha256"] for s in summaries], dtype="S64").reshape(n),
            "image_shape": np.array([s["image_shape"] or [-1, -1, -1] for s in summaries], dtype=np.int32).reshape(
                n, 3
            ),
            "started": np.array([s.get("started", 0.0) for s in summaries], dtype=np.float64),
            "finished": np.array([s.get("finished", 0.0) for s in summaries], dtype=np.float64),
            "stages": {k: np.array([s.get("stages", {}).get(k, np.nan) for s in summaries]) for k in stage_keys},
        }
        for key in _INT_FIELDS:
            cols[key] = np.array([s[key] for s in summaries], dtype=np.int64)
        return cls(cols)

    def __len__(self) -> int:
        return len(self.cols["name"])

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        c = self.cols
        shape = [int(v) for v in c["image_shape"][i]]
        stages = {k: float(v[i]) for k, v in c["stages"].items() if not np.isnan(v[i])}
        return {
            "name": str(c["name"][i]),
            "path": str(c["path"][i]),
            "format": str(c["format"][i]),
            **{k: int(c[k][i]) for k in _INT_FIELDS},
            "sha256": c["sha256"][i].decode(),
            "image_shape": None if shape[0] < 0 else shape,
            "encoding": str(c["encoding"][i]),
            "stages": stages,
            "started": float(c["started"][i]),
            "finished": float(c["finished"][i]),
            **self._part_fields(i),
        }

    def _part_fields(self, i: int) -> dict[str, Any]:
        """A merged index's `part` (convert.parts) and `origin` (the shard's own name: its file's
        attrs["shard"] and, for a referenced part, its record's name there)."""
        c = self.cols
        if "part" not in c:
            return {}
        return {"part": int(c["part"][i]), "origin": str(c["origin"][i])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def select(self, mask: np.ndarray) -> "ShardIndex":
        """The shards where `mask` is true (e.g. `index.select(index.cols["ok"] > 0)`)."""

        def pick(v: Any) -> Any:
            return {k: a[mask] for k, a in v.items()} if isinstance(v, dict) else v[mask]

        return ShardIndex({k: pick(v) for k, v in self.cols.items()})

    def starts(self) -> list[int]:
        """Global index of each shard's first ok item, plus the total at the end."""
        return np.concatenate([[0], np.cumsum(self.cols["ok"])]).astype(np.int64).tolist()

    def validate(self, where: str) -> "ShardIndex":
        """Every path inside shards/, counts non-negative and consistent, names unique."""
        c = self.cols
        n = len(self)
        if any(len(c[k]) != n for k in (*_INT_FIELDS, "path", "sha256", "image_shape")):
            raise ManifestError(f"{where}: index columns have different lengths; rerun the conversion")
        for key in _INT_FIELDS:
            if n and (c[key].min() < 0 or c[key].max() >= 2**53):
                raise ManifestError(f"{where}: shard {key} counts must be non-negative, got {int(c[key].min())}")
        if n and not np.array_equal(c["ok"] + c["failed"], c["count"]):
            raise ManifestError(f"{where}: a shard's ok + failed != count; rerun the conversion")
        check_rel_paths(c["path"], where)
        if "part" in c:
            _check_merged_names(c, where)
        else:
            check_names(c["name"], c["path"], where)
        names = c["name"]
        if n > 1 and not (names[1:] > names[:-1]).all() and np.unique(names).size != n:  # sorted: O(n)
            raise ManifestError(f"{where}: duplicate shard names; rerun the conversion")
        return self


def _check_merged_names(c: dict[str, Any], where: str) -> None:
    """A merged index: names and origins are safe shard names, and each path is the file of its
    name (copied under this root) or of its origin (in the part's root)."""
    n = len(c["name"])
    if len(c["part"]) != n or len(c["origin"]) != n:
        raise ManifestError(f"{where}: index columns have different lengths; rerun merge")
    names, origins = np.asarray(c["name"], dtype=str), np.asarray(c["origin"], dtype=str)
    own = np.char.add(np.char.add(f"{SHARDS_DIR}/", names), ".x")
    check_names(names, own, where)
    check_names(origins, np.char.add(np.char.add(f"{SHARDS_DIR}/", origins), ".x"), where)
    paths = np.asarray(c["path"], dtype=str)

    def file_of(stems: np.ndarray) -> np.ndarray:
        return np.strings.startswith(paths, np.char.add(np.char.add(f"{SHARDS_DIR}/", stems), "."))

    bad = np.flatnonzero(~file_of(names) & ~file_of(origins))
    if bad.size:
        i = int(bad[0])
        raise ManifestError(f"{where}: shard {names[i]!r} has path {paths[i][:120]!r}, not its own file; rerun merge")


def write_manifest(
    store: Store,
    records: "list[ShardRecord] | ShardIndex",
    config: dict[str, Any],
    label_names: list[str] | None,
    source_kind: str,
    failed: dict[str, str] | None = None,
    failed_rows: list[ItemResult] | None = None,
    counts: dict[str, int] | None = None,
    columns: Sequence[Column] | None = None,
    generation: int = 1,
    history: Sequence[dict[str, Any]] = (),
    parts: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write the shard index (and failed shards' rows), then manifest.json last. Records in shard order,
    or the index itself (a run builds it from its `convert.shardtable.ShardTable`, with the fingerprint,
    per-status counts and file identity columns resume trusts instead of reading each record).

    `counts`: items by status over everything (committed + failed shards); computed from the
    records' ledgers when not given. `columns`: the stored columns' schema (the first record's when
    not given). Ledgers are not concatenated: they stay in the records. `parts`: a merged
    dataset's sources (convert.parts; the index then has `part` and `origin` columns).

    `generation` > 1 (`run --append`): the index goes to its own `gen/<generation>/index.gz`
    before manifest.json names it, so a reader opening during the append sees the old generation
    whole or the new one whole (index.gz, which generation 1 names, is never rewritten by an append);
    resume reads the index the manifest names. `history`: the
    earlier generations' entries (this one's is added).
    """
    failed_rows = failed_rows or []
    if failed_rows:
        store.write_bytes(FAILED, dump_bytes(ledger_columns(failed_rows)))
    else:
        store.delete(FAILED)
    store.delete(LEDGER)  # a wave-1 concatenated ledger would be stale now
    index = records if isinstance(records, ShardIndex) else ShardIndex.from_summaries([r.summary() for r in records])
    blob = dump_bytes(index.cols)
    index_path = INDEX if generation <= 1 else generation_index(generation)
    store.write_bytes(index_path, blob)
    if counts is None:
        counts = Counter(row.status.value for r in records for row in r.ledger)  # type: ignore[union-attr]
        counts.update(row.status.value for row in failed_rows)
    by_status = {k: int(v) for k, v in sorted(counts.items()) if v}
    items = sum(by_status.values())
    manifest = {
        "version": VERSION,
        "format": config["output"]["format"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_kind": source_kind,
        "label_names": label_names,
        "columns": [[c.name, c.type] for c in _schema(records, columns)],  # the stored columns' schema
        "totals": {
            "items": items,
            "ok": by_status.get(Status.OK.value, 0),
            "failed": items - by_status.get(Status.OK.value, 0),
            "by_status": by_status,
            "shards": len(index),
            "bytes": int(index.cols["bytes"].sum()),
        },
        "complete": not failed,
        "failed_shards": dict(failed or {}),
        "index": {"path": index_path, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
        "failed_ledger": FAILED if failed_rows else None,
        "config": config,
        "generation": generation,
        "history": [*history, _entry(generation, manifest_created(), len(index), items)],
    }
    if parts is not None:
        manifest["parts"] = list(parts)
    store.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return {**manifest, "shards": index}


def generation_index(generation: int) -> str:
    return f"gen/{generation:06d}/index.gz"


def manifest_created() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _entry(generation: int, created: str, shards: int, items: int) -> dict[str, Any]:
    return {"generation": generation, "created": created, "shards": shards, "items": items}


def _schema(records: "list[ShardRecord] | ShardIndex", columns: Sequence[Column] | None) -> Sequence[Column]:
    if columns is not None:
        return columns
    return records[0].columns if records and not isinstance(records, ShardIndex) else ()


def _load_json(store: Store) -> dict[str, Any]:
    try:
        data = read_meta(store, MANIFEST)
    except FileNotFoundError:
        raise ManifestError(
            f"{store.url(MANIFEST)} not found: not a converted dataset, or the run has not finished "
            "(rerun `convert-dataset run` with the same config to complete it)"
        ) from None
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{store.url(MANIFEST)} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("version") not in (1, VERSION):
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise ManifestError(f"{store.url(MANIFEST)}: unsupported manifest version {version!r}")
    return manifest


def _load_index(store: Store, manifest: dict[str, Any]) -> ShardIndex:
    where = store.url(MANIFEST)
    if manifest["version"] == 1:  # wave 1: summaries inline
        return ShardIndex.from_summaries([check_summary(s, where) for s in manifest.get("shards", [])]).validate(where)
    ref = manifest.get("index") or {}
    generation = manifest.get("generation", 1)
    allowed = {INDEX, generation_index(generation) if isinstance(generation, int) and generation > 1 else INDEX}
    if ref.get("path") not in allowed:
        raise ManifestError(f"{where}: index path {str(ref.get('path'))[:80]!r} is not {INDEX!r}; rerun the conversion")
    try:
        blob = read_meta(store, ref["path"])
    except FileNotFoundError:
        raise ManifestError(
            f"{store.url(ref['path'])} missing; rerun `convert-dataset run` with the same config"
        ) from None
    if hashlib.sha256(blob).hexdigest() != ref.get("sha256"):
        raise ManifestError(f"{store.url(ref['path'])} does not match the manifest; rerun the conversion")
    try:
        cols = persist.load(io.BytesIO(blob))
        return ShardIndex(cols).validate(store.url(INDEX))
    except (persist.PersistError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{store.url(INDEX)} is unreadable ({type(exc).__name__}); rerun the conversion") from None


def _check_totals(manifest: dict[str, Any], index: ShardIndex, where: str) -> None:
    totals: Any = manifest.get("totals")
    try:
        by_status = {str(k): int(v) for k, v in totals["by_status"].items()}
        numbers = {k: totals[k] for k in ("items", "ok", "failed", "shards", "bytes")}
    except (TypeError, KeyError, AttributeError, ValueError):
        raise ManifestError(f"{where}: totals are missing or malformed; rerun the conversion") from None
    c = index.cols
    expected = {"ok": int(c["ok"].sum()), "shards": len(index), "bytes": int(c["bytes"].sum())}
    bad = [k for k, v in expected.items() if numbers[k] != v]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in [*numbers.values(), *by_status.values()]):
        bad.append("non-negative")
    if numbers["items"] != sum(by_status.values()) or numbers["items"] != numbers["ok"] + numbers["failed"]:
        bad.append("items")
    if numbers["items"] < int(c["count"].sum()):
        bad.append("count")
    if bad:
        raise ManifestError(
            f"{where}: totals disagree with the shard index ({', '.join(bad)}); "
            "the manifest was edited or corrupted - rerun the conversion"
        )


def read_manifest(store: Store) -> dict[str, Any]:
    """manifest.json with "shards" as the validated ShardIndex (a sequence of summary dicts)."""
    manifest = _load_json(store)
    index = _load_index(store, manifest)
    _check_totals(manifest, index, store.url(MANIFEST))
    load_parts(manifest, index.cols.get("part"), store.url(MANIFEST))
    return {**manifest, "shards": index}


def check_opened(store: Store, shard: dict[str, Any], reader: Any) -> None:
    """A reader's first open of a shard: it must hold the shard's own items (not a swapped-in
    neighbour's) and as many as the index says. ManifestError naming the file otherwise."""
    try:
        entry = store.info(shard["path"])
    except FileNotFoundError:  # a directory-shaped shard on an object store is a prefix, not an object
        entry = None
    if entry is not None and not entry.is_dir and entry.size != shard["bytes"]:
        raise ManifestError(
            f"{store.url(shard['path'])} is {entry.size} bytes, the index says {shard['bytes']}; "
            "run `convert-dataset verify --repair` or rerun the conversion"
        )
    attrs = reader.attrs()
    own = shard.get("origin", shard["name"])  # a merged index: the file keeps its own name
    if attrs.get("shard", own) != own or len(reader) != shard["ok"]:
        raise ManifestError(
            f"{store.url(shard['path'])} holds {len(reader)} images of shard "
            f"{attrs.get('shard')!r}, the index expects {shard['ok']} of {shard['name']!r}; "
            "run `convert-dataset verify --repair` or rerun the conversion"
        )
