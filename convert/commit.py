"""Commit: where shards are staged, and how a finished shard becomes visible under its final name.

A shard is written under a temporary name unique to the attempt, closed, verified by the caller,
then moved into place: `os.replace` on a local filesystem (atomic), or one upload to the final key
on an object store (an S3 PUT / completed multipart upload is atomic per object, and carries the
shard's SHA-256 so S3 itself rejects a corrupted body). Two attempts of the same shard may run at
once; both produce the same bytes, so the last rename/upload wins harmlessly. A killed writer
leaves only a `.partial` temp (local) or an incomplete multipart upload (S3), never a broken object
under a final name; `leftovers` lists both and `clean_leftovers` removes them before a run.
Readers trust only shards the manifest (written last) lists with their sha256.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .config import ConfigError
from .secrets import resolve_options

SHARDS_DIR = "shards"
PARTIAL = ".partial"
PART_SIZE = 16 * 2**20  # multipart part size (S3 needs >= 5 MiB); shards up to 2 parts use one PUT
UPLOAD_CONCURRENCY = 4  # parts in flight per shard upload (bounds memory to ~64 MiB)


class StorageError(ConfigError):
    """The output/source store cannot be used as configured (missing bucket, refused credentials)."""


@dataclass(frozen=True)
class Output:
    """The dataset root: a local path or fsspec URL plus storage options (picklable, tiny)."""

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold ${VAR} references

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return _filesystem(self.uri, _options_key(self.storage_options))[0]

    @property
    def root(self) -> str:
        return _filesystem(self.uri, _options_key(self.storage_options))[1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        """Filesystem path (no protocol) of `rel` under the root."""
        return f"{self.root.rstrip('/')}/{rel}"

    def url(self, rel: str) -> str:
        """Full URL of `rel` (for messages and fsspec.open)."""
        return self.fs.unstrip_protocol(self.path(rel)) if not self.is_local else self.path(rel)

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache(self.path(rel))  # object stores: never answer from a stale listing
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small object atomically (temp + rename locally; single PUT remotely)."""
        if self.is_local:
            final = self.path(rel)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.{uuid.uuid4().hex[:12]}{PARTIAL}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            self.fs.pipe_file(self.path(rel), data)


_FS_CACHE: dict[tuple[str, str], tuple[fsspec.AbstractFileSystem, str]] = {}


def _options_key(options: dict[str, Any]) -> str:
    """Hashable form of (possibly nested) storage options, e.g. with client_kwargs."""
    return json.dumps(options, sort_keys=True, default=repr)


