"""Training reader over a converted dataset: `open_dataset(uri)` -> random access and iteration.

Index i is the i-th successfully converted item in input order. Only the manifest is trusted.
Shard handles open lazily and per process (a fork or spawn in a DataLoader worker re-opens them),
so a `Dataset` pickles as just its URI, options and manifest.
Remote HDF5 shards are read through fsspec with a block cache (random access without
downloading whole files; `download=True` fetches them whole instead); LMDB shards are downloaded
once into a local, content-addressed cache (LMDB must not live on a network filesystem), verified
against the manifest checksum, and reused by later opens. `storage_options` may use ${VAR}.
"""

from __future__ import annotations

import bisect
import io
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .fetch import prefetch
from .formats.base import ShardReader, get_format, open_reader
from .manifest import ManifestError, read_ledger, read_manifest
from .store import file_digest, open_store

ITER_CHUNK = 256  # items per batched read during iteration
REMOTE_BLOCK = 2**20  # fsspec block size for remote HDF5 random access


def default_cache_dir() -> Path:
    return Path(os.environ.get("CONVERT_CACHE_DIR", Path.home() / ".cache" / "convert"))


class Dataset:
    """Map-style dataset of {"image": HxWxC uint8, "label": int|None, "key": str}."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        decode: bool = True,
        download: bool = False,
    ) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.decode = decode
        self.download = download
        self._out = open_store(uri, self.storage_options)
        self.manifest = read_manifest(self._out)
        self._shards = [s for s in self.manifest["shards"] if s["ok"] > 0]
        self._starts = np.cumsum([0] + [s["ok"] for s in self._shards]).tolist()
        self._format = get_format(self.manifest["format"])
        self._readers: dict[int, ShardReader] = {}
        self._lock = threading.Lock()  # background iteration threads open shards too
        self._pid = os.getpid()

    # -- pickling: handles are per process ------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    # -- public API -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names")

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, local = self._locate(index)
        return self._finish(self._reader(shard).get(local))

    def get_batch(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Items for `indices` (any order, repeats allowed) with one read per shard touched."""
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for pos, index in enumerate(indices):
            shard, local = self._locate(index)
            by_shard.setdefault(shard, []).append((pos, local))
        out: list[dict[str, Any]] = [{}] * len(indices)
        for shard, pairs in by_shard.items():
            items = self._reader(shard).get_batch([local for _, local in pairs])
            for (pos, _), item in zip(pairs, items):
                out[pos] = self._finish(item)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Ordered iteration; the next chunks are read in the background while this one is consumed."""
        chunks = [range(s, min(s + ITER_CHUNK, len(self))) for s in range(0, len(self), ITER_CHUNK)]
        results = prefetch(chunks, lambda r: self.get_batch(list(r)), depth=2)
        try:
            for fetched in results:
                if fetched.error is not None:
                    raise fetched.error
                yield from fetched.value
        finally:
            results.close()

    def ledger(self) -> dict[str, Any]:
        """Every input item with its status and error message (columns)."""
        return read_ledger(self._out)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------
    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for dataset of {n} items")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _reader(self, shard: int) -> ShardReader:
        if self._pid != os.getpid():  # forked: never share file handles (or a held lock) across processes
            self._readers, self._lock, self._pid = {}, threading.Lock(), os.getpid()
        reader = self._readers.get(shard)
        if reader is None:
            with self._lock:  # one download / open per shard even when iteration threads race
                reader = self._readers.get(shard)
                if reader is None:
                    reader = self._readers[shard] = open_reader(self._format.name, self._source(self._shards[shard]))
        return reader

    def _source(self, shard: dict[str, Any]) -> Any:
        local = self._out.local_path(shard["path"])
        if local is not None:
            return local
        if self._format.needs_local_file or self.download:
            return str(self._cached_copy(shard))
        return self._out.open(shard["path"], "rb", block_size=REMOTE_BLOCK, cache_type="blockcache")

    def _cached_copy(self, shard: dict[str, Any]) -> Path:
        """Download a shard once into a content-addressed cache file and verify its sha256.

        The file name is the manifest's sha256, so a cached copy is reused by any later open of
        any dataset holding the same shard; a copy of the wrong size is fetched again.
        """
        target = self.cache_dir / f"{shard['sha256']}{self._format.extension}"
        if target.is_file() and target.stat().st_size == shard["bytes"]:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        try:
            self._out.get_file(shard["path"], str(tmp))
            size, digest = file_digest(str(tmp))
            if digest != shard["sha256"] or size != shard["bytes"]:
                raise ManifestError(f"{self._out.url(shard['path'])}: checksum does not match the manifest; "
                                    "run `convert-dataset verify` and re-run the conversion")  # fmt: skip
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def _finish(self, item: dict[str, Any]) -> dict[str, Any]:
        if self.decode and isinstance(item["image"], (bytes, bytearray, memoryview, np.void)):
            item = {**item, "image": decode_image(bytes(item["image"]))}
        return item


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> HxWxC uint8 (C=1 for grayscale)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def open_dataset(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    decode: bool = True,
    download: bool = False,
) -> Dataset:
    """Open a converted dataset (local path or any fsspec URL, e.g. s3://bucket/out/) for training.

    download=True copies remote HDF5 shards whole into `cache_dir` (LMDB shards always are).
    """
    return Dataset(uri, storage_options=storage_options, cache_dir=cache_dir, decode=decode, download=download)
