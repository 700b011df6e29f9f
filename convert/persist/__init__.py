"""Compressed, single-file persistence for shard metadata that never unpickles.

    dump(obj, target, compress=None)      load(source, mmap_mode=None)

obj may nest dict / list / tuple / set / frozenset / str / bytes / bytearray / int / float /
complex / bool / None, numpy arrays and numpy scalars of bool, numeric, datetime and fixed-width
string dtypes. Types round-trip exactly (tuples stay tuples, int dict keys stay ints); shared
references are stored once per occurrence and cycles are refused. Arrays keep dtype, shape and
C/F order (other strided arrays come back C-ordered).

A file is a JSON header describing the object tree followed by 64-byte-aligned array bodies, the
whole optionally inside one standard compressed stream (zlib, gzip, bz2, lzma, xz, zstd, lz4).
Loading validates every field before using it and raises PersistError for any bad input.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import warnings
from typing import Any, BinaryIO, Iterator

from ._codecs import CODECS, detect, resolve
from ._errors import PersistError
from ._format import encode_header, layout
from ._stream import read_payload, write_payload
from ._tree import Encoder

__all__ = ["PersistError", "dump", "load", "CODECS"]

_MMAP_MODES = ("r", "r+", "c")


def _split_url(target: Any, options: dict | None) -> tuple[str | None, Any, str | None]:
    """(local path, store, path relative to it) for a path/URL; (None, None, None) otherwise.

    URLs go through `convert.store` (one fsspec seam; secrets resolved once per process)."""
    if not isinstance(target, (str, os.PathLike)):
        return None, None, None
    text = os.fspath(target)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "://" not in text and "::" not in text:
        return text, None, None
    from ..store import open_store

    parent, name = posixpath.split(text.rstrip("/"))
    store = open_store(parent, options)
    local = store.local_path(name)
    return (local, None, None) if local is not None else (None, store, name)


def dump(
    obj: Any, target: str | os.PathLike | BinaryIO, compress: Any = None, storage_options: dict | None = None
) -> None:
    """Write obj to a local path, an fsspec URL or a binary file object.

    compress: None picks the codec from the target's extension (.z .gz .bz2 .lzma .xz .zst .lz4,
    else uncompressed); an int is a zlib level (0/False = none, True = zlib 3); a codec name or
    (name, level) tuple selects explicitly. Local writes are atomic (temp file + os.replace);
    object-store writes are committed only when complete. storage_options go to fsspec.
    Raises TypeError for unsupported types and ValueError for cycles or excessive nesting.
    """
    local, store, path = _split_url(target, storage_options)
    name = local or path or getattr(target, "name", None)
    codec, level = resolve(compress, name if isinstance(name, str) else None)
    encoder = Encoder()
    root = encoder.encode(obj)
    specs = layout(encoder.arrays)
    header = encode_header(root, specs)

    def write(fh: BinaryIO) -> None:
        compressor = codec.compressor(level) if codec.compressor else None
        write_payload(fh, compressor, header, encoder.arrays, specs)

    if local is not None:
        from ..store import atomic_write

        with atomic_write(local) as fh:
            write(fh)
    elif store is not None:
        with store.writer(path) as fh:  # published only when complete; an exception aborts the upload
            write(fh)
    elif hasattr(target, "write"):
        write(target)
    else:
        raise TypeError(f"dump target must be a path, URL or binary file object, not {target!r}")


@contextlib.contextmanager
def _open_source(source: Any, options: dict | None) -> Iterator[tuple[BinaryIO, str | None]]:
    local, store, path = _split_url(source, options)
    if local is not None:
        with open(local, "rb") as fh:
            yield fh, local
    elif store is not None:
        with store.open(path, "rb") as fh:
            yield fh, None
    elif hasattr(source, "read"):
        yield source, None
    else:
        raise TypeError(f"load source must be a path, URL or binary file object, not {source!r}")


def _remaining(fh: Any) -> int | None:
    """Bytes from the current position to the end, or None if the file cannot seek."""
    try:
        if not fh.seekable():
            return None
        pos = fh.tell()
        end = fh.seek(0, os.SEEK_END)
        fh.seek(pos)
        return end - pos
    except (AttributeError, OSError, ValueError):
        return None


class _Prefixed:
    """An unseekable stream with the bytes already consumed for magic detection put back."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(n)
        take = len(self._head) if n < 0 else min(n, len(self._head))
        out, self._head = self._head[:take], self._head[take:]
        return out


def _peek(fh: Any, remaining: int | None, n: int = 8) -> tuple[bytes, Any]:
    head = b""
    while len(head) < n:
        more = fh.read(n - len(head))
        if not more:
            break
        head += more
    if remaining is not None:
        fh.seek(-len(head), os.SEEK_CUR)
        return head, fh
    return head, _Prefixed(head, fh)


def load(
    source: str | os.PathLike | BinaryIO, mmap_mode: str | None = None, storage_options: dict | None = None
) -> Any:
    """Read an object written by dump() from a path, fsspec URL or binary file object.

    The codec is detected from the file's magic number. mmap_mode ("r", "r+", "c") maps the
    arrays of an uncompressed local file as np.memmap instead of reading them. Any corrupt,
    truncated, unknown-version or disallowed content raises PersistError; nothing in the file is
    ever executed, and nothing larger than the file's actual content is allocated.
    storage_options go to fsspec for URLs.
    """
    if mmap_mode not in (None, *_MMAP_MODES):
        raise ValueError(f"mmap_mode must be None or one of {_MMAP_MODES}, not {mmap_mode!r}")
    with _open_source(source, storage_options) as (fh, local):
        if mmap_mode is not None and local is None:
            raise PersistError(
                "mmap_mode needs a local file path; load remote or file-object sources without mmap_mode"
            )
        try:
            remaining = _remaining(fh)
            head, fh = _peek(fh, remaining)
            codec = detect(head)
            mmap = (local, mmap_mode) if mmap_mode else None
            if codec.reader is not None:
                if mmap:
                    warnings.warn(
                        f"{local} is {codec.name}-compressed and cannot be memory-mapped; loading it into memory",
                        stacklevel=2,
                    )
                return read_payload(codec.reader(fh), None, compressed_size=remaining or 0)
            return read_payload(fh, remaining, mmap)
        except (PersistError, ImportError, MemoryError, OSError):
            raise  # OSError here is the storage failing (worth a retry), not a bad file
        except Exception as exc:  # bad values in a crafted header: TypeError, ValueError, ...
            raise PersistError(f"cannot load: {type(exc).__name__}: {exc}") from exc
