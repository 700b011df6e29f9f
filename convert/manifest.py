"""Shard records (done-markers), the dataset ledger and the manifest, plus verification.

Layout under the dataset root:
    shards/shard-00000.h5            the shard (or .lmdb)
    shards/shard-00000.record.gz     its record: counts, size, sha256, fingerprint, ledger rows
    plan.gz                          the shard plan: every input item's shard, key, uri, label
    ledger.gz                        every input item once: key, uri, label, status, error, shard
    manifest.json                    written LAST: resolved config, label names, shard summaries

Records and ledger use `convert.persist` (compressed, never unpickled); the manifest stays JSON so
a person can read it. Readers trust only the manifest; resume trusts records whose file checks out.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from . import persist
from .specs import ItemResult, ShardRecord, ShardSpec, Status
from .store import SHARDS_DIR, Leftover, Store

MANIFEST = "manifest.json"
LEDGER = "ledger.gz"
PLAN = "plan.gz"
RECORD_SUFFIX = ".record.gz"
VERSION = 1
_CODEC = ("gzip", 6)


class ManifestError(ValueError):
    """The output is missing its manifest or the manifest is unreadable."""


def shard_rel_path(name: str, extension: str) -> str:
    return f"{SHARDS_DIR}/{name}{extension}"


def record_rel_path(name: str) -> str:
    return f"{SHARDS_DIR}/{name}{RECORD_SUFFIX}"


def _ledger_columns(rows: Iterable[ItemResult]) -> dict[str, Any]:
    rows = list(rows)
    return {
        "key": [r.key for r in rows],
        "uri": [r.uri for r in rows],
        "label": np.array([-1 if r.label is None else r.label for r in rows], dtype=np.int64),
        "status": [r.status.value for r in rows],
        "error": [r.error for r in rows],
        "width": np.array([r.width for r in rows], dtype=np.int32),
        "height": np.array([r.height for r in rows], dtype=np.int32),
        "src_format": [r.src_format for r in rows],
        "src_bytes": np.array([r.src_bytes for r in rows], dtype=np.int64),
    }


def _ledger_rows(cols: dict[str, Any]) -> tuple[ItemResult, ...]:
    n = len(cols["key"])
    width, height = cols.get("width", [-1] * n), cols.get("height", [-1] * n)
    fmt, nbytes = cols.get("src_format", [""] * n), cols.get("src_bytes", [-1] * n)
    return tuple(
        ItemResult(key, uri, None if int(label) < 0 else int(label), Status(status), error,
                   int(w), int(h), f, int(b))  # fmt: skip
        for key, uri, label, status, error, w, h, f, b in zip(
            cols["key"], cols["uri"], cols["label"], cols["status"], cols["error"], width, height, fmt, nbytes
        )
    )


def _dump_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    persist.dump(obj, buf, compress=_CODEC)
    return buf.getvalue()


def write_record(out: Store, record: ShardRecord, fingerprint: str) -> None:
    """Commit a shard's record beside it: the shard's done-marker (written after the shard)."""
    obj = {"version": VERSION, "fingerprint": fingerprint, **record.summary(), "ledger": _ledger_columns(record.ledger)}
    out.write_bytes(record_rel_path(record.name), _dump_bytes(obj))


def read_record(out: Store, name: str) -> tuple[ShardRecord, str] | None:
    """(record, fingerprint) of a committed shard, or None if absent or unreadable."""
    rel = record_rel_path(name)
    try:
        obj = persist.load(io.BytesIO(out.read_bytes(rel)))
    except (FileNotFoundError, persist.PersistError):
        return None
    if not isinstance(obj, dict) or obj.get("version") != VERSION:
        return None
    shape = obj["image_shape"]
    record = ShardRecord(
        name=obj["name"], path=obj["path"], format=obj["format"], count=obj["count"], ok=obj["ok"],
        failed=obj["failed"], bytes=obj["bytes"], sha256=obj["sha256"],
        image_shape=tuple(shape) if shape else None, encoding=obj["encoding"],
        ledger=_ledger_rows(obj["ledger"]), stages=dict(obj.get("stages", {})),
        started=float(obj.get("started", 0.0)), finished=float(obj.get("finished", 0.0)),
    )  # fmt: skip
    return record, obj["fingerprint"]


def committed_records(out: Store, fingerprints: dict[str, str]) -> dict[str, ShardRecord]:
    """Records from a previous run that resume may trust: same fingerprint, shard file present, same size."""
    listing = {entry.name: entry for entry in out.list(SHARDS_DIR)}
    trusted: dict[str, ShardRecord] = {}
    for name, expected in fingerprints.items():
        if f"{name}{RECORD_SUFFIX}" not in listing:
            continue
        found = read_record(out, name)
        if found is None or found[1] != expected:
            continue
        record = found[0]
        info = listing.get(record.path.rsplit("/", 1)[-1])
        if info is not None and info.size == record.bytes:
            trusted[name] = record
    return trusted


def write_manifest(
    out: Store,
    records: list[ShardRecord],
    config: dict[str, Any],
    label_names: list[str] | None,
    source_kind: str,
    failed: dict[str, str] | None = None,
    failed_rows: list[ItemResult] | None = None,
) -> dict[str, Any]:
    """Write ledger.gz then manifest.json (last). Records must be in shard order.

    Shards that failed after their retries are listed under "failed_shards" and their items are
    in the ledger with status shard_failed (shard index -1), so every input item appears once.
    """
    failed_rows = failed_rows or []
    rows = [row for r in records for row in r.ledger] + failed_rows
    cols = _ledger_columns(rows)
    shard_ids = [i for i, r in enumerate(records) for _ in r.ledger] + [-1] * len(failed_rows)
    cols["shard"] = np.array(shard_ids, dtype=np.int32)
    out.write_bytes(LEDGER, _dump_bytes(cols))
    by_status = Counter(r.status.value for r in rows)
    manifest = {
        "version": VERSION,
        "format": config["output"]["format"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_kind": source_kind,
        "label_names": label_names,
        "totals": {
            "items": len(rows),
            "ok": by_status.get(Status.OK.value, 0),
            "failed": len(rows) - by_status.get(Status.OK.value, 0),
            "by_status": dict(sorted(by_status.items())),
            "shards": len(records),
            "bytes": sum(r.bytes for r in records),
        },
        "complete": not failed,
        "failed_shards": dict(failed or {}),
        "ledger": LEDGER,
        "shards": [r.summary() for r in records],
        "config": config,
    }
    out.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def write_plan(out: Store, specs: Sequence[ShardSpec], fingerprints: dict[str, str]) -> None:
    """The shard plan as columns (one row per input item), written before any shard runs."""
    refs = [ref for spec in specs for ref in spec.items]
    plan = {
        "shards": [spec.name for spec in specs],
        "fingerprints": [fingerprints[spec.name] for spec in specs],
        "shard": np.array([spec.index for spec in specs for _ in spec.items], dtype=np.int32),
        "key": [ref.key for ref in refs],
        "uri": [ref.uri for ref in refs],
        "label": np.array([-1 if ref.label is None else ref.label for ref in refs], dtype=np.int64),
        "member": np.array([-1 if ref.member is None else ref.member for ref in refs], dtype=np.int64),
    }
    out.write_bytes(PLAN, _dump_bytes(plan))


def read_manifest(out: Store) -> dict[str, Any]:
    try:
        data = out.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise ManifestError(
            f"{out.url(MANIFEST)} not found: not a converted dataset, or the run has not finished "
            "(rerun `convert-dataset run` with the same config to complete it)"
        ) from None
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{out.url(MANIFEST)} is not valid JSON ({exc})") from None
    if manifest.get("version") != VERSION:
        raise ManifestError(f"{out.url(MANIFEST)}: unsupported manifest version {manifest.get('version')!r}")
    return manifest


def read_ledger(out: Store) -> dict[str, Any]:
    """The dataset ledger as columns (key, uri, label, status, error, shard)."""
    return persist.load(io.BytesIO(out.read_bytes(LEDGER)))


@dataclass(frozen=True)
class ShardCheck:
    name: str
    ok: bool
    problem: str = ""


def verify(out: Store) -> list[ShardCheck]:
    """Re-hash every shard listed in the manifest and compare size and sha256."""
    manifest = read_manifest(out)
    checks = []
    for shard in manifest["shards"]:
        try:
            size, digest = out.sha256(shard["path"])
        except FileNotFoundError:
            checks.append(ShardCheck(shard["name"], False, "missing"))
            continue
        if size != shard["bytes"]:
            checks.append(ShardCheck(shard["name"], False, f"size {size} != {shard['bytes']}"))
        elif digest != shard["sha256"]:
            checks.append(ShardCheck(shard["name"], False, "sha256 mismatch"))
        else:
            checks.append(ShardCheck(shard["name"], True))
    return checks


def leftovers(out: Store) -> list[Leftover]:
    """Debris a reader never trusts but that costs storage: `.partial` temps and incomplete
    multipart uploads of failed/killed attempts, and (when a manifest exists) objects under
    shards/ that it does not list, e.g. a shard uploaded by an attempt killed before its record
    or by a run that then failed. The next run removes the first two kinds; rerunning also
    replaces unlisted shards of the current plan."""
    found = out.leftovers()
    try:
        manifest = read_manifest(out)
    except ManifestError:
        return found
    listed = {s["path"] for s in manifest["shards"]} | {record_rel_path(s["name"]) for s in manifest["shards"]}
    partial = {item.url for item in found}
    for entry in out.walk(SHARDS_DIR):
        url = out.url(entry.rel)
        if entry.rel not in listed and url not in partial:
            found.append(Leftover("unlisted", url))
    return found
