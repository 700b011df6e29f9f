"""Append: what a grown source adds to a finished dataset, decided once on the client.

`run --append` plans the source again (its files into `gen/<generation>/`, beside the old ones)
and keeps the previous plan's shards exactly as they are: their specs and fingerprints come from
the old plan.gz, so resume finds every one committed and nothing is rewritten. What is new:
- URL lists: a list file the old plan did not have converts whole; a text list that grew is
  proven to have only grown at its end (each old slice's digest, recorded at planning, is
  checked in one sequential read of the old bytes) and its rows after the old end convert;
- folders and object-store prefixes: objects whose listing row the old plan did not hold
  (8 bytes a row of the old listing in the client while deciding, like the key-column check).
New rows get global rows after the old total (derived keys stay unique), new shards the names
after the last one; the label table is the old one with new names added at its end (old ids keep
their meaning). A file or object removed, or a list changed in the middle, is a one-line
ConfigError naming the first changed slice (its shard): nothing is converted then.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .config import ConfigError
from .manifest import MANIFEST, PLAN, ManifestError, read_manifest
from .plan import PlanFile, read_plan_file
from .redact import redact_url
from .sources import SourcePlan, Workdir
from .sources.folder import ListingWriter
from .sources.lists import check_slices, open_stream, slice_digest
from .sources.rows import read_rows
from .sources.urls import key_hash
from .specs import InputSlice, ShardSpec, shard_name
from .store import Store
from .summary import explain_changes


@dataclass(frozen=True)
class Previous:
    """The finished dataset appended to: its manifest (aggregates) and its plan."""

    manifest: dict[str, Any]
    plan: PlanFile
    generation: int  # the new generation's number

    @property
    def prefix(self) -> str:
        return f"gen/{self.generation:06d}/"


def previous(out: Store, config_data: dict[str, Any]) -> Previous:
    """The dataset at `out`, checked appendable with these settings (one-line ConfigError otherwise)."""
    try:
        manifest = read_manifest(out)
        plan = read_plan_file(out.read_bytes(PLAN))
    except (ManifestError, FileNotFoundError) as exc:
        raise ConfigError(
            f"--append needs a finished dataset at {out.url('')} ({str(exc).splitlines()[0][:160]}); "
            "run without --append first"
        ) from None
    old = manifest.get("config") or {}
    changes = explain_changes(old, config_data)
    if redact_url(str(old.get("source", {}).get("uri", ""))) != config_data["source"]["uri"]:
        changes.append(f"source.uri changed: {old.get('source', {}).get('uri')} → {config_data['source']['uri']}")
    if changes:
        raise ConfigError(
            f"cannot append to {out.url('')}: it was written with other settings ({'; '.join(changes)}); "
            "use the same settings, or --overwrite to rebuild it"
        )
    generation = manifest.get("generation", 1)
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise ConfigError(
            f"{out.url(MANIFEST)}: generation {str(generation)[:40]!r} is not a whole number >= 1; "
            "the manifest was edited or corrupted - --overwrite to rebuild"
        )
    return Previous(manifest, plan, generation + 1)


def appending_marker(generation: int) -> str:
    """Written before an append changes anything, removed once its manifest is published: a plain
    rerun of an interrupted append is refused (it would replan the grown source and rebuild all)."""
    return f"gen/{generation:06d}/APPENDING"


def generation_of(out: Store) -> int:
    """The generation of the dataset at `out` (1 without a manifest or the key: a first run)."""
    try:
        manifest = json.loads(out.read_bytes(MANIFEST))
    except (FileNotFoundError, ValueError):
        return 1
    generation = manifest.get("generation", 1) if isinstance(manifest, dict) else 1
    return generation if isinstance(generation, int) else 1


@dataclass(frozen=True)
class Appended:
    """The combined plan: the old specs (as planned), then the new ones."""

    plan: SourcePlan
    fingerprints: dict[str, str]  # the old specs': their records carry these
    digests: list[str]  # per slice row
    added: int  # new shards
    retired: list[str]  # --rebuild-changed: old shards of a changed part, no longer in the dataset


def combine(
    prev: Previous,
    new: SourcePlan,
    work: Workdir,
    source_options: dict[str, Any] | None,
    work_options: dict[str, Any] | None,
    step: int,
    rebuild: bool = False,
) -> Appended:
    """The old plan plus what `new` (the grown source, planned into prev.prefix) adds; `rebuild`
    (--rebuild-changed): old shards of a changed part are retired and that part converts again."""
    old = prev.plan
    kind = old.specs[0].source.kind if old.specs else new.kind
    if new.kind != kind or kind == "cifar":
        raise ConfigError(f"--append adds to URL-list and folder datasets; this one is {kind}, the source {new.kind}")
    was, now = old.specs[0].source if old.specs else None, new.specs[0].source if new.specs else None
    if was and now and (was.columns, was.column_types, was.keys) != (now.columns, now.column_types, now.keys):
        raise ConfigError(
            f"cannot append: the source's columns {list(now.columns)} ({now.keys} keys) differ from the "
            f"dataset's {list(was.columns)} ({was.keys} keys); keep the same columns, or --overwrite to rebuild"
        )
    rows = max((sl.first_row + sl.count for s in old.specs for sl in s.slices), default=0)
    retired: list[str] | None = [] if rebuild else None
    if kind == "urls":
        slices, digests = _grown_lists(old, new, source_options, retired)
    else:
        slices, digests = _grown_folder(old, new, work, work_options, step, retired)
    gone = set(retired or ())
    slices = _rebased(slices, rows)
    names = _labels(prev.manifest.get("label_names"), new.label_names)
    source = new.specs[0].source if new.specs else old.specs[0].source
    if names is not None:
        data = json.dumps(names).encode()
        sha = hashlib.sha256(data).hexdigest()[:16]
        rel = f"partitions/labels-{sha}.json"  # named by content: a rerun never changes a planned table
        with work.create(rel) as f:
            f.write(data)
        source = replace(source, labels=work.url(rel), labels_sha=sha)
    start = max((int(s.name.rsplit("-", 1)[1]) for s in old.specs), default=-1) + 1
    added = [ShardSpec(start + j, shard_name(start + j), (sl,), source) for j, sl in enumerate(slices)]
    # plan.gz holds URIs redacted, and the version/size the file had then: a kept shard that still
    # has to run (an interrupted append's, a failed one's) reads the file as it is now - its planned
    # bytes are proven unchanged above (or its shards retired) - so it gets the live URI and identity
    live = {redact_url(sl.uri): (sl.uri, sl.version, sl.size) for s in new.specs for sl in s.slices}

    def current(sl: InputSlice) -> InputSlice:
        uri, version, size = live.get(sl.uri, (sl.uri, sl.version, sl.size))
        return replace(sl, uri=uri, version=version, size=size)

    kept = [
        (replace(spec, slices=tuple(current(sl) for sl in spec.slices)), fp, d)
        for spec, fp, d in zip(old.specs, old.fingerprints, old.digests)
        if spec.name not in gone
    ]
    specs = [spec for spec, _, _ in kept] + added
    all_digests = [d for _, _, d in kept] + digests
    plan = SourcePlan(kind, specs, names, sum(len(s) for s in specs), new.partitions, new.columns, tuple(all_digests))
    return Appended(plan, {spec.name: fp for spec, fp, _ in kept}, all_digests, len(added), sorted(gone))


def _rebased(slices: Sequence[InputSlice], rows: int) -> list[InputSlice]:
    out, at = [], rows
    for sl in slices:
        out.append(replace(sl, first_row=at))
        at += sl.count
    return out


def _labels(old: list[str] | None, new: list[str] | None) -> list[str] | None:
    if old is None and new is None:
        return None
    if old is None or new is None:
        raise ConfigError(
            "cannot append: the source's labels changed kind (class names vs none or integer ids); --overwrite to rebuild"
        )
    known = set(old)
    return [*old, *sorted(n for n in new if n not in known)]  # old ids keep their meaning


class Changed(ConfigError):
    """The source changed where the dataset already holds it: a one-line error (the
    `--rebuild-changed` way out retires the shards named in `retire`)."""

    def __init__(self, message: str, retire: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.retire = tuple(retire)


def _changed(spec: ShardSpec, uri: str, what: str, retire: Sequence[str] = ()) -> Changed:
    return Changed(
        f"cannot append: {redact_url(uri)} {what} (first changed slice: {spec.name}, rows "
        f"{spec.slices[0].first_row}-{spec.slices[0].first_row + spec.slices[0].count - 1}); only new rows "
        "at the end and new files can be appended - restore it, --rebuild-changed to convert it again, "
        "or --overwrite to rebuild",
        retire,
    )


def _grown_lists(
    old: PlanFile, new: SourcePlan, options: dict[str, Any] | None, retired: list[str] | None
) -> tuple[list[InputSlice], list[str]]:
    """New slices (and their digests) of a URL-list source: new files whole, grown text lists' tails.
    `retired` (--rebuild-changed): a changed or removed file's old shard names go there and the
    file converts whole again, instead of the error."""
    before: dict[str, list[tuple[ShardSpec, str]]] = {}
    for spec, digest in zip(old.specs, old.digests):
        before.setdefault(spec.slices[0].uri, []).append((spec, digest))
    files: dict[str, list[tuple[InputSlice, str]]] = {}
    for spec, digest in zip(new.specs, new.digests or [""] * len(new.specs)):
        files.setdefault(spec.slices[0].uri, []).append((spec.slices[0], digest))
    gone = [u for u in before if u not in {redact_url(k) for k in files}]
    if gone and retired is None:
        raise _changed(before[gone[0]][0][0], gone[0], "is gone from the source")
    for uri in gone:
        assert retired is not None  # gone and no --rebuild-changed raised above
        retired.extend(spec.name for spec, _ in before[uri])
    slices: list[InputSlice] = []
    digests: list[str] = []
    for uri, now in files.items():
        prior = before.get(redact_url(uri))
        if prior is None:
            slices += [sl for sl, _ in now]
            digests += [d for _, d in now]
        elif (prior[0][0].slices[0].version, prior[0][0].slices[0].size) != (now[0][0].version, now[0][0].size):
            try:
                tail = _tail(uri, prior, now, options)
            except Changed:
                if retired is None:
                    raise
                retired.extend(spec.name for spec, _ in prior)
                tail = now
            slices += [sl for sl, _ in tail]
            digests += [d for _, d in tail]
    return slices, digests


def _tail(
    uri: str, prior: list[tuple[ShardSpec, str]], now: list[tuple[InputSlice, str]], options: dict[str, Any] | None
) -> list[tuple[InputSlice, str]]:
    """The slices of a changed list file after its planned end, once its planned bytes are proven
    unchanged (one sequential read); a ConfigError naming the first changed slice otherwise."""
    old = [spec.slices[0] for spec, _ in prior]
    if not all(d for _, d in prior) or old[0].kind.startswith("parquet"):
        raise _changed(prior[0][0], uri, "changed since the dataset was planned (a parquet list cannot grow)")
    end, rows, base = old[-1].stop, sum(sl.count for sl in old), now[0][0].first_row
    out: list[tuple[InputSlice, str]] = []
    with open_stream(uri, now[0][0].kind, options) as f:
        bad = check_slices(f, old, [d for _, d in prior])
        if bad is not None:
            raise _changed(prior[bad][0], uri, "changed in the middle")
        for sl, digest in now:
            if sl.stop <= end:
                continue
            if sl.start < end:  # the slice that held the old end: its rows after it
                count = sl.first_row - base + sl.count - rows
                h = slice_digest()
                h.update(f.read(sl.stop - end))
                sl, digest = replace(sl, start=end, count=count), h.hexdigest()
            if sl.count > 0:
                out.append((sl, digest))
    return out


def _grown_folder(
    old: PlanFile, new: SourcePlan, work: Workdir, options: dict[str, Any] | None, step: int, retired: list[str] | None
) -> tuple[list[InputSlice], list[str]]:
    """Slices of a new listing file holding the rows of `new` the old listings do not (with
    `retired`, --rebuild-changed: an old shard that lost objects is retired, its other rows re-added)."""
    parts = [_row_hashes(spec.slices[0], options) for spec in old.specs]
    hashes = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    order = np.argsort(hashes, kind="stable")
    hashes, owner = hashes[order], owner[order]

    def matches(spec: ShardSpec) -> tuple[list[str], np.ndarray, np.ndarray]:
        lines = [line for _, line, *_ in read_rows(spec.slices[0], options)]
        h = np.array([key_hash(line) for line in lines], np.uint64)
        at = np.minimum(np.searchsorted(hashes, h), max(len(hashes) - 1, 0))
        hit = (hashes[at] == h) if len(hashes) else np.zeros(len(h), bool)
        return lines, at, hit

    found = np.zeros(len(hashes), bool)
    for spec in new.specs:
        _, at, hit = matches(spec)
        found[at[hit]] = True
    missing = np.unique(owner[~found])
    if missing.size and retired is None:
        first = old.specs[int(missing[0])]
        raise _changed(first, first.source.root, f"lost {int((~found).sum())} object(s) the dataset holds")
    gone = np.zeros(len(old.specs), bool)
    gone[missing] = True
    if retired is not None:
        retired.extend(old.specs[int(i)].name for i in missing)
    writer, buf = ListingWriter(step), io.BytesIO()  # the new rows only: an append's size
    for spec in new.specs:
        lines, at, hit = matches(spec)
        again = gone[owner[at]] if len(owner) else np.zeros(len(lines), bool)
        for line, keep in zip(lines, (~hit | again).tolist()):
            if keep:
                writer.write_line(buf, (line + "\n").encode())
    if not writer.count:
        return [], []
    data = buf.getvalue()
    rel = f"partitions/added-{hashlib.sha256(data).hexdigest()[:16]}.lst"  # by content: a rerun rewrites nothing
    with work.create(rel) as f:
        f.write(data)
    slices = writer.slices(work.url(rel))
    return slices, [""] * len(slices)


def _row_hashes(sl: InputSlice, options: dict[str, Any] | None) -> np.ndarray:
    return np.array([key_hash(line) for _, line, *_ in read_rows(sl, options)], np.uint64)


__all__ = ["Appended", "Changed", "Previous", "appending_marker", "combine", "generation_of", "previous"]
