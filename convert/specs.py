"""The small, frozen, picklable values that cross stage boundaries.

`ItemRef`   worker-side: where one image lives, never its bytes (read from the shard's input slice).
`InputSlice` planner -> shard task: a contiguous run of rows of one input file (constant size).
`ShardSpec` planner -> shard task: the slices of one shard plus source settings; the worker reads its rows.
`ItemResult` worker -> ledger: one row per input item (status + message).
`ShardRecord` Dask task -> client: what was committed (counts, bytes, checksum, ledger).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    """Per-item outcome recorded in the ledger. Failures are values, not exceptions."""

    OK = "ok"
    NOT_FOUND = "not_found"  # 404 / missing file: permanent
    FORBIDDEN = "forbidden"  # 401/403: permanent
    HTTP_ERROR = "http_error"  # other HTTP status after retries
    TIMEOUT = "timeout"  # connect/read timeout after retries
    CONNECTION_ERROR = "connection_error"  # reset/refused after retries
    TOO_LARGE = "too_large"  # response bytes over the cap
    DECODE_ERROR = "decode_error"  # not an image / corrupt / truncated / empty
    DECOMPRESSION_BOMB = "decompression_bomb"  # decoded pixels over the cap
    BAD_URL = "bad_url"  # scheme not allowed / malformed
    OPTED_OUT = "opted_out"  # the publisher opted out (X-Robots-Tag directive, robots.txt): permanent
    HASH_MISMATCH = "hash_mismatch"  # fetched bytes differ from the list's digest column: permanent
    FILTERED = "filtered"  # refused by an image.* filter (min_size, max_aspect_ratio, max_area): permanent
    ERROR = "error"  # anything else (message says what)
    SHARD_FAILED = "shard_failed"  # the item's whole shard failed after its retries


class ItemError(Exception):
    """A per-item failure with its ledger status; the worker turns it into an ItemResult."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class ItemRef:
    """A lightweight pointer to one input image.

    `uri` is a local path, a fsspec URL or an http(s) URL. `member` indexes a record inside a
    container file (a CIFAR batch); it is None for one-image-per-object sources.
    """

    key: str
    uri: str
    label: int | None = None
    member: int | None = None
    # Values of the shard task's kept columns (ShardTask.columns), in that order: str, int, float,
    # bool or None. Empty for sources without columns.
    columns: tuple[Any, ...] = ()
    slice: int = 0  # index of the input slice it was read from (its fetch policy: ShardTask.policies)


COLUMN_TYPES = ("string", "int64", "float64", "bool")


@dataclass(frozen=True, slots=True)
class Column:
    """One kept column of a list source: its name and type (one of COLUMN_TYPES); values may be null."""

    name: str
    type: str


@dataclass(frozen=True, slots=True)
class InputSlice:
    """A contiguous run of rows of one input file: what a shard task reads for itself.

    `kind` says how to read `uri`: "txt" / "csv" / "tsv" / "jsonl" / "folder" (a listing file the
    planner wrote) are byte ranges [start, stop) that begin at a row (of the decompressed bytes for a
    compressed list, whose kind carries the codec: "csv.gz", "jsonl.zst"); "parquet" / "cifar" are
    row ranges within the file.
    `first_row` is the global index of the slice's first item (derived keys), `count` its items.
    `version` identifies the file as planned (size and etag/mtime, or a content hash) and is part of
    the shard's fingerprint; `size` lets the worker refuse a file that changed since planning.
    """

    kind: str
    uri: str
    version: str
    size: int
    start: int
    stop: int
    first_row: int
    count: int


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Source-wide settings every shard of a plan shares (small: names, not tables).

    `root`: folder sources' root (URIs and keys are relative to it); "" for lists (entries resolve
    against each list's own directory). `labels`: where the sorted label-name table lives ("" when
    labels are integers or absent) and `labels_sha` its digest, so a changed table changes the plan.
    `keys`: "derived" (from the global row index, unique by construction) or "explicit" (a key
    column, checked across the whole source by the planner's key-hash pass).
    """

    kind: str  # "folder" | "urls" | "cifar"
    root: str = ""
    labels: str = ""
    labels_sha: str = ""
    keys: str = "derived"
    # A list's kept columns as the worker reads them (ItemRef.columns, in this order): the list's own
    # column names (the caption under its name in the list) and their types (COLUMN_TYPES); text
    # values over `text_limit` bytes are cut by the reader to text_limit + 1 characters (0: no cut).
    columns: tuple[str, ...] = ()
    column_types: tuple[str, ...] = ()
    text_limit: int = 0

    def __post_init__(self) -> None:  # plan.gz stores them as JSON lists
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "column_types", tuple(self.column_types))


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One shard task's work: its input slices (usually one) and a deterministic name; no items."""

    index: int
    name: str
    slices: tuple[InputSlice, ...]
    source: SourceRef

    def __len__(self) -> int:
        return sum(s.count for s in self.slices)


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One ledger row: the input item and what became of it."""

    key: str
    uri: str
    label: int | None
    status: Status
    error: str = ""
    # What the source image was (read from its header while decoding; -1 / "" when unknown, e.g. a
    # fetch failure). Recorded in the ledger for the report's source statistics.
    width: int = -1
    height: int = -1
    src_format: str = ""  # "jpeg", "png", ... (Pillow's format name, lower case)
    src_bytes: int = -1
    digest: str = ""  # hex digest of the source bytes (fetch.compute_hash), "" when not computed

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """What a committed shard holds; written beside the shard as its done-marker."""

    name: str
    path: str  # relative to the dataset root, e.g. "shards/shard-00000.h5"
    format: str
    count: int  # items in the spec
    ok: int  # images stored (ledger rows with status ok)
    failed: int
    bytes: int
    sha256: str
    image_shape: tuple[int, ...] | None  # (H, W, C) when fixed-size raw pixels, else None
    encoding: str  # "raw" or an image format name ("jpeg", "png", "webp", "original")
    ledger: tuple[ItemResult, ...] = field(default=(), repr=False)
    # Worker-side accounting: per-stage seconds summed over the shard's items ("fetch", "decode",
    # "resize", "encode", "write", "commit", ...), and wall-clock start/end (unix seconds).
    stages: dict[str, float] = field(default_factory=dict, repr=False)
    started: float = 0.0
    finished: float = 0.0
    # Counts beside the ledger: text values truncated at source.max_text_bytes, or holding U+FFFD
    # (invalid UTF-8 in the list, replaced), by name; the stored columns' names and types.
    counters: dict[str, int] = field(default_factory=dict, repr=False)
    columns: tuple[Column, ...] = ()
    # The published file's identity as its record holds it (size, ETag / inode, times): what resume
    # compares; the worker returns it so the client files it without reading the record back.
    identity: dict[str, Any] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary without the ledger (for manifest.json)."""
        return {
            "name": self.name,
            "path": self.path,
            "format": self.format,
            "count": self.count,
            "ok": self.ok,
            "failed": self.failed,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "encoding": self.encoding,
            "stages": dict(self.stages),
            "started": self.started,
            "finished": self.finished,
            "counters": dict(self.counters),
            "columns": [[c.name, c.type] for c in self.columns],
        }


def shard_name(index: int) -> str:
    """Deterministic shard name: shard-00000, shard-00001, ..."""
    return f"shard-{index:05d}"
