"""`s3://` backend: a repository under a prefix of an S3 bucket, with S3's own conditional
writes.

Blocking requests run in worker threads (`trio.to_thread.run_sync`) under two
`CapacityLimiter`s: one for the small requests a walk or an upload's check makes many of
(whole-object GETs of manifests, HEADs: `small_concurrency`, 48, since at 20 ms of RTT a
cold walk wants many in flight and must not queue behind big transfers), one for everything
else (`max_concurrency`, 16). The blob requests (HEAD, PUT if new, streaming GET) and the
whole-object GET go through the `BlobTransport` chosen at construction (`s3blobs`: plain
keep-alive connections where it can, ~half of boto3's CPU per request); everything else
through the boto3 client (`s3client`). This is the one place that retries a single request, by the REQUEST policy of
`fsrepo.retry`: botocore's own retries (throttling, 5xx, dropped connections), and here

- `409 ConditionalRequestConflict` (real S3 answers it to racing conditional writes;
  retrying then gives the true answer, usually 412),
- a response body that broke mid-read: read again, or for a download resumed from the last
  byte written (botocore cannot: the body is read after the call returned).

Every failure is an `fsrepo.errors` exception (worded by `s3errors`). Credentials come from
boto3's usual chain (environment, profile, web identity via `AWS_ROLE_ARN` +
`AWS_WEB_IDENTITY_TOKEN_FILE`, instance metadata).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bx
import trio

from ..errors import ImgrepoError, IntegrityError, ObjectNotFound, PreconditionFailed
from ..retry import REQUEST, Backoff
from .base import (
    GET_LIMIT,
    NOT_MODIFIED,
    BlobSource,
    ChunkSink,
    NotModified,
    ObjectInfo,
    Store,
    StoredObject,
    source_size,
)
from .s3blobs import BlobTransport, blob_transport
from .s3client import new_client
from .s3errors import (
    STREAM_ERRORS,
    BrokenBody,
    ConditionalConflict,
    S3Errors,
    client_error_status,
    note_retry,
)
from .s3parts import CHUNK, FileSlice, hash_range
from .threads import first_error, run_stoppable

MiB = 1 << 20
MAX_PARTS = 10_000

T = TypeVar("T")


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


class S3Store(Store):
    """A repository under `prefix` in an S3 bucket (AWS, MinIO, R2, moto, ...)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        max_concurrency: int = 16,
        *,
        small_concurrency: int = 48,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        part_concurrency: int = 4,
        list_page_size: int = 1000,
        retries: Backoff = REQUEST,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        session: boto3.session.Session | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._root = self.prefix + "/" if self.prefix else ""
        self._threshold = multipart_threshold
        self._part_size = part_size
        self._part_concurrency = max(1, part_concurrency)
        self._page_size = list_page_size
        self._retries = retries
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self._small = trio.CapacityLimiter(max(1, small_concurrency))  # GETs whole, HEADs
        in_flight = max_concurrency + max(1, small_concurrency)
        session = session or boto3.session.Session()
        self._client = new_client(session, self.url, endpoint_url, region, policy=retries,
                                  max_concurrency=in_flight,
                                  connect_timeout=connect_timeout, read_timeout=read_timeout)
        self.endpoint: str = self._client.meta.endpoint_url
        self._errors = S3Errors(bucket, self.url, self.endpoint, retries.attempts or 1)
        self.blobs: BlobTransport = blob_transport(
            self._client, session, bucket, self._root, self._errors,
            policy=retries, connect_timeout=connect_timeout, read_timeout=read_timeout,
            pool_size=in_flight)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._root + key

    async def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run one blocking boto3 job in a worker thread, under the shared limiter."""
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except (bx.ClientError, bx.BotoCoreError) as exc:
            raise self._errors.botocore(
                exc, what, None if key is None else self._key(key)) from exc

    async def _retry_conflicts(self, key: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """A conditional write: 409 conflicts are transient, so back off and try again."""
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt()
            except ConditionalConflict as exc:
                where = self._errors.where(self._key(key))
                note_retry("conditional write", where, tries, "409 ConditionalRequestConflict")
                if self._retries.gives_up(tries):
                    raise PreconditionFailed(
                        f"{where}: conditional write kept conflicting with another writer "
                        "(409 ConditionalRequestConflict)") from exc
            await trio.sleep(self._retries.delay(tries))

    def _retry_broken_body(self, key: str, fn: Callable[[], T]) -> T:
        """In a worker thread: retry a request whose response body broke while being read
        (only then: failures of the request itself were retried by botocore already)."""
        tries = 0
        while True:
            tries += 1
            try:
                return fn()
            except BrokenBody as exc:
                note_retry("read", self._errors.where(self._key(key)), tries, str(exc))
                if self._retries.gives_up(tries):
                    raise
                time.sleep(self._retries.delay(tries))

    def _read_body(self, body: Any) -> bytes:
        try:
            return bytes(body.read())
        except STREAM_ERRORS as exc:
            raise BrokenBody(f"the response body broke off: {type(exc).__name__}: {exc}") from exc
        finally:
            body.close()

    # -- reads ------------------------------------------------------------------------------

    async def check(self) -> None:
        """Fail early, with a clear error, if the bucket is missing or access is refused."""

        def work() -> None:
            self._client.head_bucket(Bucket=self.bucket)

        try:
            await self._call("open", None, work)
        except ObjectNotFound:
            raise self._errors.no_such_bucket() from None

    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject | NotModified:
        """Through the blob transport (the direct path where it serves), under the limiter of
        small requests: a walk makes one per folder."""
        full = self._key(key)
        limit = GET_LIMIT

        def once() -> StoredObject | NotModified:
            got = self.blobs.get_small(full, if_none_match, limit)
            return NOT_MODIFIED if got is None else StoredObject(data=got[1], etag=got[0])

        return await trio.to_thread.run_sync(lambda: self._retry_broken_body(key, once),
                                             limiter=self._small)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if start < 0 or end <= start:
            return b""
        args = {"Bucket": self.bucket, "Key": self._key(key), "Range": f"bytes={start}-{end - 1}"}

        def once() -> bytes:
            try:
                resp = self._client.get_object(**args)
            except bx.ClientError as exc:
                if client_error_status(exc)[0] == 416:  # at or past the end: b"", as a file
                    return b""
                raise
            return self._read_body(resp["Body"])

        return await self._call("read", key, lambda: self._retry_broken_body(key, once))

    async def download(
        self, key: str, dest: Path, start: int = 0, on_chunk: Callable[[int], None] | None = None
    ) -> None:
        """One streaming GET from `start`; if the stream breaks, resume from the last byte
        written (pinned to the first response's etag with If-Match)."""
        full = self._key(key)
        sink = on_chunk if isinstance(on_chunk, ChunkSink) else None

        def work(stop: threading.Event) -> None:
            pos = start
            etag: str | None = None
            failures = 0
            fd = -1
            try:
                while not stop.is_set():
                    got = self.blobs.open_from(full, pos, etag)
                    if fd < 0:
                        fd = os.open(dest, os.O_WRONLY | os.O_CREAT, 0o666)
                    if got is None:
                        return
                    etag, body = got
                    before = pos
                    try:
                        while not stop.is_set():
                            try:
                                chunk = body.read(CHUNK)
                            except BrokenBody as exc:
                                failures = 0 if pos > before else failures + 1
                                note_retry("download", self._errors.where(full), failures,
                                           f"at byte {pos}: {exc}")
                                if self._retries.gives_up(failures):
                                    raise
                                time.sleep(self._retries.delay(failures))
                                break  # resume from `pos`, pinned to `etag`
                            if not chunk:
                                return
                            view = memoryview(chunk)
                            while view:
                                written = os.pwrite(fd, view, pos)
                                pos += written
                                view = view[written:]
                            if sink is not None:
                                sink.landed(chunk, pos - len(chunk))
                            if on_chunk is not None:
                                on_chunk(pos)
                    finally:
                        body.close()
            finally:
                if fd >= 0:
                    os.close(fd)

        await run_stoppable(work, self._limiter)

    async def head(self, key: str) -> int | None:
        return await trio.to_thread.run_sync(self.blobs.head, self._key(key),
                                             limiter=self._small)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self._key(prefix),
            "MaxKeys": self._page_size,
        }
        strip = len(self._root)
        while True:
            page = await self._call(
                "list", prefix, lambda a=dict(args): self._client.list_objects_v2(**a)
            )
            for obj in page.get("Contents") or ():
                yield ObjectInfo(
                    key=obj["Key"][strip:],
                    size=int(obj["Size"]),
                    mtime=obj["LastModified"].timestamp(),
                    etag=obj.get("ETag"),
                )
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    # -- writes -----------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        if if_match is not None and if_none_match:
            raise ValueError("put: if_match and if_none_match are exclusive")
        body = bytes(data)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": body,
                                "ChecksumAlgorithm": "SHA256",
                                "ChecksumSHA256": _b64(hashlib.sha256(body).hexdigest())}
        if if_match is not None:
            args["IfMatch"] = if_match
        if if_none_match:
            args["IfNoneMatch"] = "*"
        resp = await self._retry_conflicts(
            key, lambda: self._call("write", key, lambda: self._client.put_object(**args)))
        return self._errors.etag_of(resp, "write", self._key(key))

    async def put_file(self, key: str, path: BlobSource, sha256_hex: str) -> bool:
        """Streams from disk: one PUT up to the threshold, multipart above it. Does not HEAD
        first (the caller knows whether that is worth a request)."""
        checksum = _b64(sha256_hex)
        size = await trio.to_thread.run_sync(source_size, path)
        if size <= self._threshold:
            return await self._put_single(key, path, size, checksum, sha256_hex.lower())
        return await self._put_multipart(key, path, size, sha256_hex.lower())

    async def _put_single(self, key: str, path: BlobSource, size: int, checksum: str,
                          sha256_hex: str) -> bool:
        full = self._key(key)
        return await self._retry_conflicts(key, lambda: trio.to_thread.run_sync(
            self.blobs.put_new, full, path, size, sha256_hex, checksum, limiter=self._limiter))

    async def _put_multipart(self, key: str, path: BlobSource, size: int, expected: str) -> bool:
        full = self._key(key)
        part_size = max(self._part_size, -(-size // MAX_PARTS))
        ranges = [
            (number, offset, min(part_size, size - offset))
            for number, offset in enumerate(range(0, size, part_size), start=1)
        ]
        created = await self._call(
            "upload",
            key,
            lambda: self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256"
            ),
        )
        upload_id: str = created["UploadId"]
        done: dict[int, tuple[str, str]] = {}

        async def uploader(recv: trio.MemoryReceiveChannel[tuple[int, int, int, str]]) -> None:
            async with recv:
                async for number, offset, length, digest in recv:

                    def work(
                        number: int = number,
                        offset: int = offset,
                        length: int = length,
                        digest: str = digest,
                    ) -> str:
                        with FileSlice(path, offset, length) as body:
                            resp = self._client.upload_part(
                                Bucket=self.bucket,
                                Key=full,
                                UploadId=upload_id,
                                PartNumber=number,
                                Body=body,
                                ContentLength=length,
                                ChecksumAlgorithm="SHA256",
                                ChecksumSHA256=digest,
                            )
                        return self._errors.etag_of(resp, "upload", full)

                    done[number] = (await self._call("upload", key, work), digest)

        try:
            whole = hashlib.sha256()
            try:
                async with trio.open_nursery() as nursery:
                    send, recv = trio.open_memory_channel[tuple[int, int, int, str]](0)
                    async with recv:
                        for _ in range(min(self._part_concurrency, len(ranges))):
                            nursery.start_soon(uploader, recv.clone())
                    async with send:
                        # Hash part n+1 while earlier parts upload; the whole-file hash is free.
                        for number, offset, length in ranges:
                            digest = await trio.to_thread.run_sync(
                                hash_range, path, offset, length, whole
                            )
                            await send.send((number, offset, length, digest))
                        if whole.hexdigest() != expected:
                            raise IntegrityError(
                                f"{path} does not have the SHA-256 it is stored under "
                                f"({whole.hexdigest()} != {expected}); "
                                "it changed while being stored"
                            )
            except BaseExceptionGroup as group:
                first = first_error(group)
                if first is group:
                    raise
                raise first from None
            parts = [
                {"PartNumber": n, "ETag": done[n][0], "ChecksumSHA256": done[n][1]}
                for n in sorted(done)
            ]

            def complete() -> bool:
                try:
                    self._client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        IfNoneMatch="*",
                    )
                except bx.ClientError as exc:
                    if client_error_status(exc)[0] == 412:
                        return False
                    raise
                return True

            created_now = await self._retry_conflicts(
                key, lambda: self._call("upload", key, complete))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abort(key, upload_id)
            raise
        if not created_now:
            await self._abort(key, upload_id)
        return created_now

    async def _abort(self, key: str, upload_id: str) -> None:
        """Best effort: an upload left behind only costs storage until a lifecycle rule."""
        try:
            await self._call(
                "abort upload",
                key,
                lambda: self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._key(key), UploadId=upload_id
                ),
            )
        except (ImgrepoError, OSError):
            pass

    async def delete(self, key: str) -> None:
        def work() -> None:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
            except bx.ClientError as exc:
                status, code = client_error_status(exc)
                if status != 404 or code == "NoSuchBucket":
                    raise

        await self._call("delete", key, work)

    async def aclose(self) -> None:
        self.blobs.close()
        self._client.close()
