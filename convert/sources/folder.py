"""Folder / glob sources through fsspec, with ImageFolder labels (root/<class>/...).

A folder is listed in parallel, one task per top-level entry (a class directory, or a run of loose
files), a few at a time and consumed in order, so only the groups being listed are in memory. The
paths stream into one listing file in the work folder (one JSON string per line, in the same order
as a sorted listing of the whole tree); shard slices are byte ranges of it, hashed as written.
Class names come from the top-level directories only. Keys are the sanitized relative paths:
unique within a group (checked while writing) and across groups (their first key segments differ).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..fetch.prefetch import prefetch
from ..specs import InputSlice, ItemRef
from .base import (
    IMAGE_EXTENSIONS,
    SourceError,
    Workdir,
    full_uri,
    glob_root,
    has_magic,
    list_dir,
    open_fs,
    relative_to,
    safe_key,
)

LabelMode = Literal["auto", "folder", "none"]
LISTING = "partitions/folder.lst"
LIST_THREADS = 8


@dataclass(frozen=True)
class FolderPlan:
    root: str  # full URI of the root; item URIs are root + "/" + relative path
    slices: list[InputSlice]
    count: int
    groups: int
    label_names: list[str] | None


@dataclass(frozen=True)
class _Group:
    name: str  # top-level entry ("" for a run of loose files)
    rels: tuple[str, ...] = ()  # already known (loose files, glob matches)


def plan_folder(
    uri: str, storage_options: dict[str, Any] | None, labels: LabelMode, step: int, work: Workdir
) -> FolderPlan:
    """List the images under a folder (by extension) or matched by a glob, into a listing file."""
    fs, path = open_fs(uri, storage_options)
    root, groups = _groups(fs, path, uri)
    listed = prefetch(groups, lambda g: _list_group(fs, root, g), depth=LIST_THREADS)
    writer = ListingWriter(step)
    with work.create(LISTING) as f:
        try:
            for got in listed:
                if got.error is not None:
                    raise got.error
                writer.add(f, got.item, got.value, uri)
        finally:
            listed.close()
    if not writer.count:
        exts = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        what = (
            f"glob {uri!r} matched no files; check the pattern (e.g. 'data/train/**/*.jpg')"
            if has_magic(path)
            else (f"no images ({exts}) under {uri!r}; check the folder or pass a glob such as '{uri}/**/*'")
        )
        raise SourceError(what)
    names = _label_names(writer, labels, uri)
    slices = writer.slices(work.url(LISTING))
    return FolderPlan(full_uri(fs, root), slices, writer.count, len(writer.first_segments), names)


def _groups(fs: Any, path: str, uri: str) -> tuple[str, list[_Group]]:
    """(root, top-level groups in the order of a sorted listing of the whole tree)."""
    if has_magic(path):
        root = glob_root(path)
        found = fs.glob(path, detail=True)
        files = sorted(p for p, info in found.items() if info.get("type") == "file")
        return root, [_Group("*", tuple(relative_to(p, root) for p in files))]
    if not fs.exists(path):
        raise SourceError(f"{uri!r} does not exist; check the path (and storage_options for object stores)")
    if fs.isfile(path):
        if posixpath.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
            raise SourceError(f"{uri!r} is a file but not an image, URL list or CIFAR batch; pass a folder or glob")
        return posixpath.dirname(path), [_Group("", (posixpath.basename(path),))]
    root = path.rstrip("/") or "/"
    entries = []
    for full, kind in list_dir(fs, root):
        name = relative_to(full, root)
        if name and not name.startswith("."):
            entries.append((name + "/" if kind == "directory" else name, kind))
    entries.sort()  # "a.b/" < "a/" < "a0": the order of full paths in one sorted listing
    groups: list[_Group] = []
    loose: list[str] = []  # images directly under root, between two subfolders in sorted order
    for name, kind in entries:
        if kind == "directory":
            if loose:
                groups.append(_Group("", tuple(loose)))
                loose = []
            groups.append(_Group(name.rstrip("/")))
        elif _is_image(name):
            loose.append(name)
    if loose:
        groups.append(_Group("", tuple(loose)))
    return root, groups


def _list_group(fs: Any, root: str, group: _Group) -> list[str]:
    if group.rels or group.name in ("", "*"):
        return list(group.rels)
    top = f"{root.rstrip('/')}/{group.name}"
    return sorted(r for r in (relative_to(p, root) for p in fs.find(top)) if _is_image(r))


class ListingWriter:
    """Writes relative paths as JSON lines; records every step-th offset and each slice's sha256."""

    def __init__(self, step: int) -> None:
        self.step, self.count, self.pos = step, 0, 0
        self.offsets: list[int] = []
        self.digests: list[str] = []
        self._hash = hashlib.sha256()
        self.first_segments: dict[str, str] = {}  # first key segment -> group that has it
        self.classes: list[str] = []
        self.loose: str | None = None

    def add(self, f: Any, group: _Group, rels: list[str], uri: str) -> None:
        keys = [safe_key(r) for r in rels]
        dupes = [k for k, n in Counter(keys).items() if n > 1]
        for k in {k.split("/", 1)[0] for k in keys}:
            if self.first_segments.setdefault(k, group.name) != group.name:
                dupes.append(f"{k}/...")
        if dupes:
            shown = ", ".join(repr(k) for k in sorted(dupes)[:5])
            raise SourceError(f"{uri}: duplicate keys {shown}; every item needs a distinct key")
        if rels and group.name not in ("", "*"):
            self.classes.append(group.name)
        for rel in rels:
            if self.loose is None and "/" not in rel:
                self.loose = rel
            self.write_line(f, (json.dumps(rel) + "\n").encode())
        if group.name == "*":  # a glob: class names from the first segment of what it matched
            self.classes = sorted({r.split("/", 1)[0] for r in rels if "/" in r})

    def write_line(self, f: Any, line: bytes) -> None:
        """One listing row (a JSON string and its newline), cut into slices every `step` rows."""
        if self.count % self.step == 0:
            self._cut()
            self.offsets.append(self.pos)
        f.write(line)
        self._hash.update(line)
        self.pos += len(line)
        self.count += 1

    def _cut(self) -> None:
        if self.offsets:
            self.digests.append(self._hash.hexdigest())
        self._hash = hashlib.sha256()

    def slices(self, listing_uri: str) -> list[InputSlice]:
        self._cut()
        ends = self.offsets[1:] + [self.pos]
        return [
            InputSlice(
                "folder",
                listing_uri,
                f"sha256:{d}",
                self.pos,
                a,
                b,
                j * self.step,
                min(self.step, self.count - j * self.step),
            )
            for j, (a, b, d) in enumerate(zip(self.offsets, ends, self.digests))
        ]


def _label_names(writer: ListingWriter, mode: LabelMode, uri: str) -> list[str] | None:
    """Class names (sorted) when every item sits in a class sub-folder."""
    if mode == "none":
        return None
    if writer.loose is not None:
        if mode == "folder":
            raise SourceError(
                f"labels=folder needs root/<class>/<image> but {writer.loose!r} sits directly in {uri!r}; "
                "move it into a class folder or set source.labels=none"
            )
        return None
    return sorted(set(writer.classes))


def _is_image(rel: str) -> bool:
    # Hidden files and folders (".DS_Store", macOS "._x.jpg" resource forks, ".cache/") are never
    # dataset images; a glob that names them explicitly still selects them.
    if any(part.startswith(".") for part in rel.split("/")):
        return False
    return posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS


def folder_refs(rows: Iterator[tuple[Any, ...]], root: str, names: dict[str, int] | None) -> Iterator[ItemRef]:
    """ItemRefs of a folder slice's rows (JSON-encoded relative paths)."""
    base = root.rstrip("/")
    for _, line, *_ in rows:
        rel = json.loads(line)
        label = names[rel.split("/", 1)[0]] if names is not None else None
        yield ItemRef(key=safe_key(rel), uri=f"{base}/{rel}", label=label)
