"""Merge converted datasets into one whose index references the sources' shards (issue 23).

    merge_datasets(["../a", "../b"], "merged", prefix_keys=False)

The merged root holds only index.gz and manifest.json (convert.parts describes "parts"): shards
are never copied or rewritten. Labels are reconciled by name (the union, first source's order;
each part's ids remapped at read time), columns united (a missing one reads as None), keys kept
unique across sources (or prefixed `<part>/` with `prefix_keys`), raw fixed image shapes must
agree unless `allow_mixed_shapes`. Every conflict is a one-line MergeError.

With `copy` (`--copy`; needed when a source is on another store) every source's shards are
copied under the merged root instead: `shards/p<NNN>-<shard>.<ext>`, streamed (8 MiB at a time,
any size, store to store) and checked against the source index's size and sha256 before the copy
is published; each shard's record is rewritten for its new name and path (the ledger is kept).
The result is self-contained: its parts' `uri` is null. A rerun (a copy that stopped half way, or
sources that changed) retracts the manifest first, removes a killed copy's temps, skips copies
provably the files it made (records.proves_identity) and prunes the copies the new index does not
list. The output must be empty or an earlier merge (`_check_target`).

Memory: the key check holds one 8-byte digest per converted item (10^7 items: ~160 MB with the
sort); the ledgers are streamed shard by shard from the records.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections import Counter
from typing import Any, Callable

import numpy as np

from .config import ConfigError
from .ledger import iter_ledger_columns
from .manifest import MANIFEST, PLAN, ShardIndex, read_manifest, write_manifest
from .parts import Part, relative_uri
from .layout import SHARDS_DIR
from .lease import LEASE, clean_debris
from .records import (
    RECORD_SUFFIX,
    ManifestError,
    NotRegularFile,
    check_regular,
    current_identity,
    dump_bytes,
    ordered_map,
    proves_identity,
    read_record_full,
    read_record_object,
    record_rel_path,
)
from .redact import redact_url
from .specs import Column
from .store import Entry, Store, open_store

_CORE = ("name", "path", "format", "encoding", "sha256", "image_shape", "started", "finished", "count", "ok")


class MergeError(ConfigError):
    """The sources cannot be merged as asked (one line naming the conflict)."""


def _part_name(uri: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1]).lstrip("._-") or "part"
    name, k = base[:60], 2
    while name in taken:
        name, k = f"{base[:56]}-{k}", k + 1
    taken.add(name)
    return name


def _labels(sources: list[tuple[str, dict[str, Any]]], labelled: list[bool]) -> tuple[list[str] | None, list[Any]]:
    """The merged label_names and each part's id map (None: keep ids)."""
    named = [m.get("label_names") for _, m in sources]
    unnamed = [u for (u, _), n, lab in zip(sources, named, labelled) if lab and not n]
    if unnamed and sum(labelled) > 1:
        other = next(u for (u, _), lab in zip(sources, labelled) if lab and u != unnamed[0])
        raise MergeError(
            f"labels of {redact_url(unnamed[0])} are ids without names, {redact_url(other)} is labelled too: "
            "labels cannot be reconciled by name"
        )
    if not any(named):
        return None, [None] * len(sources)
    union: list[str] = []
    for names in named:
        union += [n for n in names or [] if n not in union]
    pos = {n: i for i, n in enumerate(union)}
    return union, [None if not names else [pos[n] for n in names] for names in named]


def _columns(sources: list[tuple[str, dict[str, Any]]]) -> list[Column]:
    seen: dict[str, tuple[str, str]] = {}
    out: list[Column] = []
    for uri, m in sources:
        for name, kind in m.get("columns") or []:
            if name in seen and seen[name][0] != kind:
                t, where = seen[name]
                raise MergeError(
                    f"column {name!r} is {t} in {redact_url(where)} and {kind} in {redact_url(uri)}; "
                    "merged columns must agree"
                )
            if name not in seen:
                seen[name] = (kind, uri)
                out.append(Column(name, kind))
    return out


