"""Export a converted dataset as WebDataset tar shards, streamed, resumable, to any store.

    export_webdataset("out/", "s3://bucket/wds", maxcount=10000)

One output tar per source shard by default (`maxcount`: N items per tar; `shard_size`: about N
bytes per tar, from the dataset's mean stored bytes per item). Tar j always holds the same dataset
range, so an interrupted export resumes by skipping the tars already proven complete. Each sample:

    <key>.jpg | .png | .webp | ...   the stored encoded bytes, as stored (the extension sniffed from them)
    <key>.npy                        raw pixels (HxWxC uint8), or <key>.png / .jpg with image_format=
    <key>.cls                        the label as text (absent for unlabelled items)
    <key>.txt                        the `caption` column, when the dataset has one
    <key>.json                       every other column of the item (JSON)

`__key__` is the dataset key with '%', '.' and a leading '/' percent-escaped (WebDataset cuts a member name at its
first dot; `urllib.parse.unquote` gives the key back). Output layout:

    shard-000000.tar ...         written through Store.writer: visible only when complete
    _export/shard-000000.json    done-marker, written after its tar: range, count, bytes, sha256, fingerprint
    index.wids.json              a wids shard index (url, nsamples) with the settings, written last

A tar counts as done when its marker has this export's fingerprint (source index sha256 + settings)
and the listed tar has the marker's size. Memory: one chunk of at most CHUNK items plus the one
being read ahead.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import numpy as np

from .config import ConfigError
from .dataset import Dataset, read_ahead
from .redact import redact_url
from .store import Store, open_store

CHUNK = 512  # items per get_batch while exporting
MARKER_THREADS = 16  # concurrent done-marker reads when resuming
MARKERS = "_export"
INDEX = "index.wids.json"
IMAGE_FORMATS = ("auto", "npy", "png", "jpg")
_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


class ExportError(ConfigError):
    """The export cannot proceed as asked (one line naming the fix)."""


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """What decides the tars' content: part of the fingerprint every done-marker carries."""

    image_format: str = "auto"  # auto: encoded bytes as stored, raw pixels as .npy
    maxcount: int | None = None
    shard_size: int | None = None
    prefix: str = "shard"

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ExportError(f"image_format {self.image_format!r}: use one of {', '.join(IMAGE_FORMATS)}")
        if self.maxcount is not None and self.shard_size is not None:
            raise ExportError("give either maxcount (items per tar) or shard_size (bytes per tar), not both")
        for name in ("maxcount", "shard_size"):
            if (getattr(self, name) or 1) < 1:
                raise ExportError(f"{name} must be a positive number")


@dataclass(frozen=True)
class ExportSummary:
    tars: int
    written: int
    skipped: int
    items: int
    bytes: int  # of the tars written by this call
    seconds: float


def export_webdataset(
    uri: str,
    output: str,
    *,
    maxcount: int | None = None,
    shard_size: int | None = None,
    image_format: str = "auto",
    storage_options: dict[str, Any] | None = None,
    output_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> ExportSummary:
    """Write `uri`'s items as WebDataset tars under `output` (local path or fsspec URL), resuming
    a previous export of the same dataset and settings; `overwrite` rewrites every tar."""
    settings = ExportSettings(image_format, maxcount, shard_size)
    started = time.perf_counter()
    ds = Dataset(uri, storage_options=storage_options, decode=False)
    out = open_store(output, output_options, role="export")
    ranges = plan_ranges(ds, settings)
    fp = fingerprint(ds, settings)
    done = {} if overwrite else _completed(out, settings, fp)
    if len(done) < len(ranges):
        out.delete(INDEX)  # an old export's index must not describe tars being rewritten
    _remove_debris(
        out, settings.prefix, {tar_name(settings.prefix, j) for j in range(len(ranges))} if overwrite else None
    )
    written = nbytes = 0
    entries = []
    for j, (start, stop) in enumerate(ranges):
        name = tar_name(settings.prefix, j)
        marker = done.get(name)
        if marker is None or (marker["start"], marker["stop"]) != (start, stop):
            marker = write_tar(ds, out, name, start, stop, settings, fp)
            written, nbytes = written + 1, nbytes + marker["bytes"]
            if log:
                log(f"{name}: {marker['count']} items, {marker['bytes']} bytes")
        entries.append(
            {"url": name, "nsamples": marker["count"], "filesize": marker["bytes"], "sha256": marker["sha256"]}
        )
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": redact_url(uri),
        "shardlist": entries,
        "convert": {"fingerprint": fp, "settings": asdict(settings), "items": len(ds)},
    }
    out.write_bytes(INDEX, json.dumps(index, indent=1).encode())
    return ExportSummary(len(ranges), written, len(ranges) - written, len(ds), nbytes, time.perf_counter() - started)


def tar_name(prefix: str, j: int) -> str:
    return f"{prefix}-{j:06d}.tar"


