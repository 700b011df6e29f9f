"""The small, frozen, picklable values that cross stage boundaries.

`ItemRef`   source -> planner -> worker: where one image lives, never its bytes.
`ShardSpec` planner -> Dask task: the ordered item references of one shard.
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


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One Dask task's work: an ordered tuple of item references and a deterministic name."""

    index: int
    name: str
    items: tuple[ItemRef, ...]

    def __len__(self) -> int:
        return len(self.items)


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
        }


def shard_name(index: int) -> str:
    """Deterministic shard name: shard-00000, shard-00001, ..."""
    return f"shard-{index:05d}"