def _shapes(sources: list[tuple[str, dict[str, Any]]], allow: bool) -> None:
    first: tuple[tuple[int, ...], str] | None = None
    for uri, m in sources:
        for s in m["shards"]:
            if s["encoding"] != "raw" or not s["image_shape"] or not s["ok"]:
                continue
            shape = tuple(s["image_shape"])
            if first is None:
                first = (shape, uri)
            elif shape != first[0] and not allow:
                a, b = ("x".join(map(str, x)) for x in (first[0], shape))
                raise MergeError(
                    f"raw images are {a} in {redact_url(first[1])} and {b} in {redact_url(uri)}; "
                    "pass --allow-mixed-shapes for a variable-shape result"
                )


def _scan(store: Store, manifest: dict[str, Any]) -> tuple[np.ndarray, list[str], bool]:
    """(8-byte key digests, keys, has labelled items) of the converted items, streamed."""
    digests: list[np.ndarray] = []
    keys: list[str] = []
    labelled = False
    for name, cols in iter_ledger_columns(store, manifest["shards"].cols["name"].tolist()):
        if cols is None:
            raise MergeError(f"{store.url()}: the record of shard {name!r} is missing; rerun its conversion")
        ok = np.asarray(cols["status"]) == "ok"
        k = [str(x) for x, good in zip(cols["key"], ok) if good]
        labelled = labelled or bool((np.asarray(cols["label"])[ok] >= 0).any())
        digests.append(
            np.array(
                [int.from_bytes(hashlib.blake2b(x.encode(), digest_size=8).digest(), "little") for x in k], np.uint64
            )
        )
        keys += k
    return (np.concatenate(digests) if digests else np.zeros(0, np.uint64)), keys, labelled


def _check_keys(scans: list[tuple[np.ndarray, list[str]]], uris: list[str]) -> None:
    """A key in two sources is an error naming it and both (digests sorted; collisions confirmed)."""
    if len(scans) < 2:
        return
    digests = np.concatenate([d for d, _ in scans])
    part = np.concatenate([np.full(d.size, i) for i, (d, _) in enumerate(scans)])
    local = np.concatenate([np.arange(d.size) for d, _ in scans])
    order = np.argsort(digests, kind="stable")
    same = np.flatnonzero((digests[order][1:] == digests[order][:-1]) & (part[order][1:] != part[order][:-1]))
    for j in same.tolist():
        a, b = order[j], order[j + 1]
        ka, kb = scans[part[a]][1][local[a]], scans[part[b]][1][local[b]]
        if ka == kb:
            raise MergeError(
                f"key {ka!r} is in {redact_url(uris[part[a]])} and {redact_url(uris[part[b]])}; "
                "pass --prefix-keys to read keys as <source>/<key>"
            )


def _index(sources: list[tuple[str, dict[str, Any]]], copied: bool) -> ShardIndex:
    cols: dict[str, Any] = {}
    idx = [m["shards"].cols for _, m in sources]
    for key in (*_CORE, "failed", "bytes"):
        cols[key] = np.concatenate([c[key] for c in idx])
    stages = sorted({k for c in idx for k in c.get("stages", {})})
    cols["stages"] = {
        k: np.concatenate([c.get("stages", {}).get(k, np.full(len(c["name"]), np.nan)) for c in idx]) for k in stages
    }
    cols["origin"] = cols["name"]
    cols["name"] = np.concatenate([np.char.add(f"p{i + 1:03d}-", c["name"].astype(str)) for i, c in enumerate(idx)])
    cols["part"] = np.concatenate([np.full(len(c["name"]), i + 1, np.int32) for i, c in enumerate(idx)])
    if copied:
        cols["path"] = np.array([_copied_path(n, o, p) for n, o, p in zip(cols["name"], cols["origin"], cols["path"])])
    return ShardIndex(cols)


# -- --copy ------------------------------------------------------------------------------------
_CHUNK = 8 * 2**20


_EXT = re.compile(r"\.[a-z0-9]{1,8}")
_COPIED = re.compile(r"p\d{3}-")  # the names merge gives copies (and their records and temps)


def _copied_path(name: str, origin: str, path: str) -> str:
    """Where a copied shard lives under the merged root: its merged name, its own extension
    (a single-file shard's: the index must not name e.g. its record as the shard)."""
    head, ext = f"shards/{origin}", str(path)[len(f"shards/{origin}") :]
    if not str(path).startswith(head) or not _EXT.fullmatch(ext):
        raise MergeError(f"shard {origin}: index path {str(path)[:80]!r} is not {head}.<ext>; reconvert that source")
    return f"shards/{name}{ext}"


