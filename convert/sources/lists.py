"""URL-list files as partitions: byte offsets of text lists, row groups of parquet lists.

Formats (by suffix): `.txt` (one URL a line), `.csv`, `.tsv`, `.jsonl` / `.json` (one object a line),
`.parquet`; each optionally compressed: `.gz`, `.zst`, `.bz2` (`urls.csv.gz`). The planner never
holds a list's rows: a text list is scanned once in 8 MiB blocks with numpy, recording the byte
offset of every `step`-th row; a parquet list's row counts come from its footer. A shard task
later reads exactly its slice (convert.sources.rows) through the resilient reader.

Compressed lists are read as streams (never decompressed to disk). A compressed text list is cut
like a plain one, at offsets into its decompressed bytes; a shard task decompresses the file from
its start and drops the bytes before its slice (gzip, bzip2 and zstd streams cannot be entered in
the middle), or, for a .zst file in the seekable format, from the frame holding its first byte
(convert.sources.seekable). A compressed parquet list is inflated into memory (up to MAX_INFLATED bytes) by the
planner and by each of its shard tasks: parquet compresses its own pages, prefer that.

Row rules (the planner and the worker use the same code, so their counts always agree):
- rows end at "\\n" ("\\r\\n" works: ASCII whitespace is stripped); a UTF-8 BOM at the start is skipped;
- .txt / .jsonl: a row is an item unless it is blank or starts with "#" (after ASCII whitespace);
- .csv: the first row is the header; a newline inside a double-quoted field belongs to the row
  (quote parity, RFC 4180 - a stray quote inside an unquoted field is not supported); a row holding
  only whitespace, commas and quote characters is blank and skipped;
- .tsv: the first row is the header; fields are split at tabs with no quoting (IANA
  text/tab-separated-values: a value holds no tab or newline); a blank row is skipped.
Invalid UTF-8 is not refused: the reader replaces it (U+FFFD) and the worker counts such values.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import hashlib
import io
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..specs import InputSlice
from ..store import is_local
from .base import SourceError, full_uri, has_magic, open_fs

FORMATS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
CODECS = {".gz": "gz", ".zst": "zst", ".bz2": "bz2"}
LIST_SUFFIXES = tuple(f + c for f in FORMATS for c in ("", *CODECS))
ROW_MODES = {"txt": "lines", "jsonl": "lines", "folder": "lines", "csv": "csv", "tsv": "tsv"}
BLOCK = 8 << 20
MAX_INFLATED = 1 << 30  # a compressed parquet list is inflated into memory up to this size
SAMPLE_BYTES = 8 << 20  # JSON Lines schema sample: rows within the first 8 MiB (at least one row)
WS = b" \t\r\n\x0b\x0c"
_BOM = codecs.BOM_UTF8


def list_kind(name: str) -> str | None:
    """'csv', 'jsonl.gz', 'parquet.zst', ... for a list file's name; None when it is no list."""
    low = name.lower()
    codec = next((c for suffix, c in CODECS.items() if low.endswith(suffix)), "")
    if codec:
        low = low[: low.rfind(".")]
    fmt = FORMATS.get(posixpath.splitext(low)[1])
    return None if fmt is None else f"{fmt}.{codec}" if codec else fmt


def split_kind(kind: str) -> tuple[str, str]:
    """('csv', 'gz') for 'csv.gz', ('txt', '') for 'txt'."""
    fmt, _, codec = kind.partition(".")
    return fmt, codec


def _table(chars: bytes) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(chars)] = True
    return table


_SPECIAL = {"lines": _table(WS + b"#"), "csv": _table(WS + b',"'), "tsv": _table(WS)}  # first bytes to look at


@dataclass(frozen=True)
class ListFile:
    """One list file as planned: where it is and what it was (size, version)."""

    uri: str  # full URI the fetch layer can open
    kind: str  # list_kind: format and compression
    size: int
    version: str
    base: str  # the list's directory: relative entries resolve against it


def find_lists(uri: str, storage_options: dict[str, Any] | None) -> list[ListFile]:
    """The list files a source names: one file, a glob, or a folder of list files; sorted by path."""
    fs, path = open_fs(uri, storage_options)
    try:
        info = None if has_magic(path) else fs.info(path)
    except FileNotFoundError:
        raise SourceError(
            f"URL list {uri!r} not found; check the path (and storage_options for object stores)"
        ) from None
    if info is None:
        infos = fs.glob(path, detail=True)
    elif info.get("type") == "directory":
        infos = {i["name"]: i for i in fs.ls(path, detail=True)}
    else:
        infos = {path: info}
    files = []
    for p in sorted(infos):
        info = infos[p]
        kind = list_kind(posixpath.basename(p))
        if info.get("type") != "file" or kind is None:
            continue
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        files.append(
            ListFile(
                full_uri(fs, p),
                kind,
                int(info.get("size") or 0),
                f"{info.get('size')}-{version}",
                full_uri(fs, posixpath.dirname(p)),
            )
        )
    if not files:
        raise SourceError(
            f"no URL lists (.txt, .csv, .tsv, .jsonl, .json, .parquet; optionally .gz/.zst/.bz2) "
            f"in {uri!r}; check the path or pattern"
        )
    return files