def plan_ranges(ds: Dataset, settings: ExportSettings) -> list[tuple[int, int]]:
    """[start, stop) dataset ranges, one per output tar (a pure function of the manifest and settings)."""
    n = len(ds)
    per = settings.maxcount
    if settings.shard_size is not None:
        stored = sum(int(s["bytes"]) for s in ds.shards)
        per = max(1, int(settings.shard_size // max(1.0, stored / max(n, 1))))
    if per is not None:
        return [(a, min(a + per, n)) for a in range(0, n, per)]
    starts = [ds.shard_start(s) for s in range(len(ds.shards))] + [n]
    return [(a, b) for a, b in itertools.pairwise(starts) if b > a]


def fingerprint(ds: Dataset, settings: ExportSettings) -> str:
    """sha256 over the source's identity (its index digest and item count) and the settings."""
    source = {"index": (ds.manifest.get("index") or {}).get("sha256", ""), "items": len(ds)}
    return hashlib.sha256(json.dumps([source, asdict(settings)], sort_keys=True).encode()).hexdigest()


def _completed(out: Store, settings: ExportSettings, fp: str) -> dict[str, dict[str, Any]]:
    """Done-markers whose tar is present with the recorded size, by tar name (one listing each)."""
    sizes = {e.name: e.size for e in out.list("")}
    found: dict[str, dict[str, Any]] = {}
    rels = [e.rel for e in out.list(MARKERS) if e.name.startswith(settings.prefix + "-") and e.name.endswith(".json")]
    with ThreadPoolExecutor(MARKER_THREADS) as pool:  # one small GET each: concurrent on object stores
        blobs = list(pool.map(out.read_bytes, rels))
    for rel, blob in zip(rels, blobs):
        try:
            marker = json.loads(blob)
            tar, theirs = str(marker["tar"]), str(marker["fingerprint"])
        except (ValueError, KeyError, TypeError):
            continue  # unreadable marker: its tar is rewritten
        if theirs != fp:
            raise ExportError(
                f"{out.url(rel)}: this output holds an export of another dataset or with other "
                "settings; choose another output or pass --overwrite"
            )
        if sizes.get(tar) == marker.get("bytes"):
            found[tar] = marker
    return found


def _remove_debris(out: Store, prefix: str, planned: set[str] | None) -> None:
    """Temp files of a killed export (local writers' `<tar>.<id>.partial`); with `planned` (an
    overwrite), also the tars and markers of an earlier export that this plan does not have."""
    for entry in out.list(""):
        if not entry.name.startswith(prefix + "-"):
            continue
        stale = planned is not None and entry.name.endswith(".tar") and entry.name not in planned
        if entry.name.endswith(".partial") or stale:
            out.delete(entry.rel)
    if planned is None:
        return
    for entry in out.list(MARKERS):
        if entry.name.startswith(prefix + "-") and entry.name[: -len(".json")] + ".tar" not in planned:
            out.delete(entry.rel)


def write_tar(
    ds: Dataset, out: Store, name: str, start: int, stop: int, settings: ExportSettings, fp: str
) -> dict[str, Any]:
    """Write one tar (visible only when complete), then its done-marker; returns the marker."""
    chunks = _chunks(ds, start, stop)
    count = 0
    with out.writer(name) as f:
        sink = _Hashing(f)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for item in read_ahead(chunks, lambda r: ds.get_batch(list(r))):
                for member, data in sample_members(item, settings.image_format):
                    info = tarfile.TarInfo(member)
                    info.size, info.mode, info.mtime = len(data), 0o444, 0
                    tar.addfile(info, io.BytesIO(data))
                count += 1
    marker = {
        "tar": name,
        "start": start,
        "stop": stop,
        "count": count,
        "bytes": sink.size,
        "sha256": sink.sha.hexdigest(),
        "fingerprint": fp,
    }
    out.write_bytes(f"{MARKERS}/{name[: -len('.tar')]}.json", json.dumps(marker).encode())
    return marker


def _chunks(ds: Dataset, start: int, stop: int) -> Iterator[range]:
    """[start, stop) cut at source shard boundaries and every CHUNK items."""
    pos = start
    while pos < stop:
        shard, _ = ds.locate(pos)
        end = ds.shard_start(shard + 1) if shard + 1 < len(ds.shards) else len(ds)
        end = min(stop, end, pos + CHUNK)
        yield range(pos, end)
        pos = end


class _Hashing:
    """A write-only file object that hashes and counts what passes through to `f`."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


# -- one sample -------------------------------------------------------------------------------
def escape_key(key: str) -> str:
    """The key as a WebDataset `__key__` (no dots in the last path part; reversible by unquote)."""
    escaped = key.replace("%", "%25").replace(".", "%2E")  # also makes '..' segments harmless
    return "%2F" + escaped[1:] if escaped.startswith("/") else escaped


def sample_members(item: dict[str, Any], image_format: str = "auto") -> list[tuple[str, bytes]]:
    """(member name, bytes) of one dataset item, in the module doc's layout."""
    key = escape_key(str(item["key"]))
    ext, data = image_member(item["image"], image_format)
    members = [(f"{key}.{ext}", data)]
    label = item.get("label")
    if label is not None and int(label) >= 0:
        members.append((f"{key}.cls", str(int(label)).encode()))
    extra = {k: v for k, v in item.items() if k not in ("image", "label", "key")}
    caption = extra.pop("caption", None)
    if caption is not None:
        members.append((f"{key}.txt", str(caption).encode()))
    if extra:
        members.append((f"{key}.json", json.dumps(extra, default=_json_value, ensure_ascii=False).encode()))
    return members


def image_member(image: Any, image_format: str) -> tuple[str, bytes]:
    """(extension, bytes): stored encodings as they are; raw pixels as .npy or re-encoded."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return sniff_extension(data), data
    arr = np.asarray(image)
    if image_format in ("auto", "npy"):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return "npy", buf.getvalue()
    from PIL import Image

    pil = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, "PNG" if image_format == "png" else "JPEG", **({} if image_format == "png" else {"quality": 95}))
    return image_format, buf.getvalue()


def sniff_extension(data: bytes) -> str:
    """File extension of encoded image bytes, from their magic number ('img' when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "img")


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    raise TypeError(f"cannot store {type(value).__name__} in a sample's .json")