def _copy_file(src: Store, rel: str, out: Store, dest: str, size: int, sha256: str) -> None:
    """Stream `rel` to `dest`; published only if it has the size and sha256 the index gives."""
    digest, n = hashlib.sha256(), 0
    try:
        check_regular(src, rel)  # a FIFO would block open() for ever
    except NotRegularFile as e:
        raise MergeError(str(e)) from None
    local = src.local_path(rel)
    if local is not None and not os.path.isfile(local):
        raise MergeError(f"{local} is not a regular file; --copy copies single-file shards - reconvert that source")
    stream = src.open_range(rel)
    try:
        with out.writer(dest) as f:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                f.write(chunk)
                n += len(chunk)
            if (n, digest.hexdigest()) != (size, sha256):  # raising inside: the writer discards it
                raise MergeError(
                    f"{src.url(rel)} is {n} bytes with another sha256 than its index says; "
                    "run `convert-dataset verify --repair` on that source, then merge again"
                )
    finally:
        stream.close()


def _copy_shard(src: Store, out: Store, shard: dict[str, Any], name: str, listing: dict[str, Entry]) -> None:
    """One shard and its record, renamed `name`, under `out` (skipped if already copied: its record
    and file are in `listing`, the output's shards/ taken once before copying)."""
    dest = _copied_path(name, shard["name"], shard["path"])
    done = read_record_full(out, name) if f"{name}{RECORD_SUFFIX}" in listing else None
    # kept only if provably the file copied then (inode + ctime locally, ETag on S3)
    if done is not None and done[0].sha256 == shard["sha256"] and proves_identity(out, dest, done[2], listing):
        return
    obj = read_record_object(src, shard["name"])
    if obj is None or obj.get("name") != shard["name"]:
        raise ManifestError(
            f"{src.url(record_rel_path(shard['name']))} is not this shard's record; rerun its conversion"
        )
    _copy_file(src, shard["path"], out, dest, int(shard["bytes"]), str(shard["sha256"]))
    obj.update(name=name, path=dest, identity=current_identity(out, dest))
    out.write_bytes(record_rel_path(name), dump_bytes(obj))  # after the shard: the record marks it done


def _copy_parts(stores: list[Store], loaded: list[tuple[str, dict[str, Any]]], out: Store, threads: int) -> None:
    """Every source shard under `out`; a published merge there is retracted first (its copies are
    replaced in place: a failed rerun must publish nothing) and a killed copy's temps removed."""
    if out.exists(MANIFEST):
        out.delete(MANIFEST)
    clean_debris(out)
    listing = {e.name: e for e in out.list(SHARDS_DIR)}
    jobs = [
        (src, shard, f"p{i + 1:03d}-{shard['name']}")
        for i, (src, (_, m)) in enumerate(zip(stores, loaded))
        for shard in m["shards"]
    ]
    for _ in ordered_map(lambda job: _copy_shard(job[0], out, job[1], job[2], listing), jobs, threads, 2 * threads):
        pass