def open_list(uri: str, storage_options: dict[str, Any] | None) -> Any:
    """A seekable binary file: plain open for local lists, the resilient reader for remote ones."""
    if is_local(uri):
        return open(uri.removeprefix("file://"), "rb")
    from ..fetch.resilient import open_resilient

    return open_resilient(uri, storage_options)


def inflating(raw: Any, codec: str, uri: str) -> Any:
    """A readable stream of the decompressed bytes of `raw` (multi-member/-frame files included)."""
    if codec == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if codec == "bz2":
        return bz2.BZ2File(raw, "rb")
    try:
        import zstandard  # lazy: only .zst lists need it
    except ImportError:
        raise SourceError(f"reading {uri!r} needs zstandard; install it with: pip install zstandard") from None
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)


def _codec_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:
        return (OSError, EOFError)
    return (OSError, EOFError, zstandard.ZstdError)


@contextlib.contextmanager
def open_stream(uri: str, kind: str, storage_options: dict[str, Any] | None, size: int | None = None) -> Iterator[Any]:
    """The list's bytes as a stream, decompressed when its kind says so; a read or decompression
    failure is one SourceError line. `size`: refuse a file whose size changed since planning."""
    codec = split_kind(kind)[1]
    with open_raw(uri, kind, storage_options, size) as raw:
        yield inflating(raw, codec, uri) if codec else raw


@contextlib.contextmanager
def open_raw(uri: str, kind: str, storage_options: dict[str, Any] | None, size: int | None = None) -> Iterator[Any]:
    """The list file's own bytes (seekable); failures inside the block, decompression included,
    are one SourceError line. `size`: refuse a file whose size changed since planning."""
    codec = split_kind(kind)[1]
    try:
        with open_list(uri, storage_options) as raw:
            if size is not None:
                check_size(raw, uri, size)
            yield raw
    except _codec_errors() as exc:
        what = f"a valid .{codec} file" if codec else "readable"
        raise SourceError(
            f"cannot read URL list {uri!r} ({type(exc).__name__}: {exc}); check that it is {what} "
            "and its permissions / storage_options"
        ) from None


def inflate_all(f: Any, uri: str) -> io.BytesIO:
    """A compressed (parquet) list wholly in memory, refused over MAX_INFLATED bytes (read in
    blocks: a decompressor may allocate the whole of what one read asks for)."""
    out = io.BytesIO()
    while block := f.read(BLOCK):
        out.write(block)
        if out.tell() > MAX_INFLATED:
            raise SourceError(
                f"{uri!r} inflates to over {MAX_INFLATED >> 20} MiB; store it uncompressed (parquet "
                "compresses its own pages: write it with compression='zstd')"
            )
    out.seek(0)
    return out


def check_size(f: Any, uri: str, planned: int) -> None:
    """Refuse a list that changed size since planning (its slices would name other rows)."""
    size = getattr(f, "size", None)
    if size is None:
        size = os.fstat(f.fileno()).st_size
    if size != planned:
        raise SourceError(
            f"{uri} changed since planning ({size} bytes, planned {planned}); rerun the same command to plan again"
        )


def row_ends(buf: bytes, mode: str) -> np.ndarray:
    """Positions of the newlines that end rows (CSV: outside double quotes; `buf` starts a row)."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    nl = np.flatnonzero(arr == 10)
    if mode == "csv" and b'"' in buf:
        nl = nl[np.searchsorted(np.flatnonzero(arr == 34), nl) % 2 == 0]
    return nl


def item_spans(buf: bytes, mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(starts, ends) of the item rows completed in `buf`, and the bytes consumed.

    `buf` starts at a row boundary; bytes after the last row end are not consumed (the caller
    carries them into the next block). `mode` is a ROW_MODES value.
    """
    nl = row_ends(buf, mode)
    if not len(nl):
        return nl, nl, 0
    arr = np.frombuffer(buf, dtype=np.uint8)
    starts = np.concatenate(([0], nl[:-1] + 1))
    first = np.where(starts < nl, arr[np.minimum(starts, len(arr) - 1)], 10)
    keep = ~_SPECIAL[mode][first]
    for i in np.flatnonzero(~keep):  # blank, comment or indented rows: the rare, slow path
        line = buf[starts[i] : nl[i]]
        stripped = line.strip(WS + b',"') if mode == "csv" else line.strip(WS)
        keep[i] = bool(stripped) and (mode != "lines" or not stripped.startswith(b"#"))
    return starts[keep], nl[keep], int(nl[-1]) + 1


@dataclass(frozen=True)
class TextScan:
    offsets: list[int]  # byte offset of items 0, step, 2*step, ...
    count: int
    header: bytes  # CSV/TSV header row (b"" otherwise)
    length: int  # bytes in the (decompressed) stream
    sample: list[bytes] = field(default_factory=list)  # the first rows (up to `sample_rows`), for a schema
    digests: list[str] = field(default_factory=list)  # per slice: slice_digest of its bytes (`append` checks)


