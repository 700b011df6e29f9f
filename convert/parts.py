"""The parts of a merged dataset: other dataset roots whose shards its index references.

A merged manifest (convert.merge) lists its sources under "parts"; the index's integer column
`part` says which one holds each shard (1-based into the list; 0, or no column at all, is the
dataset's own root, so every dataset written before merges existed stays valid):

    "parts": [{"name": "a", "uri": "../a", "index_sha256": "...", "generation": 0,
               "labels": [0, 2, 1] | null, "key_prefix": "" | "a/"}, ...]

`uri` is where the part's shards live: null when they were copied under this root (`--copy`, or
a source on another store), a relative path from this root (the usual case: same store), or an
absolute URI of an allowed scheme. What a relative one may be: '..' segments first (at least
one: a part is never inside the dataset that references it), then plain segments, never '.',
'', '\\', ':' or control characters, and never climbing above the store's root (the filesystem
root or the bucket). An absolute one must use a scheme of `PART_SCHEMES`, carry no credentials,
query or fragment. `labels` maps the part's own label ids to the merged `label_names` (null: kept
as they are); `key_prefix` is prepended to its keys at read time. Shards are never rewritten.
A referenced part whose manifest index digest no longer matches `index_sha256` was rewritten
after the merge: one-line ManifestError naming the part and the fix (rerun merge).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np

from .records import ManifestError, is_shard_name, read_meta
from .store import Store, has_scheme, is_local, scheme_of

PART_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "file", "local", "memory")
_SEGMENT = re.compile(r"^[^\x00-\x1f\x7f\\:]+$")

__all__ = ["PART_SCHEMES", "Part", "check_part_uri", "load_parts", "relative_uri", "resolve_part", "same_store"]


@dataclass(frozen=True, slots=True)
class Part:
    """One validated entry of a manifest's "parts"."""

    name: str
    uri: str | None  # as stored: None = copied under this root
    index_sha256: str
    generation: int
    labels: tuple[int, ...] | None
    key_prefix: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uri": self.uri,
            "index_sha256": self.index_sha256,
            "generation": self.generation,
            "labels": None if self.labels is None else list(self.labels),
            "key_prefix": self.key_prefix,
        }


def check_part_uri(uri: Any, where: str) -> str:
    """A part URI as the module doc allows; one-line ManifestError otherwise."""
    bad = f"{where}: part uri {str(uri)[:120]!r}"
    if not isinstance(uri, str) or not uri or len(uri) > 2048:
        raise ManifestError(f"{bad} is not a path or URI; rerun merge")
    if has_scheme(uri):
        scheme = scheme_of(uri)
        parts = urlsplit(uri)
        if scheme not in PART_SCHEMES:
            raise ManifestError(f"{bad}: scheme {scheme!r} is not one of {', '.join(PART_SCHEMES)}; rerun merge")
        if "@" in parts.netloc or parts.query or parts.fragment or "?" in uri or "#" in uri:
            raise ManifestError(f"{bad} carries credentials, a query or a fragment; rerun merge")
        if any(ord(c) < 32 or c == "\\" for c in uri):
            raise ManifestError(f"{bad} holds control characters or a backslash; rerun merge")
        return uri
    segments = uri.split("/")
    ups = next((i for i, s in enumerate(segments) if s != ".."), len(segments))
    rest = segments[ups:]
    if ups == 0 or not rest or not all(s not in ("", ".", "..") and _SEGMENT.match(s) for s in rest):
        raise ManifestError(
            f"{bad} is not '..' segments followed by plain names (a sibling of this dataset); rerun merge"
        )
    return uri


def resolve_part(root_url: str, uri: str) -> str:
    """The absolute URI of part `uri` (checked) seen from a dataset whose root is `root_url`
    (Store.url(""): an absolute local path or scheme://bucket/key)."""
    if has_scheme(uri):
        return uri
    if is_local(root_url):
        base = root_url.split("://", 1)[1] if "://" in root_url else root_url
        head, key = "", os.path.abspath(base)
    else:
        scheme, rest = root_url.split("://", 1)
        bucket, _, key = rest.partition("/")
        head, key = f"{scheme}://{bucket}", "/" + key.strip("/")
    ups = uri.split("/").count("..")
    depth = len([s for s in key.split("/") if s])
    if ups > depth:
        raise ManifestError(f"{root_url}: part uri {uri!r} climbs above the store's root; rerun merge")
    return head + posixpath.normpath(posixpath.join(key, uri))


def same_store(a: str, b: str) -> bool:
    """Both roots on one store: both local, or one scheme and bucket / host."""
    if is_local(a) or is_local(b):
        return is_local(a) and is_local(b)
    (sa, ra), (sb, rb) = a.split("://", 1), b.split("://", 1)
    return sa.lower() == sb.lower() and ra.split("/", 1)[0] == rb.split("/", 1)[0]


def relative_uri(root_url: str, part_url: str) -> str | None:
    """The relative part URI from `root_url` to `part_url` (Store.url("") of each), or None when
    they are on different stores or the part is not a sibling (inside the root, or the root itself)."""
    if not same_store(root_url, part_url):
        return None
    if is_local(root_url):
        rel = os.path.relpath(part_url, root_url).replace(os.sep, "/")
    else:
        ka, kb = (u.split("://", 1)[1].partition("/")[2].strip("/") for u in (root_url, part_url))
        rel = posixpath.relpath("/" + kb, "/" + ka)
    try:
        return check_part_uri(rel, root_url)
    except ManifestError:
        return None


