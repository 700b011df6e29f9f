"""CIFAR-10/100 "python version" batch files: planning (rows per batch), a shard's ItemRefs, row reading.

The batch files are Python 2 pickles of a dict {b"data": (N, 3072) uint8, b"labels" | b"fine_labels": [...],
b"filenames": [...], b"batch_label": ...}. They are read ONLY through `_RestrictedUnpickler`, whose
`find_class` admits the handful of globals those files use and refuses everything else.
"""

from __future__ import annotations

import codecs
import io
import pickle
import posixpath
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..specs import ItemError, ItemRef, Status
from .base import SourceError, full_uri, has_magic, open_fs

_BATCH = re.compile(r"^(data_batch_(\d+)|test_batch|train|test)$")
_FOLDER = re.compile(r"^cifar-[\w.-]*(batches-py|python)$", re.IGNORECASE)
_ROW = 3 * 32 * 32
_CACHE_SIZE = 2  # a CIFAR-10 batch is ~30 MB decoded, CIFAR-100 train ~150 MB
_cache: OrderedDict[str, tuple[np.ndarray, list[int | None]]] = OrderedDict()
_cache_lock = threading.Lock()


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Exactly what CIFAR pickles reference, under Python 2, NumPy 1 and NumPy 2 module names."""
    try:
        from numpy._core import multiarray  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    # Python 3 writes bytes at protocol 2 as _codecs.encode(str, "latin1"): a pure str -> bytes transform.
    allowed[("_codecs", "encode")] = codecs.encode
    for mod in ("builtins", "__builtin__"):
        for t in (list, dict, tuple, set, frozenset, bytearray):
            allowed[(mod, t.__name__)] = t
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in _ALLOWED; any other (os.system, eval, ...) is a SourceError."""

    def __init__(self, file: io.BytesIO, name: str) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as the original files need
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise SourceError(
                f"refusing to load {module}.{name} from {self._name}: "
                "CIFAR batch files contain only numpy arrays and lists"
            ) from None


