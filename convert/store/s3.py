"""S3 (and S3-compatible) stores: s3fs plus what s3fs lacks.

s3fs gives reads, listings and plain writes. Added here: a checksummed single PUT or multipart
upload that is aborted if any part fails (S3 itself rejects a body whose SHA-256 does not match),
conditional create (`If-None-Match: *`) and compare-and-swap (`If-Match` on the ETag) for leases,
a publish guarded by an `If-Match` rewrite of the guard object just before the commit (the last
part of a multipart upload, or the single PUT), a paged listing that keeps ETags, streamed
ranged GETs pinned by `If-Match`, incomplete multipart uploads, and a preflight that turns a
missing bucket or refused credentials into one line naming the URI and the fix.

This module and `s3_stream` are the only code in the package that calls S3.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import datetime as dt
import hashlib
import os
import re
from typing import Any, BinaryIO, Iterator

from fsspec.asyn import sync

from .base import Entry, Guard, PreconditionFailed, RangeStream, StorageError, entry_of, first_line, guard_refused
from .generic import FsspecStore
from .s3_stream import EmptyRange, S3Range

PART_SIZE = 16 * 2**20  # multipart part size (S3 needs >= 5 MiB); objects up to 2 parts use one PUT
UPLOAD_CONCURRENCY = 4  # parts in flight per upload (bounds memory to ~64 MiB)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _read_part(path: str, offset: int, length: int) -> tuple[bytes, str]:
    """(bytes, base64 SHA-256) of one slice of a local file; runs off the event loop."""
    with open(path, "rb") as f:
        f.seek(offset)
        body = f.read(length)
    return body, _b64(hashlib.sha256(body).digest())


def _stamp(value: Any) -> int:
    return int(value.timestamp() * 1e9) if isinstance(value, dt.datetime) else -1


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError, or of one s3fs translated into an OSError."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return str(response["Error"].get("Code", ""))
    return ""


def _changed(exc: BaseException) -> bool:
    return error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _extent(resp: dict[str, Any]) -> tuple[int, int]:
    """(object size, first byte returned) from a GetObject response."""
    m = _CONTENT_RANGE.match(resp.get("ContentRange") or "")
    if m and m.group(3) != "*":
        return int(m.group(3)), int(m.group(1))
    return int(resp["ContentLength"]), 0


class S3Store(FsspecStore):
    supports_conditional_writes = True
    supports_etags = True
    supports_multipart = True
    part_size: int | None = None  # None: the module's PART_SIZE (tests shrink either)

    def __init__(self, uri: str, options: dict[str, Any], fs: Any, root: str) -> None:
        super().__init__(uri, options, fs, root)
        self._fences: dict[str, tuple[bytes, str]] = {}  # guard rel -> last (content, ETag) it allowed

    def _split(self, rel: str) -> tuple[str, str, str | None]:
        """(bucket, key, version id or None)."""
        bucket, key, version = self.fs.split_path(self.path(rel))
        return bucket, key, version or None

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, **kwargs)

    def _object(self, rel: str) -> dict[str, Any]:
        bucket, key, version = self._split(rel)
        return {"Bucket": bucket, "Key": key, **({"VersionId": version} if version else {})}

    # -- reading --------------------------------------------------------------------------
    def info(self, rel: str) -> Entry:
        return entry_of(rel, self._call("head_object", **self._object(rel)))

    def open_range(
        self, rel: str, start: int = 0, end: int | None = None, match: str | None = None, timeout: float | None = None
    ) -> RangeStream:
        """One streaming GetObject; `match` (an etag: token) becomes If-Match."""
        kw = self._object(rel)
        if match is not None and match.startswith("etag:"):
            kw["IfMatch"] = f'"{match[5:]}"'
        if start > 0 or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = sync(self.fs.loop, self._get_object, kw, timeout)
        except OSError as exc:
            if _changed(exc):
                raise PreconditionFailed(f"{self.url(rel)} changed (ETag no longer {match})") from exc
            if error_code(exc) in ("InvalidRange", "416"):
                return EmptyRange(self.info(rel), start)
            raise
        total, first = _extent(resp)
        entry = entry_of(rel, {**resp, "ContentLength": total})
        stop = total if end is None else min(end, total)
        return S3Range(self.fs.loop, resp["Body"], entry, first, stop - first, timeout)

    async def _get_object(self, kw: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        return await asyncio.wait_for(self.fs._call_s3("get_object", **kw), timeout)

    def list(self, rel_dir: str) -> Iterator[Entry]:
        """list_objects_v2 page by page (1000 keys each), streamed; keeps each object's ETag."""
        bucket, prefix, _ = self._split(rel_dir)
        prefix = f"{prefix.rstrip('/')}/" if prefix else ""
        base = f"{rel_dir.rstrip('/')}/" if rel_dir.strip("/") else ""
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        while True:
            page = self._call("list_objects_v2", **kw)
            for obj in page.get("Contents", []):
                yield entry_of(f"{base}{obj['Key'][len(prefix) :]}", obj)
            for sub in page.get("CommonPrefixes", []):
                yield Entry(f"{base}{sub['Prefix'][len(prefix) :].rstrip('/')}", 0, is_dir=True)
            if not page.get("IsTruncated"):
                return
            kw["ContinuationToken"] = page["NextContinuationToken"]

    def identity(self, rel: str) -> dict[str, Any]:
        """The stored ETag and version: provable without downloading a byte."""
        entry = self.info(rel)
        return {"size": entry.size, "etag": entry.etag, "version": entry.version}

    def same_object(self, rel: str, recorded: dict[str, Any], entry: Entry) -> bool:
        return bool(recorded.get("etag")) and (entry.size, entry.etag) == (recorded.get("size"), recorded["etag"])

    # -- writing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, rel: str) -> Iterator[BinaryIO]:
        """Streamed: s3fs with autocommit=False completes the (multipart) upload on commit()
        and discard() aborts it, so readers never see a partial object."""
        fh = self.fs.open(self.path(rel), "wb", autocommit=False)
        try:
            yield fh
            fh.close()
        except BaseException:
            with contextlib.suppress(Exception):
                fh.discard()
                fh.closed = True  # keep __del__ from flushing the aborted upload
            raise
        fh.commit()
        self.fs.invalidate_cache(self.path(rel))

    async def _put_if(self, rel: str, data: bytes, **condition: str) -> str | None:
        """PUT with If-None-Match / If-Match: the new ETag, or None if the precondition failed."""
        bucket, key, _ = self._split(rel)
        try:
            resp = await self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except (FileExistsError, FileNotFoundError):  # s3fs's translation of 412 (If-None-Match) / 404
            return None
        except Exception as exc:  # botocore ClientError: only a failed precondition means "changed"
            if _changed(exc) or "Precondition" in str(exc):
                return None
            if error_code(exc) in ("NotImplemented", "InvalidArgument"):
                raise StorageError(
                    f"{self.url(rel)}: this object store does not support conditional writes "
                    "(If-Match/If-None-Match), so a run cannot lock the output; use AWS S3 or a "
                    "local output"
                ) from None
            raise
        finally:
            self.fs.invalidate_cache(self.path(rel))
        return str(resp.get("ETag", "")).strip('"')

    async def _read_versioned(self, rel: str) -> tuple[bytes, str]:
        resp = await self.fs._call_s3("get_object", **self._object(rel))
        body = resp["Body"]
        try:
            data = await body.read()
        finally:
            body.close()
        return data, str(resp.get("ETag", "")).strip('"')

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        return sync(self.fs.loop, self._put_if, rel, data, IfNoneMatch="*") is not None

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        return sync(self.fs.loop, self._read_versioned, rel)

    def replace_if(self, rel: str, data: bytes, token: str) -> str | None:
        return sync(self.fs.loop, self._put_if, rel, data, IfMatch=f'"{token}"')

    def delete_if(self, rel: str, token: str) -> bool:
        try:
            self._call("delete_object", **self._object(rel), IfMatch=f'"{token}"')
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _changed(exc):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path(rel))
        return True

    async def _fence(self, guard: Guard, rel: str) -> None:
        """Rewrite the guard object with its own bytes under If-Match on its ETag: the server
        confirms that the version the guard allowed is still current. Identical bytes keep the
        ETag, so the holder's next compare-and-swap is unaffected (under SSE-KMS the ETag is not a
        content hash and moves: the holder's renewal then re-reads, see lease.renew). The last
        allowed version is remembered, so a fence is one request until the guard object changes."""
        cached = self._fences.get(guard.rel)
        if cached is not None:
            fresh = await self._put_if(guard.rel, cached[0], IfMatch=f'"{cached[1]}"')
            if fresh is not None:
                self._fences[guard.rel] = (cached[0], fresh)
                return
        for _ in range(5):  # a concurrent renewal (or fence) moved the ETag: read again
            try:
                data, etag = await self._read_versioned(guard.rel)
            except FileNotFoundError:
                raise guard_refused(self, rel, guard) from None
            if not guard.holds(data):
                raise guard_refused(self, rel, guard)
            fresh = await self._put_if(guard.rel, data, IfMatch=f'"{etag}"')
            if fresh is not None:
                self._fences[guard.rel] = (data, fresh)
                return
        raise guard_refused(self, rel, guard)

    def publish(self, tmp: str, rel: str, size: int, sha256: str | None = None, guard: Guard | None = None) -> None:
        """One checksummed PUT, or a checksummed multipart upload aborted on any failure; then
        the stored size is checked. A guard is confirmed by `_fence` right before the commit."""
        if sha256 is None or os.path.isdir(tmp):
            return super().publish(tmp, rel, size, guard=guard)
        bucket, key, _ = self._split(rel)
        sync(self.fs.loop, self._upload, tmp, bucket, key, size, sha256, None if guard is None else (guard, rel))
        self._check_size(rel, size)

    async def _upload(
        self, path: str, bucket: str, key: str, size: int, sha256: str, fence: tuple[Guard, str] | None
    ) -> None:
        part = self.part_size or PART_SIZE
        if size <= 2 * part:
            body, _ = await asyncio.to_thread(_read_part, path, 0, size)
            if fence is not None:
                await self._fence(*fence)
            await self.fs._call_s3(
                "put_object", Bucket=bucket, Key=key, Body=body, ChecksumSHA256=_b64(bytes.fromhex(sha256))
            )
            return
        mpu = await self.fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")
        upload_id = mpu["UploadId"]
        try:
            parts = await self._parts(path, bucket, key, upload_id, size, part)
            if fence is not None:
                await self._fence(*fence)
            await self.fs._call_s3(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self.fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    async def _parts(
        self, path: str, bucket: str, key: str, upload_id: str, size: int, part_size: int
    ) -> builtins.list[dict[str, Any]]:
        """Upload the parts, at most UPLOAD_CONCURRENCY at once, each with its SHA-256.

        If one part fails the others are cancelled and awaited, so no part lands after the abort.
        """
        gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def one(number: int) -> dict[str, Any]:
            async with gate:
                body, checksum = await asyncio.to_thread(_read_part, path, (number - 1) * part_size, part_size)
                resp = await self.fs._call_s3(
                    "upload_part",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ChecksumSHA256=checksum,
                )
                return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}

        tasks = [asyncio.ensure_future(one(n)) for n in range(1, max(1, -(-size // part_size)) + 1)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # -- incomplete uploads and preflight -------------------------------------------------
    def incomplete_uploads(self) -> builtins.list[tuple[str, str, float]]:
        """Multipart uploads begun under the root and never completed or aborted."""
        bucket, prefix, _ = self._split("")
        prefix = f"{prefix.rstrip('/')}/" if prefix else ""
        found, kw = [], {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = self._call("list_multipart_uploads", **kw)
            found += [
                (u["Key"][len(prefix) :], u["UploadId"], _stamp(u.get("Initiated")) / 1e9)
                for u in page.get("Uploads", [])
            ]
            if not page.get("IsTruncated"):
                return found
            kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def abort_upload(self, rel: str, upload_id: str) -> None:
        bucket, key, _ = self._split(rel)
        with contextlib.suppress(FileNotFoundError):
            self._call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    def preflight(self, role: str) -> None:
        bucket = self.root.split("/", 1)[0]
        creds = (
            f"check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or {role}.storage_options)"
        )
        try:
            self._call("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StorageError(
                f"{role} {self.uri}: bucket {bucket!r} does not exist; create it or fix {role}.uri"
            ) from None
        except PermissionError as exc:
            raise StorageError(
                f"{role} {self.uri}: access to bucket {bucket!r} denied ({first_line(exc)}); {creds}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - botocore credential/endpoint errors have no common base here
            name = type(exc).__name__
            if "Credential" in name:
                raise StorageError(f"{role} {self.uri}: no credentials found; {creds}") from None
            if "Endpoint" in name or isinstance(exc, (OSError, asyncio.TimeoutError)):
                raise StorageError(
                    f"{role} {self.uri}: cannot reach the object store ({name}: {first_line(exc)}); "
                    "check AWS_ENDPOINT_URL / storage_options.client_kwargs.endpoint_url"
                ) from None
            raise