def _part(entry: Any, i: int, n_labels: int, where: str) -> Part:
    w = f"{where}: part {i + 1}"
    if not isinstance(entry, dict):
        raise ManifestError(f"{w} is not an object; rerun merge")
    name, sha, gen = entry.get("name"), entry.get("index_sha256"), entry.get("generation", 0)
    labels, prefix = entry.get("labels"), entry.get("key_prefix", "")
    if not is_shard_name(name):
        raise ManifestError(f"{w}: bad part name {str(name)[:80]!r}; rerun merge")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}|inline", sha):
        raise ManifestError(f"{w} ({name}): index_sha256 is not a hex digest; rerun merge")
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 0:
        raise ManifestError(f"{w} ({name}): generation must be a non-negative integer; rerun merge")
    if labels is not None and not (
        isinstance(labels, list)
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_labels for v in labels)
    ):
        raise ManifestError(f"{w} ({name}): its label map is not ids of label_names; rerun merge")
    if not isinstance(prefix, str) or len(prefix) > 256 or any(ord(c) < 32 for c in prefix):
        raise ManifestError(f"{w} ({name}): bad key_prefix; rerun merge")
    uri = entry.get("uri")
    if uri is not None:
        check_part_uri(uri, w)
    return Part(str(name), uri, sha, gen, None if labels is None else tuple(labels), prefix)


def load_parts(manifest: dict[str, Any], part_column: np.ndarray | None, where: str) -> tuple[Part, ...]:
    """The manifest's validated parts; every value of the index's `part` column in range."""
    raw = manifest.get("parts") or []
    if not isinstance(raw, list):
        raise ManifestError(f"{where}: parts is not a list; rerun merge")
    n_labels = len(manifest.get("label_names") or [])
    parts = tuple(_part(entry, i, n_labels, where) for i, entry in enumerate(raw))
    if len({p.name for p in parts}) != len(parts):
        raise ManifestError(f"{where}: two parts share a name; rerun merge")
    if part_column is not None and len(part_column):
        lo, hi = int(part_column.min()), int(part_column.max())
        if lo < 0 or hi > len(parts):
            raise ManifestError(
                f"{where}: the index names part {hi if hi > len(parts) else lo}, the manifest lists {len(parts)}; rerun merge"
            )
    return parts


def check_current(store: Store, part: Part, where: str) -> None:
    """A referenced part must still be the dataset that was merged: its manifest's index digest."""
    try:
        manifest = json.loads(read_meta(store, "manifest.json"))
        sha = (manifest.get("index") or {}).get("sha256", "inline")
    except FileNotFoundError:
        sha = None
    except (ValueError, AttributeError):
        sha = "unreadable"
    if sha != part.index_sha256:
        state = "is gone" if sha is None else "was rewritten after the merge"
        raise ManifestError(
            f"{where}: part {part.name!r} ({store.url()}) {state}; rerun `convert-dataset merge` to update the merge"
        )


def label_lookup(parts: Sequence[Part]) -> list[np.ndarray | None]:
    """Per part (index 0 = the dataset's own shards): the label id map as an array, or None."""
    return [None] + [None if p.labels is None else np.asarray(p.labels, np.int64) for p in parts]


class PartLayout:
    """How a dataset reads its parts: each part's root, label map and key prefix, by part number
    (0 = the dataset's own shards). Built once per `Dataset`; picklable (plain values)."""

    def __init__(self, parts: Sequence[Part], root_url: str) -> None:
        self.parts = tuple(parts)
        resolved = [None if p.uri is None else resolve_part(root_url, p.uri) for p in parts]
        self.uris: list[str | None] = [None, *resolved]
        self.labels = label_lookup(parts)
        self.prefixes = [""] + [p.key_prefix for p in parts]
        self.names = ["(own)"] + [p.name for p in parts]

    def referenced(self) -> list[tuple[Part, str]]:
        """(part, absolute URI) of the parts whose shards live in another root."""
        return [(p, uri) for p, uri in zip(self.parts, self.uris[1:]) if uri is not None]

    def label(self, label: Any, part: int) -> int:
        """The merged label id of a part's stored label (None / negative: -1, no label)."""
        if label is None or int(label) < 0:
            return -1
        lut = self.labels[part]
        if lut is None:
            return int(label)
        if int(label) >= lut.size:
            raise ManifestError(
                f"part {self.names[part]!r}: label id {int(label)} is outside its label map "
                f"({lut.size} labels); rerun merge"
            )
        return int(lut[int(label)])

    def finish(self, item: dict[str, Any], part: int) -> dict[str, Any]:
        """An item of `part` as the merged dataset shows it: label remapped, key prefixed."""
        item["label"] = self.label(item["label"], part)
        if self.prefixes[part]:
            item["key"] = self.prefixes[part] + str(item["key"])
        return item

    def ledger(self, cols: dict[str, Any], part: int) -> dict[str, Any]:
        """A part's ledger columns as the merged dataset shows them (labels, keys)."""
        out = dict(cols)
        labels = np.asarray(cols["label"], np.int64)
        lut = self.labels[part]
        if lut is not None and labels.size and lut.size:
            if labels.max() >= lut.size:
                self.label(int(labels.max()), part)  # raises, naming the part
            out["label"] = np.where(labels >= 0, lut[np.clip(labels, 0, None)], -1)
        if self.prefixes[part]:
            out["key"] = [self.prefixes[part] + str(k) for k in cols["key"]]
        return out
