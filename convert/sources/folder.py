"""Folder / glob sources through fsspec, with ImageFolder labels (root/<class>/...)."""

from __future__ import annotations

import posixpath
from typing import Any, Literal

from ..specs import ItemRef
from .base import (
    IMAGE_EXTENSIONS,
    SourceError,
    SourceListing,
    full_uri,
    glob_root,
    has_magic,
    open_fs,
    relative_to,
    require_unique,
    safe_key,
)

LabelMode = Literal["auto", "folder", "none"]


def list_folder(uri: str, storage_options: dict[str, Any] | None = None, labels: LabelMode = "auto") -> SourceListing:
    """List the images under a folder (by extension) or matched by a glob (everything it matches)."""
    fs, path = open_fs(uri, storage_options)
    if has_magic(path):
        root = glob_root(path)
        found = fs.glob(path, detail=True)
        files = sorted(p for p, info in found.items() if info.get("type") == "file")
        if not files:
            raise SourceError(f"glob {uri!r} matched no files; check the pattern (e.g. 'data/train/**/*.jpg')")
    else:
        root, files = _walk(fs, path, uri)
    rels = [relative_to(p, root) for p in files]
    label_ids, label_names = _labels(rels, labels, uri)
    keys = [safe_key(r) for r in rels]
    require_unique(keys, uri)
    items = [ItemRef(key=k, uri=full_uri(fs, p), label=lab) for k, p, lab in zip(keys, files, label_ids)]
    return SourceListing(kind="folder", items=items, label_names=label_names)


def _walk(fs: Any, path: str, uri: str) -> tuple[str, list[str]]:
    """(root, sorted image paths) for a folder, or for a single image file (root = its folder)."""
    if not fs.exists(path):
        raise SourceError(f"{uri!r} does not exist; check the path (and storage_options for object stores)")
    if fs.isfile(path):
        if posixpath.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
            raise SourceError(f"{uri!r} is a file but not an image, URL list or CIFAR batch; pass a folder or glob")
        return posixpath.dirname(path), [path]
    root = path.rstrip("/") or "/"
    files = sorted(p for p in fs.find(root) if _is_image(relative_to(p, root)))
    if not files:
        exts = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise SourceError(f"no images ({exts}) under {uri!r}; check the folder or pass a glob such as '{uri}/**/*'")
    return root, files


def _is_image(rel: str) -> bool:
    # Hidden files and folders (".DS_Store", macOS "._x.jpg" resource forks, ".cache/") are never
    # dataset images; a glob that names them explicitly still selects them.
    if any(part.startswith(".") for part in rel.split("/")):
        return False
    return posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS


def _labels(rels: list[str], mode: LabelMode, uri: str) -> tuple[list[int | None], list[str] | None]:
    """Label ids from the first path segment when every item sits in a class sub-folder."""
    if mode == "none":
        return [None] * len(rels), None
    loose = next((r for r in rels if "/" not in r), None)
    if loose is not None:
        if mode == "folder":
            raise SourceError(
                f"labels=folder needs root/<class>/<image> but {loose!r} sits directly in {uri!r}; "
                "move it into a class folder or set source.labels=none"
            )
        return [None] * len(rels), None
    classes = [r.split("/", 1)[0] for r in rels]
    names = sorted(set(classes))
    index = {name: i for i, name in enumerate(names)}
    return [index[c] for c in classes], names
