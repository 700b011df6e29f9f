"""S3 (and S3-compatible) stores: s3fs plus what s3fs lacks.

s3fs gives reads, listings and plain writes. Added here: a checksummed single PUT or multipart
upload that is aborted if any part fails (S3 itself rejects a body whose SHA-256 does not match),
conditional create (`If-None-Match: *`, for leases), a paged listing that keeps ETags, incomplete
multipart uploads as leftovers, and a preflight that turns a missing bucket or refused
credentials into one line naming the URI and the fix.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
from typing import Any, BinaryIO, Iterator

from .base import Entry, Leftover, StorageError, Store, first_line

PART_SIZE = 16 * 2**20  # multipart part size (S3 needs >= 5 MiB); objects up to 2 parts use one PUT
UPLOAD_CONCURRENCY = 4  # parts in flight per upload (bounds memory to ~64 MiB)


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


class S3Store(Store):
    supports_conditional_create = True
    supports_multipart = True
    part_size: int | None = None  # None: the module's PART_SIZE (tests shrink either)

    def _split(self, rel: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(self.path(rel))
        return bucket, key

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, **kwargs)

    # -- reading --------------------------------------------------------------------------
    def info(self, rel: str) -> Entry:
        bucket, key = self._split(rel)
        head = self._call("head_object", Bucket=bucket, Key=key)
        return Entry(rel, int(head["ContentLength"]), head.get("ETag", "").strip('"'), head.get("VersionId", "") or "",
                     _stamp(head.get("LastModified")))  # fmt: skip

    def list(self, rel_dir: str) -> Iterator[Entry]:
        """list_objects_v2 page by page (1000 keys each), streamed; keeps each object's ETag."""
        bucket, prefix = self._split(rel_dir)
        prefix = f"{prefix.rstrip('/')}/" if prefix else ""
        base = rel_dir.rstrip("/")
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        while True:
            page = self._call("list_objects_v2", **kw)
            for obj in page.get("Contents", []):
                yield Entry(f"{base}/{obj['Key'][len(prefix):]}", int(obj["Size"]), obj.get("ETag", "").strip('"'),
                            mtime_ns=_stamp(obj.get("LastModified")))  # fmt: skip
            for sub in page.get("CommonPrefixes", []):
                yield Entry(f"{base}/{sub['Prefix'][len(prefix):].rstrip('/')}", 0, is_dir=True)
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

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        bucket, key = self._split(rel)
        try:
            self._call("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
            return False
        except Exception as exc:  # noqa: BLE001 - botocore ClientError: only PreconditionFailed means "exists"
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or "Precondition" in str(exc):
                return False
            if code in ("NotImplemented", "InvalidArgument"):
                raise StorageError(f"{self.url(rel)}: this object store does not support conditional writes "
                                   "(If-None-Match), so a run cannot lock the output; use AWS S3 or a local output") from None
            raise
        finally:
            self.fs.invalidate_cache(self.path(rel))
        return True

    def publish(self, tmp: str, rel: str, size: int, sha256: str | None = None) -> None:
        """One checksummed PUT, or a checksummed multipart upload aborted on any failure; then
        the stored size is checked."""
        if sha256 is None:
            return super().publish(tmp, rel, size)
        from fsspec.asyn import sync

        bucket, key = self._split(rel)
        sync(self.fs.loop, self._upload, tmp, bucket, key, size, sha256)
        self._check_size(rel, size)

    async def _upload(self, path: str, bucket: str, key: str, size: int, sha256: str) -> None:
        part = self.part_size or PART_SIZE
        if size <= 2 * part:
            body, _ = await asyncio.to_thread(_read_part, path, 0, size)
            await self.fs._call_s3("put_object", Bucket=bucket, Key=key, Body=body,
                                   ChecksumSHA256=_b64(bytes.fromhex(sha256)))  # fmt: skip
            return
        mpu = await self.fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256")
        upload_id = mpu["UploadId"]
        try:
            parts = await self._parts(path, bucket, key, upload_id, size, part)
            await self.fs._call_s3("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id,
                                   MultipartUpload={"Parts": parts})  # fmt: skip
        except BaseException:
            with contextlib.suppress(Exception):
                await self.fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    async def _parts(self, path: str, bucket: str, key: str, upload_id: str, size: int,
                     part_size: int) -> list[dict[str, Any]]:  # fmt: skip
        """Upload the parts, at most UPLOAD_CONCURRENCY at once, each with its SHA-256.

        If one part fails the others are cancelled and awaited, so no part lands after the abort.
        """
        gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def one(number: int) -> dict[str, Any]:
            async with gate:
                body, checksum = await asyncio.to_thread(_read_part, path, (number - 1) * part_size, part_size)
                resp = await self.fs._call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id,
                                              PartNumber=number, Body=body, ChecksumSHA256=checksum)  # fmt: skip
                return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}

        tasks = [asyncio.ensure_future(one(n)) for n in range(1, max(1, -(-size // part_size)) + 1)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # -- leftovers and preflight -----------------------------------------------------------
    def leftovers(self) -> list[Leftover]:
        """Incomplete multipart uploads under the root (staged temps live on the workers' disks)."""
        bucket, prefix = self._split("")
        prefix = f"{prefix.rstrip('/')}/" if prefix else ""
        found, kw = [], {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = self._call("list_multipart_uploads", **kw)
            found += [Leftover("multipart", f"s3://{bucket}/{u['Key']}", u["UploadId"],
                               started=_stamp(u.get("Initiated")) / 1e9) for u in page.get("Uploads", [])]  # fmt: skip
            if not page.get("IsTruncated"):
                return found + super().leftovers()
            kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def remove_leftover(self, item: Leftover) -> None:
        if item.kind != "multipart":
            return super().remove_leftover(item)
        bucket, key = item.url[5:].split("/", 1)
        with contextlib.suppress(FileNotFoundError):
            self._call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=item.detail)

    def preflight(self, role: str) -> None:
        bucket = self.root.split("/", 1)[0]
        creds = f"check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or {role}.storage_options)"
        try:
            self._call("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StorageError(f"{role} {self.uri}: bucket {bucket!r} does not exist; create it or fix {role}.uri") from None
        except PermissionError as exc:
            raise StorageError(f"{role} {self.uri}: access to bucket {bucket!r} denied ({first_line(exc)}); {creds}") from None
        except Exception as exc:  # noqa: BLE001 - botocore credential/endpoint errors have no common base here
            name = type(exc).__name__
            if "Credential" in name:
                raise StorageError(f"{role} {self.uri}: no credentials found; {creds}") from None
            if "Endpoint" in name or isinstance(exc, (OSError, asyncio.TimeoutError)):
                raise StorageError(f"{role} {self.uri}: cannot reach the object store ({name}: {first_line(exc)}); "
                                   "check AWS_ENDPOINT_URL / storage_options.client_kwargs.endpoint_url") from None  # fmt: skip
            raise

