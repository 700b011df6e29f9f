"""The shard files of a dataset root, checked and tidied: verify, repair, leftovers, stale files.

    checks = verify(store)                  # re-hash every listed shard (parallel): [ShardCheck]
    command = repair(store, checks)         # remove failing shards + manifest; the command that rebuilds them
    debris = leftovers(store)               # temps, incomplete uploads, objects no manifest lists
    removed = remove_stale_shards(store, manifest, plan_names)   # files of an old format or plan

This is the one module (with the run's own commit path) that deletes under shards/. Names and
paths come from the validated index (convert.manifest), local shards must be regular files before
they are opened (convert.records.check_regular), and the rebuild command is shell-quoted.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from .config import validate
from .formats.base import get_format
from .manifest import MANIFEST, read_manifest
from .records import ManifestError, NotRegularFile, check_regular, ordered_map, read_record, record_rel_path
from .layout import SHARDS_DIR
from .lease import Leftover, debris
from .parts import PartLayout, check_current, load_parts
from .store import Store
from .store.base import reopen

__all__ = ["ShardCheck", "leftovers", "rebuild_command", "remove_stale_shards", "repair", "stale_shard_files", "verify"]

_SHARD_FILE = re.compile(r"^(shard-\d+)(\..+)$")
# Settings a rebuild command leaves out: given as flags, secrets (storage options), or run control.
_NOT_SET = {
    "source.uri",
    "source.storage_options",
    "output.uri",
    "output.storage_options",
    "output.format",
    "shard.size",
    "output.force_unlock",
    "output.verify_resume",
    "output.lease_ttl",
    "output.compression",
    "output.compression_level",
}
_SECTIONS = ("source", "image", "shard", "output", "fetch")


@dataclass(frozen=True)
class ShardCheck:
    name: str
    ok: bool
    problem: str = ""


def _check_shard(store: Store, shard: dict[str, Any], record: str | None = None) -> ShardCheck:
    try:
        check_regular(store, shard["path"])
        size, digest = store.sha256(shard["path"])
    except FileNotFoundError:
        return ShardCheck(shard["name"], False, "missing")
    except NotRegularFile:
        return ShardCheck(shard["name"], False, "not a regular file")
    if size != shard["bytes"]:
        return ShardCheck(shard["name"], False, f"size {size} != {shard['bytes']}")
    if digest != shard["sha256"]:
        return ShardCheck(shard["name"], False, "sha256 mismatch")
    found = read_record(store, record or shard["name"])
    if found is not None and (found[0].ok, found[0].count, found[0].sha256) != (shard["ok"], shard["count"], digest):
        return ShardCheck(shard["name"], False, "counts differ from the shard's record")
    return ShardCheck(shard["name"], True)


def verify(store: Store, threads: int = 8) -> list[ShardCheck]:
    """Re-hash every shard in the index (in parallel) and compare size, sha256 and record counts;
    a merged dataset's referenced shards in their parts' roots, after checking each part is still
    the dataset merged (convert.parts.check_current)."""
    manifest = read_manifest(store)
    layout = PartLayout(load_parts(manifest, None, store.url(MANIFEST)), store.url())
    checks: list[ShardCheck] = []
    for part, uri in layout.referenced():
        try:
            check_current(reopen(uri, store.storage_options, "dataset"), part, store.url(MANIFEST))
        except ManifestError as exc:
            checks.append(ShardCheck(f"part {part.name}", False, str(exc)))

    def check(shard: dict[str, Any]) -> ShardCheck:
        uri = layout.uris[int(shard.get("part", 0))]
        if uri is None:
            return _check_shard(store, shard)
        return _check_shard(reopen(uri, store.storage_options, "dataset"), shard, shard["origin"])

    return checks + list(ordered_map(check, manifest["shards"], threads, 4 * threads))


def repair(store: Store, checks: Sequence[ShardCheck], command: Callable[[dict[str, Any]], str] | None = None) -> str:
    """Make the next `run` rebuild exactly the failing shards: delete their files and records and
    retract the manifest (readers must not trust the dataset meanwhile). Returns the command that
    rebuilds them (`rebuild_command` of the manifest's config). Only shards the validated index
    lists are touched: a check naming anything else is refused. `command` makes the command from the
    config (a copied merge: `merge.merge_command`)."""
    manifest = read_manifest(store)
    index = manifest["shards"]
    paths = dict(zip(index.cols["name"].tolist(), index.cols["path"].tolist()))
    failing = [c.name for c in checks if not c.ok]
    unknown = [name for name in failing if name not in paths]
    if unknown:
        raise ManifestError(f"{store.url(MANIFEST)}: no shard named {unknown[0][:80]!r}; nothing was removed")
    store.delete(MANIFEST)
    for name in failing:
        store.delete(record_rel_path(name))
        store.delete_tree(paths[name])
    return (command or rebuild_command)(manifest["config"])


def _leaves(data: dict[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        dotted = f"{prefix}.{key}"
        if dotted in _NOT_SET:
            continue
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted)
        else:
            yield dotted, value


def rebuild_command(config: dict[str, Any]) -> str:
    """The shell command (quoted with shlex.join) that reruns the conversion recorded in `config`
    (a manifest's redacted config): the source, output, format and shard size as flags, and every
    other setting that differs from its default (source.kind, labels, image, format options, fetch)
    as `--set key=<json>`. Storage and cluster options are left to the user (secrets never print)."""
    defaults = validate({"source": {"uri": "-"}, "output": {"uri": "-"}}).model_dump(mode="json")
    base = dict(pair for section in _SECTIONS for pair in _leaves(defaults.get(section, {}), section))
    argv = [
        "convert-dataset",
        "run",
        "--source",
        str(config["source"]["uri"]),
        "--output",
        str(config["output"]["uri"]),
        "--format",
        str(config["output"]["format"]),
        "--shard-size",
        str(config["shard"]["size"]),
    ]
    for section in _SECTIONS:
        for key, value in _leaves(config.get(section) or {}, section):
            if key not in base or base[key] != value:
                argv += ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join(argv)


def leftovers(store: Store) -> list[Leftover]:
    """Debris a reader never trusts but that costs storage: staged temps and incomplete uploads
    of failed/killed attempts, and (when a manifest exists) objects under shards/ it does not
    list. The next run holding the lease removes the first two kinds; rerunning also replaces
    unlisted shards of the current plan."""
    found: list[Leftover] = [*debris(store)]
    try:
        index = read_manifest(store)["shards"]
    except ManifestError:
        return found
    names = index.cols["name"].tolist()
    listed = set(index.cols["path"].tolist()) | {record_rel_path(n) for n in names}
    partial = {item.url for item in found}
    for entry in store.walk(SHARDS_DIR):
        url = store.url(entry.rel)
        top = "/".join(entry.rel.split("/")[:2])  # a file inside a directory-shaped shard belongs to it
        if entry.rel not in listed and top not in listed and url not in partial:
            found.append(Leftover("unlisted", url))
    return found


def stale_shard_files(
    names: Iterable[str], listed: Iterable[str], plan_names: Iterable[str], extension: str
) -> list[str]:
    """File names under shards/ that belong to an older run and that no reader will ever use.

    Stale: a shard file or record (`shard-NNNNN.<suffix>`) that the new manifest does not list and
    that is either of another format (`.lmdb` beside `.h5` shards) or outside the current plan (a
    smaller plan after shard.size grew). In-plan names of the current format are left alone: the
    next run replaces them. Temp files (`.partial`) are the leftovers cleaner's business.
    """
    listed_set, plan = set(listed), set(plan_names)
    return sorted(name for name in names if _stale(name, listed_set, plan, extension))


def _stale(name: str, listed: set[str], plan: set[str], extension: str) -> bool:
    match = _SHARD_FILE.match(name)
    if match is None or name in listed or ".partial" in name:
        return False
    shard, suffix = match.groups()
    own_file = suffix in (extension, ".record.gz") or suffix.startswith(extension + "-")
    return shard not in plan or not own_file


def _listed_files(shards: Any) -> set[str]:
    """File names under shards/ the manifest lists (its shard files and their records), read from
    the index's columns when it has them (no summary dict built per shard)."""
    cols = getattr(shards, "cols", None)
    if cols is not None:
        names, paths = cols["name"].tolist(), cols["path"].tolist()
    else:
        names, paths = [s["name"] for s in shards], [s["path"] for s in shards]
    return {p.rsplit("/", 1)[-1] for p in paths} | {f"{n}.record.gz" for n in names}


def remove_stale_shards(out: Store, manifest: dict[str, Any], plan_names: Sequence[str]) -> list[str]:
    """Delete `stale_shard_files` under shards/; call only after the new manifest is written. The
    listing is streamed: only the stale entries are kept (10^5 shards list 2 x 10^5 files)."""
    listed, plan = _listed_files(manifest["shards"]), set(plan_names)
    extension = get_format(manifest["format"]).extension
    stale = sorted(
        (e for e in out.list(SHARDS_DIR) if _stale(e.name, listed, plan, extension)),
        key=lambda e: e.name,
    )
    for entry in stale:
        (out.delete_tree if entry.is_dir else out.delete)(f"{SHARDS_DIR}/{entry.name}")
    return [e.name for e in stale]
