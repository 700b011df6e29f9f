# ruff: noqa
"""A frozen copy of the wave-1 planner (listing every item, then cutting shards), for comparison.

tests/test_plan_equivalence.py converts the same inputs through this copy and the partitioned
planner and requires the same items (keys, uris, labels, members) in the same shards. Copied
verbatim from commit 6e902bc (sources/base.py, folder.py, urls.py, cifar.list_cifar, plan.plan_shards);
do not "fix" it - it is the reference.
"""

from __future__ import annotations

from convert.sources.cifar import _batch_paths, _data, _label_names, _labels as _cifar_labels, _read
from convert.specs import ItemRef, shard_name


import hashlib
import posixpath
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import has_magic, url_to_fs


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_KEY_BYTES = 255  # UTF-8 bytes; LMDB's default key limit is 511 and the shard key may add a prefix
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # 2+ chars so "C:\..." is not a scheme


class SourceError(ValueError):
    """A user-facing listing problem; one line naming the path/item and the fix."""


@dataclass(frozen=True)
class SourceListing:
    """Every input item of a source, in deterministic order, plus the label id -> name table."""

    kind: str  # "folder" | "urls" | "cifar"
    items: list[ItemRef]
    label_names: list[str] | None  # index = label id

    def __len__(self) -> int:
        return len(self.items)