def _filesystem(uri: str, options: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem + root path for `uri`, cached per process; ${VAR} references resolved here."""
    key = (uri, options)
    if key not in _FS_CACHE:
        fs, root = fsspec.core.url_to_fs(uri, **resolve_options(json.loads(options)))
        if isinstance(fs, LocalFileSystem):
            root = os.path.abspath(root)
        _FS_CACHE[key] = (fs, root)
    return _FS_CACHE[key]


def shard_rel_path(name: str, extension: str) -> str:
    return f"{SHARDS_DIR}/{name}{extension}"


@contextlib.contextmanager
def staging_path(out: Output, name: str, extension: str) -> Iterator[str]:
    """A local temp path unique to this attempt; removed afterwards whatever happened.

    Local outputs stage inside the output's shards/ folder so the final rename stays on one
    filesystem (atomic); remote outputs stage in a worker-local temp dir before upload.
    """
    attempt = uuid.uuid4().hex[:12]
    if out.is_local:
        folder = out.path(SHARDS_DIR)
        os.makedirs(folder, exist_ok=True)
        tmpdir = None
    else:
        folder = tmpdir = tempfile.mkdtemp(prefix="convert-")
    tmp = os.path.join(folder, f".{name}.{attempt}{PARTIAL}{extension}")
    try:
        yield tmp
    finally:
        for leftover in (tmp, tmp + "-lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _digest(f: Any, chunk: int) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    while block := f.read(chunk):
        h.update(block)
        size += len(block)
    return size, h.hexdigest()


def file_digest(path: str, chunk: int = 4 * 2**20) -> tuple[int, str]:
    """(size, sha256 hex) of a local file, read in chunks."""
    with open(path, "rb") as f:
        return _digest(f, chunk)


def stream_digest(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 4 * 2**20) -> tuple[int, str]:
    """(size, sha256 hex) of any fsspec object, streamed."""
    with fs.open(path, "rb", block_size=chunk, cache_type="none") as f:
        return _digest(f, chunk)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "s3" in protocols or "s3a" in protocols


def publish(out: Output, tmp: str, rel_path: str, size: int, sha256: str | None = None) -> None:
    """Move a verified local temp file to its final name (rename locally, upload remotely).

    On S3 the upload carries the SHA-256 (S3 rejects a body that does not match), large shards go
    up as a multipart upload that is aborted if any part fails, and the stored size is checked.
    """
    final = out.path(rel_path)
    if out.is_local:
        os.replace(tmp, final)
        return
    fs = out.fs
    if is_s3(fs) and sha256 is not None:
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(final)
        sync(fs.loop, _s3_upload, fs, tmp, bucket, key, size, sha256)
        fs.invalidate_cache(final)
    else:
        fs.put_file(tmp, final)
    remote_size = fs.info(final)["size"]
    if remote_size != size:
        raise OSError(f"upload of {out.url(rel_path)} incomplete: {remote_size} of {size} bytes")


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _read_part(path: str, offset: int, length: int) -> tuple[bytes, str]:
    """(bytes, base64 SHA-256) of one slice of a local file; runs off the event loop."""
    with open(path, "rb") as f:
        f.seek(offset)
        body = f.read(length)
    return body, _b64(hashlib.sha256(body).digest())


async def _s3_upload(fs: Any, path: str, bucket: str, key: str, size: int, sha256: str) -> None:
    """One PUT, or a checksummed multipart upload that is aborted on any failure."""
    if size <= 2 * PART_SIZE:
        body, _ = await asyncio.to_thread(_read_part, path, 0, size)
        await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=body, ChecksumSHA256=_b64(bytes.fromhex(sha256)))
        return
    mpu = await fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")
    upload_id = mpu["UploadId"]
    try:
        parts = await _s3_parts(fs, path, bucket, key, upload_id, size)
        await fs._call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                          MultipartUpload={"Parts": parts})  # fmt: skip
    except BaseException:
        with contextlib.suppress(Exception):
            await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        raise


async def _s3_parts(fs: Any, path: str, bucket: str, key: str, upload_id: str, size: int) -> list[dict[str, Any]]:
    """Upload the file's parts, at most UPLOAD_CONCURRENCY at once, each with its SHA-256.

    If one part fails the others are cancelled and awaited, so no part lands after the abort.
    """
    gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

    async def part(number: int) -> dict[str, Any]:
        async with gate:
            body, checksum = await asyncio.to_thread(_read_part, path, (number - 1) * PART_SIZE, PART_SIZE)
            resp = await fs._call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                     Body=body, ChecksumSHA256=checksum)  # fmt: skip
            return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}

    tasks = [asyncio.ensure_future(part(n)) for n in range(1, max(1, -(-size // PART_SIZE)) + 1)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass(frozen=True)
class Leftover:
    """Debris of a failed or killed attempt: a local temp file, an incomplete upload, an unlisted object."""

    kind: str  # "partial" | "multipart" | "unlisted"
    url: str
    detail: str = ""


def partial_files(out: Output) -> list[Leftover]:
    """Temp files (`.partial`) of killed writers under the output's shards/ folder."""
    out.fs.invalidate_cache(out.path(SHARDS_DIR))
    try:
        names = out.fs.ls(out.path(SHARDS_DIR), detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [Leftover("partial", out.fs.unstrip_protocol(n) if not out.is_local else n)
            for n in names if PARTIAL in n.rsplit("/", 1)[-1]]  # fmt: skip


def incomplete_uploads(out: Output) -> list[Leftover]:
    """Multipart uploads under the output root that were started and never completed (S3 only)."""
    fs = out.fs
    if not is_s3(fs):
        return []
    bucket, prefix, _ = fs.split_path(out.root)
    prefix = f"{prefix.rstrip('/')}/" if prefix else ""
    found, kw = [], {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = fs.call_s3("list_multipart_uploads", **kw)
        found += [Leftover("multipart", f"s3://{bucket}/{u['Key']}", u["UploadId"]) for u in page.get("Uploads", [])]
        if not page.get("IsTruncated"):
            return found
        kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])


def clean_leftovers(out: Output) -> list[Leftover]:
    """Abort incomplete multipart uploads and delete `.partial` temps; returns what was removed.

    Call only while no attempt of this output runs (the orchestrator does, before submitting).
    """
    removed = []
    for item in incomplete_uploads(out):
        bucket, key = item.url[5:].split("/", 1)
        with contextlib.suppress(FileNotFoundError):
            out.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=item.detail)
        removed.append(item)
    for item in partial_files(out):
        with contextlib.suppress(FileNotFoundError):
            out.fs.rm_file(item.url)
        removed.append(item)
    return removed


def check_access(uri: str, storage_options: dict[str, Any], role: str) -> None:
    """Raise StorageError (one line naming `uri` and the fix) if an S3 bucket is missing,
    unreachable or refuses the credentials; other stores are left to their first real use."""
    fs, path = fsspec.core.url_to_fs(uri, **resolve_options(storage_options, f"{role}.storage_options"))
    if not is_s3(fs):
        return
    bucket = path.split("/", 1)[0]
    creds = f"check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or {role}.storage_options)"
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StorageError(f"{role} {uri}: bucket {bucket!r} does not exist; create it or fix {role}.uri") from None
    except PermissionError as exc:
        raise StorageError(f"{role} {uri}: access to bucket {bucket!r} denied ({_first_line(exc)}); {creds}") from None
    except Exception as exc:  # noqa: BLE001 - botocore credential/endpoint errors have no common base here
        name = type(exc).__name__
        if "Credential" in name:
            raise StorageError(f"{role} {uri}: no credentials found; {creds}") from None
        if "Endpoint" in name or isinstance(exc, (OSError, asyncio.TimeoutError)):
            raise StorageError(f"{role} {uri}: cannot reach the object store ({name}: {_first_line(exc)}); "
                               "check AWS_ENDPOINT_URL / storage_options.client_kwargs.endpoint_url") from None  # fmt: skip
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