def _unpickle(raw: bytes, name: str) -> dict[str, Any]:
    """Decode one batch/meta file to a dict with str keys."""
    # Why unpickling is allowed here: the CIFAR file format IS a pickle, and this unpickler is
    # restricted to numpy array reconstruction and builtin containers, so it cannot run code.
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), name).load()  # restricted unpickler (see find_class)
    except SourceError:
        raise
    except Exception as exc:  # a truncated/corrupt pickle raises many types (EOFError, UnpicklingError, ...)
        raise SourceError(f"{name} is not a readable CIFAR batch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{name} is not a CIFAR batch file (top level is {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read(fs: Any, path: str, name: str) -> dict[str, Any]:
    with fs.open(path, "rb") as f:
        raw = f.read()
    return _unpickle(raw, name)


def _data(batch: dict[str, Any], name: str) -> np.ndarray:
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        shape = getattr(data, "shape", None)
        raise SourceError(f"{name}: 'data' must be an (N, 3072) uint8 array (got {shape}); is this a CIFAR batch?")
    return data


def _labels(batch: dict[str, Any], rows: int, name: str) -> list[int | None]:
    labels = batch.get("labels", batch.get("fine_labels"))
    if labels is None:
        return [None] * rows
    labels = [int(v) for v in labels]
    if len(labels) != rows:
        raise SourceError(f"{name}: {len(labels)} labels for {rows} images; the batch file is inconsistent")
    return labels


def is_cifar_uri(uri: str) -> bool:
    """A batch file name (data_batch_N, test_batch), a cifar-* folder, or anything inside one."""
    parts = uri.split("?", 1)[0].rstrip("/").split("/")
    name, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    return bool(_FOLDER.match(name) or _FOLDER.match(parent) or re.match(r"^(data_batch_\d+|test_batch)$", name))


def _order(path: str) -> tuple[int, int]:
    m = _BATCH.match(posixpath.basename(path))
    assert m is not None
    if m.group(2) is not None:
        return (0, int(m.group(2)))
    return ({"test_batch": 1, "train": 2, "test": 3}[m.group(1)], 0)


def _batch_paths(fs: Any, path: str, uri: str) -> list[str]:
    if has_magic(path):
        found = fs.glob(path)
    elif not fs.exists(path):
        raise SourceError(f"CIFAR source {uri!r} does not exist; check the path")
    elif fs.isdir(path):
        found = fs.ls(path, detail=False)
    else:
        return [path]
    batches = sorted((p for p in found if _BATCH.match(posixpath.basename(p.rstrip("/")))), key=_order)
    if not batches:
        raise SourceError(f"no CIFAR batch files (data_batch_N, test_batch, train, test) in {uri!r}; check the path")
    return batches


def _label_names(fs: Any, folder: str) -> list[str] | None:
    """label_names from batches.meta (CIFAR-10) or fine_label_names from meta (CIFAR-100) beside the batches."""
    for meta, field in (("batches.meta", "label_names"), ("meta", "fine_label_names")):
        path = posixpath.join(folder, meta)
        if fs.isfile(path):
            names = _read(fs, path, meta).get(field)
            if names is not None:
                return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    return None


def plan_cifar(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[list[tuple[str, int, str, int]], list[str] | None]:
    """([(batch URI, rows, version, size), ...] in order (data batches, then test), label names)."""
    fs, path = open_fs(uri, storage_options)
    paths = _batch_paths(fs, path, uri)
    batches = []
    for p in paths:
        name = posixpath.basename(p)
        batch = _read(fs, p, name)
        rows = len(_data(batch, name))
        _labels(batch, rows, name)  # a batch with inconsistent labels fails here, at planning
        info = fs.info(p)
        size = int(info.get("size") or 0)
        batches.append((full_uri(fs, p), rows, f"{size}-{info.get('mtime') or info.get('ETag') or ''}", size))
        del batch
    return batches, _label_names(fs, posixpath.dirname(paths[0]))


def cifar_refs(uri: str, start: int, stop: int, storage_options: dict[str, Any] | None) -> list[ItemRef]:
    """ItemRefs of rows [start, stop) of one batch, key '<batch>/<row:05d>' (worker side)."""
    data, labels = _cached_batch(uri, storage_options)
    name = posixpath.basename(uri)
    return [ItemRef(key=f"{name}/{row:05d}", uri=uri, label=labels[row], member=row) for row in range(start, stop)]


def _cached_batch(uri: str, storage_options: dict[str, Any] | None) -> tuple[np.ndarray, list[int | None]]:
    # The lock is held while loading so concurrent readers of one batch decode it once.
    with _cache_lock:
        found = _cache.get(uri)
        if found is None:
            fs, path = open_fs(uri, storage_options)
            name = posixpath.basename(path)
            batch = _read(fs, path, name)
            data = _data(batch, name)
            found = _cache[uri] = (data, _labels(batch, len(data), name))
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        _cache.move_to_end(uri)
        return found


def clear_cache() -> None:
    """Forget decoded batches (e.g. after a batch file was rewritten in place)."""
    with _cache_lock:
        _cache.clear()


def read_member(uri: str, member: int, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Row `member` of a CIFAR batch as a contiguous (32, 32, 3) uint8 RGB array.

    Failures are ItemError (not found / not a batch / row out of range) so the worker records them per item.
    """
    try:
        data = _cached_batch(uri, storage_options)[0]
    except FileNotFoundError:
        raise ItemError(Status.NOT_FOUND, f"CIFAR batch {uri} not found") from None
    except SourceError as exc:
        raise ItemError(Status.DECODE_ERROR, str(exc)) from None
    except OSError as exc:
        raise ItemError(Status.ERROR, f"cannot read CIFAR batch {uri}: {exc}") from None
    if not 0 <= member < len(data):
        raise ItemError(Status.ERROR, f"row {member} out of range for {uri} ({len(data)} rows)")
    return np.ascontiguousarray(data[member].reshape(3, 32, 32).transpose(1, 2, 0))