def merge_datasets(
    sources: list[str],
    output: str,
    *,
    prefix_keys: bool = False,
    allow_mixed_shapes: bool = False,
    copy: bool = False,
    threads: int = 4,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the merged manifest at `output` (module doc); returns it."""
    if len(sources) < 2:
        raise MergeError("merge needs at least two source datasets")
    out = open_store(output, storage_options, role="output")
    stores = [open_store(u, storage_options, role="source") for u in sources]
    rels, loaded = _load_sources(out, output, sources, stores, copy)
    columns = _columns(loaded)
    _shapes(loaded, allow_mixed_shapes)
    scans = [_scan(s, m) for s, (_, m) in zip(stores, loaded)]
    if not prefix_keys:
        _check_keys([(d, k) for d, k, _ in scans], sources)
    label_names, maps = _labels(loaded, [lab for _, _, lab in scans])
    taken: set[str] = set()
    names = [_part_name(u, taken) for u in sources]
    prefixes = [f"{n}/" if prefix_keys else "" for n in names]
    if copy:
        _copy_parts(stores, loaded, out, threads)
    parts = [
        Part(
            n,
            None if copy else rel,
            (m.get("index") or {}).get("sha256", "inline"),
            int(m.get("generation", 0)),
            None if mp is None else tuple(mp),
            pre,
        )
        for n, rel, (_, m), mp, pre in zip(names, rels, loaded, maps, prefixes)
    ]
    counts: Counter[str] = Counter()
    for _, m in loaded:
        counts.update(m["totals"]["by_status"])
    config = _config(loaded, output, sources, prefix_keys, copy)
    failed = {f"{n}/{k}": v for n, (_, m) in zip(names, loaded) for k, v in m.get("failed_shards", {}).items()}
    manifest = write_manifest(
        out,
        _index(loaded, copy),
        config,
        label_names,
        "merge",
        failed=failed,
        counts=dict(counts),
        columns=columns,
        parts=[p.as_json() for p in parts],
    )
    _prune(out, manifest)
    if log:
        log(f"merged {len(sources)} datasets into {redact_url(output)}: {manifest['totals']['ok']} items")
    return manifest


def _load_sources(
    out: Store, output: str, sources: list[str], stores: list[Store], copy: bool
) -> tuple[list[str | None], list[tuple[str, dict[str, Any]]]]:
    """(each source's URI relative to the output, (uri, manifest) of each); the refusals first."""
    rels = [relative_uri(out.url(), s.url()) for s in stores]
    for u, rel in zip(sources, rels):
        if rel is None and not copy:
            raise MergeError(
                f"{redact_url(u)} is not a sibling of {redact_url(output)} on the same store; "
                "pass --copy to copy its shards under the merged root"
            )
    loaded = [(u, read_manifest(s)) for u, s in zip(sources, stores)]
    for u, m in loaded:
        if m.get("parts"):
            raise MergeError(f"{redact_url(u)} is itself a merge: merge its sources instead")
    _check_target(out, output)
    return rels, loaded


def _config(
    loaded: list[tuple[str, dict[str, Any]]], output: str, sources: list[str], prefix_keys: bool, copy: bool
) -> dict[str, Any]:
    """The merged manifest's config: the output, its format (or "mixed") and the merge itself (redacted)."""
    formats = sorted({str(f) for _, m in loaded for f in m["shards"].cols["format"].tolist()})
    return {
        "output": {"uri": redact_url(output), "format": formats[0] if len(formats) == 1 else "mixed"},
        "merge": {"sources": [redact_url(u) for u in sources], "prefix_keys": prefix_keys, "copy": copy},
    }


def merge_command(config: dict[str, Any]) -> str:
    """The command that makes this merge again (from the manifest's config; URIs redacted)."""
    merge, output = config.get("merge") or {}, (config.get("output") or {}).get("uri", "OUTPUT")
    args = ["convert-dataset", "merge", *map(str, merge.get("sources", [])), "--output", str(output)]
    args += [flag for flag, on in (("--prefix-keys", merge.get("prefix_keys")), ("--copy", merge.get("copy"))) if on]
    return shlex.join(args)


def _check_target(out: Store, output: str) -> None:
    """The output may be empty or an earlier merge, never a conversion, finished or not."""
    if out.exists(MANIFEST) and read_manifest(out).get("source_kind") != "merge":
        raise MergeError(f"{redact_url(output)} holds a converted dataset; choose another output")
    foreign = out.exists(PLAN) or out.exists(LEASE) or any(not _COPIED.match(e.name) for e in out.list(SHARDS_DIR))
    if foreign:
        raise MergeError(f"{redact_url(output)} holds (part of) a conversion; choose another output")


def _prune(out: Store, manifest: dict[str, Any]) -> None:
    """Copies (and their records) of an earlier merge into this output that the new index does
    not list: after the manifest is written, as a run removes its stale shards."""
    keep = {str(p).rsplit("/", 1)[-1] for p in manifest["shards"].cols["path"].tolist()}
    keep |= {f"{n}{RECORD_SUFFIX}" for n in manifest["shards"].cols["name"].tolist()}
    for entry in list(out.list(SHARDS_DIR)):
        if _COPIED.match(entry.name) and entry.name not in keep:
            out.delete_tree(entry.rel)