def _clean_segment(seg: str) -> str:
    # Control/format/unassigned/surrogate characters and line separators become "_" so keys
    # stay printable, UTF-8 encodable and single-line (ledgers, logs, HDF5/LMDB names).
    return "".join("_" if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" else c for c in seg)


def safe_key(text: str) -> str:
    """A relative, '/'-separated key: no '..', '.', empty segments or control chars; <= MAX_KEY_BYTES.

    Over-long keys keep their start and gain a hash of the full text so they stay unique.
    Raises SourceError when nothing usable remains (e.g. "", "/", "..").
    """
    parts = [_clean_segment(p) for p in str(text).replace("\\", "/").split("/")]
    key = "/".join(p for p in parts if p.strip() and p not in (".", ".."))
    if not key:
        raise SourceError(f"key {text!r} has no usable characters; give the item a plain name such as 'img_0001'")
    raw = key.encode("utf-8")
    if len(raw) > MAX_KEY_BYTES:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        head = raw[: MAX_KEY_BYTES - 17].decode("utf-8", "ignore")  # "ignore" drops a split character
        key = head.rstrip("/") + "~" + digest
    return key


def require_unique(keys: Iterable[str], where: str) -> None:
    """SourceError naming (up to five) keys that occur more than once."""
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    if dupes:
        shown = ", ".join(repr(k) for k in sorted(dupes)[:5])
        more = f" and {len(dupes) - 5} more" if len(dupes) > 5 else ""
        raise SourceError(f"{where}: duplicate keys {shown}{more}; every item needs a distinct key")


def open_fs(uri: str, storage_options: dict[str, Any] | None) -> tuple[AbstractFileSystem, str]:
    """fsspec filesystem and protocol-less path for `uri` (local paths become absolute)."""
    try:
        return url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise SourceError(f"{uri}: cannot open ({exc}); check the URL scheme and storage_options") from None


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def full_uri(fs: AbstractFileSystem, path: str) -> str:
    """A URI the fetch layer can open: the absolute path for local files, else protocol://path."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def glob_root(path: str) -> str:
    """The non-glob prefix of a glob path: '/data/train/**/*.jpg' -> '/data/train'."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if has_magic(part):
            return "/".join(parts[:i]) or "/"
    return posixpath.dirname(path)


def relative_to(path: str, root: str) -> str:
    """`path` relative to `root` with '/' separators (both protocol-less fsspec paths)."""
    root = root.rstrip("/")
    return path[len(root) :].lstrip("/") if root and path.startswith(root + "/") else path.lstrip("/")


def has_scheme(entry: str) -> bool:
    """True for 'https://...', 's3://...', 'file:...', 'data:...'; False for paths (incl. 'C:\\x')."""
    return bool(_URL_SCHEME.match(entry))


# ---- folder.py


import posixpath
from typing import Any, Literal


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


# ---- urls.py


import csv
import io
import math
import posixpath
from collections.abc import Iterable
from typing import Any


LIST_SUFFIXES = (".txt", ".csv", ".parquet")
_COLUMNS = ("url", "label", "key")
Row = tuple[str, Any, Any]  # (url, label cell, key cell)


def list_urls(uri: str, storage_options: dict[str, Any] | None = None) -> SourceListing:
    """List the items of a .txt / .csv / .parquet URL list."""
    fs, path = open_fs(uri, storage_options)
    if not fs.isfile(path):
        raise SourceError(f"URL list {uri!r} not found; check the path (and storage_options for object stores)")
    suffix = posixpath.splitext(path)[1].lower()
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise SourceError(f"cannot read URL list {uri!r} ({exc}); check permissions / storage_options") from None
    if suffix == ".parquet":
        rows = _parquet_rows(raw, uri)
    elif suffix == ".csv":
        rows = _csv_rows(_text(raw, uri), uri)
    else:
        rows = _txt_rows(_text(raw, uri))
    if not rows:
        raise SourceError(f"URL list {uri!r} has no URLs; add one URL (or path) per line/row")
    base = full_uri(fs, posixpath.dirname(path))
    return _build(rows, base, uri)


def _text(raw: bytes, uri: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as exc:
        raise SourceError(f"URL list {uri!r} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None


def _txt_rows(text: str) -> list[Row]:
    lines = (line.strip() for line in text.splitlines())
    return [(line, None, None) for line in lines if line and not line.startswith("#")]


def _csv_rows(text: str, uri: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise SourceError(f"URL list {uri!r} is empty; expected a header row with a 'url' column")
    cols = {name.strip().lower(): i for i, name in enumerate(header)}
    _require_url(cols, uri)
    rows = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        get = lambda name: _cell(cells, cols.get(name))  # noqa: E731
        rows.append((get("url") or "", get("label"), get("key")))
    return rows


def _cell(cells: list[str], index: int | None) -> str | None:
    if index is None or index >= len(cells):
        return None
    return cells[index].strip() or None


def _parquet_rows(raw: bytes, uri: str) -> list[Row]:
    try:
        import pyarrow.parquet as pq  # lazy: only parquet lists need pyarrow
    except ImportError:
        raise SourceError(
            f"reading {uri!r} needs pyarrow; install it with: pip install 'convert[parquet]' (or pip install pyarrow)"
        ) from None
    try:
        pf = pq.ParquetFile(io.BytesIO(raw))
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for non-parquet bytes
        raise SourceError(f"{uri!r} is not a readable parquet file ({exc}); check the file") from None
    cols = {name.strip().lower(): name for name in pf.schema_arrow.names}
    _require_url(cols, uri)
    wanted = [cols[c] for c in _COLUMNS if c in cols]
    table = pf.read(columns=wanted)
    data = {c: table.column(cols[c]).to_pylist() for c in _COLUMNS if c in cols}
    n = table.num_rows
    urls, labels, keys = (data.get(c, [None] * n) for c in _COLUMNS)
    return [(str(u or "").strip(), lab, k) for u, lab, k in zip(urls, labels, keys)]


def _require_url(cols: dict[str, Any], uri: str) -> None:
    if "url" not in cols:
        found = ", ".join(repr(c) for c in cols) or "none"
        raise SourceError(f"URL list {uri!r} has no 'url' column (found: {found}); rename the URL column to 'url'")


def _build(rows: list[Row], base: str, uri: str) -> SourceListing:
    label_ids, label_names = _url_labels([r[1] for r in rows], uri)
    items = []
    for i, ((url, _, key), label) in enumerate(zip(rows, label_ids)):
        if not url:
            raise SourceError(f"URL list {uri!r} row {i + 1} has an empty url; fill it in or delete the row")
        if key not in (None, ""):
            k = _explicit_key(key, i, uri)
        else:  # derived: row index first, so keys sort in input order and never collide
            stem = posixpath.splitext(posixpath.basename(url.split("?", 1)[0].split("#", 1)[0].rstrip("/")))[0]
            k = safe_key(f"{i:06d}-{stem}") if stem.strip() else f"{i:06d}"
        items.append(ItemRef(key=k, uri=_resolve(url, base), label=label))
    require_unique([it.key for it in items], uri)
    return SourceListing(kind="urls", items=items, label_names=label_names)


def _explicit_key(key: Any, i: int, uri: str) -> str:
    try:
        return safe_key(str(key))
    except SourceError:
        raise SourceError(f"URL list {uri!r} row {i + 1}: key {key!r} has no usable characters; fix it") from None


def _resolve(entry: str, base: str) -> str:
    """Absolute URLs and paths unchanged; relative paths joined onto the list's directory."""
    if has_scheme(entry) or entry.startswith("/"):
        return entry
    if has_scheme(base):  # remote list: keep the protocol, normalise "a/../b"
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, entry))}"
    return posixpath.normpath(posixpath.join(base, entry))


def _url_labels(cells: Iterable[Any], uri: str) -> tuple[list[int | None], list[str] | None]:
    """Integer label ids as given; or, if any label is a name, ids into the sorted names table."""
    values = [None if _blank(c) else c for c in cells]
    ints = [None if v is None else _as_int(v) for v in values]
    if all(n is not None for n, v in zip(ints, values) if v is not None):
        negative = next((n for n in ints if n is not None and n < 0), None)
        if negative is not None:
            raise SourceError(
                f"URL list {uri!r}: label {negative} is negative; use ids >= 0 or class names, empty for unlabelled"
            )
        return ints, None
    names = sorted({str(v).strip() for v in values if v is not None})
    index = {n: i for i, n in enumerate(names)}
    return [None if v is None else index[str(v).strip()] for v in values], names


def _blank(cell: Any) -> bool:
    if cell is None:
        return True
    if isinstance(cell, float):
        return math.isnan(cell)  # pandas writes missing labels of a float column as NaN
    return isinstance(cell, str) and not cell.strip()


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


# ---- cifar.list_cifar
def list_cifar(uri: str, storage_options: dict[str, Any] | None = None) -> SourceListing:
    """One ItemRef per row of each batch (data batches, then test), key '<batch>/<row:05d>'."""
    fs, path = open_fs(uri, storage_options)
    paths = _batch_paths(fs, path, uri)
    items: list[ItemRef] = []
    for p in paths:
        name = posixpath.basename(p)
        batch = _read(fs, p, name)
        data = _data(batch, name)
        batch_uri = full_uri(fs, p)
        labels = _cifar_labels(batch, len(data), name)
        items.extend(
            ItemRef(key=f"{name}/{row:05d}", uri=batch_uri, label=lab, member=row) for row, lab in enumerate(labels)
        )
        del batch, data
    return SourceListing(kind="cifar", items=items, label_names=_label_names(fs, posixpath.dirname(paths[0])))


# ---- plan.plan_shards
def plan_shards(items: Any, shard_size: int) -> list[tuple[str, tuple[ItemRef, ...]]]:
    """Split `items` in input order into shards of `shard_size` (the last may be shorter)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [
        (shard_name(i), tuple(items[start : start + shard_size]))
        for i, start in enumerate(range(0, len(items), shard_size))
    ]