def slice_digest() -> Any:
    """The hash of one slice's bytes (the first slice from byte 0: BOM, header and all; the last
    to the end of the stream): how `run --append` proves an old slice is unchanged in a grown list."""
    return hashlib.sha256()


class _SliceHasher:
    """Hashes the scanned stream in runs cut at each slice's first byte (scan_text's offsets)."""

    def __init__(self) -> None:
        self.digests: list[str] = []
        self._h = slice_digest()
        self._cuts = 0

    def feed(self, data: bytes | memoryview, cuts: Any = ()) -> None:
        """`data`, cut before each position in `cuts` (offsets into `data`, ascending)."""
        last = 0
        for at in cuts:
            if self._cuts:  # the first slice also holds the bytes before its first row
                self._h.update(data[last:at])
                self.digests.append(self._h.hexdigest())
                self._h, last = slice_digest(), at
            self._cuts += 1
        self._h.update(data[last:])

    def finish(self) -> list[str]:
        if self._cuts:
            self.digests.append(self._h.hexdigest())
        return self.digests


def scan_text(f: Any, step: int, mode: str, sample_rows: int = 0) -> TextScan:
    """One streaming pass over a text list: item count, the offset of every step-th item, the
    first `sample_rows` rows (within SAMPLE_BYTES, at least one) and each slice's digest."""
    offsets: list[int] = []
    sample: list[bytes] = []
    hasher = _SliceHasher()
    count, pos, carry, header, sampled = 0, 0, b"", None if mode in ("csv", "tsv") else b"", 0
    while True:
        block = f.read(max(BLOCK, len(carry)))  # a row longer than a block: read geometrically more
        if pos == 0 and not carry and block.startswith(_BOM):
            block, pos = block[len(_BOM) :], len(_BOM)
            hasher.feed(_BOM)
        buf = carry + block
        if not block and buf and not buf.endswith(b"\n"):
            buf += b"\n"  # the last row needs no newline
        if header is None:  # CSV/TSV: the first row is the header
            ends = row_ends(buf, mode)
            if not len(ends) and block:
                carry = buf
                continue
            end = int(ends[0]) if len(ends) else len(buf)
            hasher.feed(buf[: end + 1])
            header, buf, pos = buf[:end], buf[end + 1 :], pos + end + 1
        starts, stops, used = item_spans(buf, mode)
        index = count + np.arange(len(starts))
        cuts = starts[index % step == 0]
        offsets.extend((cuts + pos).tolist())
        hasher.feed(memoryview(buf)[:used], cuts.tolist())
        for a, b in zip(starts[: max(0, sample_rows - len(sample))].tolist(), stops.tolist()):
            if sample and sampled + b - a > SAMPLE_BYTES:
                sample_rows = len(sample)
                break
            sample.append(buf[a:b])
            sampled += b - a
        count += len(starts)
        pos += used
        carry = buf[used:]
        if not block:
            break
    hasher.feed(carry)
    return TextScan(offsets, count, header, pos + len(carry), sample, hasher.finish())


def check_slices(f: Any, slices: list[InputSlice], digests: list[str]) -> int | None:
    """Index of the first of a file's planned `slices` (in order, from its first) whose bytes in
    the stream `f` no longer have their planned digest (None: all unchanged). One sequential read
    of the planned bytes: how `run --append` proves a grown list only grew at its end."""
    at = 0
    for j, (sl, digest) in enumerate(zip(slices, digests)):
        h, need = slice_digest(), sl.stop - at
        while need > 0:
            chunk = f.read(min(BLOCK, need))
            if not chunk:
                break
            h.update(chunk)
            need -= len(chunk)
        if need > 0 and not (j == len(slices) - 1 and need == 1):
            return j
        if need == 1:  # the old stream had no final newline: the scanner added one
            h.update(b"\n")
        if h.hexdigest() != digest:
            return j
        at = sl.stop
    return None


def text_slices(lf: ListFile, scan: TextScan, step: int, first_row: int) -> list[InputSlice]:
    """One slice per `step` items of a scanned text list (the last may be shorter); offsets are
    into the decompressed bytes of a compressed list, `size` is the file's own."""
    ends = scan.offsets[1:] + [scan.length]
    return [
        InputSlice(lf.kind, lf.uri, lf.version, lf.size, a, b, first_row + j * step, min(step, scan.count - j * step))
        for j, (a, b) in enumerate(zip(scan.offsets, ends))
    ]


def parquet_file(f: Any, uri: str) -> Any:
    try:
        import pyarrow.parquet as pq  # lazy: only parquet lists need pyarrow
    except ImportError:
        raise SourceError(
            f"reading {uri!r} needs pyarrow; install it with: pip install 'convert[parquet]' (or pip install pyarrow)"
        ) from None
    try:
        return pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for non-parquet bytes
        raise SourceError(f"{uri!r} is not a readable parquet file ({exc}); check the file") from None


__all__ = ["LIST_SUFFIXES", "ListFile", "find_lists", "list_kind", "open_stream", "scan_text", "text_slices"]
