"""`s3://` backend: boto3 in worker threads, with S3's own conditional writes.

One boto3 client is shared by all threads (clients are thread-safe, sessions are not); every
call runs via `trio.to_thread.run_sync` under one `CapacityLimiter`, and the connection pool
is larger than that limit so urllib3 never throws connections away. botocore's adaptive
retries handle throttling, 5xx and dropped connections; on top of that this module

- retries `409 ConditionalRequestConflict` (real S3 answers it to racing conditional writes;
  retrying then gives the true answer, usually 412),
- resumes a download that broke mid-stream from the last byte written (botocore cannot: the
  body is read after the call returned),
- turns every botocore failure into an `fsrepo.errors` exception whose message names the
  bucket, key or endpoint but never a credential.

Credentials come from boto3's usual chain (environment, profile, web identity via
`AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`, instance metadata).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bx
import trio
from botocore.config import Config

from ..errors import (
    ConfigError,
    ImgrepoError,
    IntegrityError,
    NoSuchBucket,
    ObjectNotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
)
from .base import NOT_MODIFIED, ObjectInfo, Store, StoredObject, _NotModified
from .local import first_error, run_stoppable
from .s3direct import DirectBlobIO, Fallback, note_retry

MiB = 1 << 20
CHUNK = MiB
MAX_PARTS = 10_000
MIN_PART = 5 * MiB  # S3's minimum for every part but the last

ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "SignatureDoesNotMatch",
        "InvalidSecurity",
        "AccountProblem",
    }
)
CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "OperationAborted"})
INTEGRITY_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout"}
)
CREDENTIAL_ERRORS = (
    bx.PartialCredentialsError,
    bx.CredentialRetrievalError,
    bx.TokenRetrievalError,
    bx.RefreshWithMFAUnsupportedError,
    bx.NoAuthTokenError,
)
NETWORK_ERRORS = (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)
# Failures while reading a response body, after botocore's own retries are over.
STREAM_ERRORS = (
    bx.ResponseStreamingError,
    bx.IncompleteReadError,
    bx.ReadTimeoutError,
    bx.ConnectionClosedError,
    bx.FlexibleChecksumError,
)

# ... and the same from the direct path's http.client connections.
BROKEN_BODY = STREAM_ERRORS + (OSError, http.client.HTTPException)

T = TypeVar("T")
log = logging.getLogger(__name__)


def _log_retry(response: Any = None, operation: Any = None, attempts: int = 0,
               caught_exception: Exception | None = None, request_dict: Any = None,
               **_: Any) -> None:
    """botocore's needs-retry hook: say in the log what went wrong before botocore retries it
    (silently otherwise), so that an error storm that was ridden out still leaves a trace.
    Returns None: the retry decision stays botocore's."""
    what = ""
    if caught_exception is not None:
        what = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None:
        status = getattr(response[0], "status_code", 0)
        code = str(((response[1] or {}).get("Error") or {}).get("Code") or "")
        if status >= 500 or status == 429 or code in THROTTLE_CODES:
            what = f"{status} {code}".strip()
    if what:
        note_retry(getattr(operation, "name", "?"), str((request_dict or {}).get("url", "")),
                   attempts, what)


class _Conflict(PreconditionFailed):
    """409 ConditionalRequestConflict: transient, retried by `_conditional`."""


def _code(exc: bx.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error") or {}
    meta = exc.response.get("ResponseMetadata") or {}
    return str(err.get("Code") or ""), int(meta.get("HTTPStatusCode") or 0)


class _BodyBroken(Exception):
    """A response body failed mid-read: the one failure botocore does not retry itself."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _read_body(body: Any) -> bytes:
    try:
        return bytes(body.read())
    except STREAM_ERRORS as exc:
        raise _BodyBroken(exc) from exc
    finally:
        body.close()


def _plain_http(endpoint_url: str | None) -> bool:
    return bool(endpoint_url) and endpoint_url.lower().startswith("http://")  # type: ignore[union-attr]


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


class _FileSlice:
    """A seekable, read-only view of `length` bytes of a file from `offset`: the body of one
    multipart part, streamed from disk (and rewindable for botocore's signing and retries)."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._offset = offset
        self._length = length
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        parts: list[bytes] = []
        while size > 0:
            chunk = os.pread(self._fd, size, self._offset + self._pos)
            if not chunk:
                raise OSError(f"file shrank while being uploaded (part at {self._offset})")
            parts.append(chunk)
            self._pos += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> _FileSlice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hash_range(path: Path, offset: int, length: int, whole: Any) -> str:
    """SHA-256 (base64) of one part, also feeding the running whole-file hash."""
    part = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{path} shrank while being uploaded")
            part.update(chunk)
            whole.update(chunk)
            left -= len(chunk)
    return base64.b64encode(part.digest()).decode("ascii")


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
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        part_concurrency: int = 4,
        list_page_size: int = 1000,
        max_attempts: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        conflict_retries: int = 5,
        stream_retries: int = 5,
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
        self._max_attempts = max_attempts
        self._conflict_retries = conflict_retries
        self._stream_retries = stream_retries
        self._limiter = trio.CapacityLimiter(max_concurrency)
        config = Config(
            max_pool_connections=max_concurrency + 4,
            retries={"mode": "adaptive", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Custom endpoints (MinIO, moto, ...) rarely have wildcard DNS for virtual hosts,
            # and several S3-compatible servers reject botocore's default CRC32 checksums and
            # aws-chunked trailers: there, send only the checksums we add ourselves (SHA-256
            # of blobs and parts), which every server that supports checksums accepts.
            s3={"addressing_style": "path" if endpoint_url else "auto",
                # Over https botocore already sends bodies that carry our SHA-256 checksum
                # unsigned (S3 verifies the checksum); over plain http (loopback only) it
                # would hash every body once more just for the signature.
                "payload_signing_enabled": False if _plain_http(endpoint_url) else None},
            request_checksum_calculation="when_required" if endpoint_url else "when_supported",
            response_checksum_validation="when_required" if endpoint_url else "when_supported",
        )
        try:
            session = session or boto3.session.Session()
            self._client = session.client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        except (ValueError, bx.BotoCoreError) as exc:
            raise ConfigError(f"cannot set up S3 access for {self.url}: {exc}") from exc
        self.endpoint: str = self._client.meta.endpoint_url
        self._client.meta.events.register("needs-retry.s3", _log_retry)
        self._direct = DirectBlobIO(self._client, session, bucket,
                                    connect_timeout=connect_timeout, read_timeout=read_timeout)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r})"

    # -- plumbing ---------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._root + key

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._key(key)}" if key is not None else f"s3://{self.bucket}"

    def _error(self, exc: Exception, what: str, key: str | None) -> ImgrepoError:
        """Translate a botocore failure; messages name places, never credentials."""
        where = self._where(key)
        if isinstance(exc, bx.ClientError):
            code, status = _code(exc)
            message = str((exc.response.get("Error") or {}).get("Message") or "")
            label = code or str(status)
            if code == "NoSuchBucket":
                return NoSuchBucket(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}: "
                    "create it, or fix the storage URL / endpoint"
                )
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                return ObjectNotFound(f"{where} does not exist")
            if code in CONFLICT_CODES:
                return _Conflict(f"{where}: a conflicting write was in progress")
            if code == "PreconditionFailed" or status == 412:
                return PreconditionFailed(
                    f"{where} already exists or was changed by another writer"
                )
            if code in ACCESS_CODES or status in (401, 403):
                return StorageAccessDenied(
                    f"S3 at {self.endpoint} refused access to {where} ({label}): the AWS "
                    "credentials are missing, wrong or expired, or lack permission on this bucket"
                )
            if status == 400 and code in ("400", "BadRequest", "") and \
                    getattr(exc, "operation_name", "") in ("HeadObject", "HeadBucket"):
                # A HEAD error has no body, so S3's ExpiredToken arrives as a bare 400:
                # expired (or otherwise unusable) credentials are by far its likeliest cause.
                return StorageAccessDenied(
                    f"S3 at {self.endpoint} refused access to {where} (400 on HEAD): the AWS "
                    "credentials are most likely expired (run `imgrepo-mount --login` if you "
                    "logged in with it) or invalid"
                )
            if code in INTEGRITY_CODES:
                return IntegrityError(f"S3 rejected {where} ({label}): content and checksum differ")
            if status >= 500 or code in THROTTLE_CODES:
                return StorageUnavailable(
                    f"S3 at {self.endpoint} kept failing to {what} {where} "
                    f"({label}{': ' + message if message else ''}) "
                    f"after {self._max_attempts} attempts"
                )
            return StorageError(
                f"cannot {what} {where}: {label}{': ' + message if message else ''}"
            )
        if isinstance(exc, bx.NoCredentialsError):
            return StorageAccessDenied(
                f"no AWS credentials found: to use {self.url}, set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, pick a profile with AWS_PROFILE, "
                "or log in with `imgrepo-mount --login`"
            )
        if isinstance(exc, CREDENTIAL_ERRORS):
            return StorageAccessDenied(f"cannot get AWS credentials for {self.url}: {exc}")
        if isinstance(exc, (bx.ChecksumError, bx.FlexibleChecksumError)):
            return IntegrityError(f"{where}: {exc}")
        if isinstance(exc, NETWORK_ERRORS):
            return StorageUnavailable(f"cannot reach S3 at {self.endpoint} ({where}): {exc}")
        return StorageError(f"cannot {what} {where}: {exc}")

    async def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run one blocking boto3 job in a worker thread, under the shared limiter."""
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except (bx.ClientError, bx.BotoCoreError) as exc:
            raise self._error(exc, what, key) from exc

    async def _conditional(self, what: str, key: str, fn: Callable[[], T]) -> T:
        """`_call` for conditional writes: 409 conflicts are transient, so back off and retry."""
        delay = 0.05
        for attempt in range(self._conflict_retries + 1):
            try:
                return await self._call(what, key, fn)
            except _Conflict:
                log.info("S3 %s: 409 ConditionalRequestConflict (attempt %d), retrying",
                         self._where(key), attempt + 1)
                if attempt == self._conflict_retries:
                    raise PreconditionFailed(
                        f"{self._where(key)}: conditional write kept conflicting with another "
                        "writer (409 ConditionalRequestConflict)"
                    ) from None
            await trio.sleep(delay * (1 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    def _stream_retrying(self, fn: Callable[[], T]) -> T:
        """In a worker thread: retry a request whose response body broke while being read
        (only then: failures of the request itself were retried by botocore already)."""
        for attempt in range(self._stream_retries + 1):
            try:
                return fn()
            except _BodyBroken as broken:
                log.info("S3 response body broke off (attempt %d): %s", attempt + 1,
                         broken.cause)
                if attempt == self._stream_retries:
                    raise broken.cause from None
                time.sleep(min(2.0, 0.05 * 2**attempt) * (1 + random.random()))
        raise AssertionError("unreachable")

    # -- reads ------------------------------------------------------------------------------

    async def check(self) -> None:
        """Fail early, with a clear error, if the bucket is missing or access is refused."""

        def work() -> None:
            self._client.head_bucket(Bucket=self.bucket)

        try:
            await self._call("open", None, work)
        except ObjectNotFound:
            raise NoSuchBucket(
                f"bucket {self.bucket!r} does not exist at {self.endpoint}: "
                "create it, or fix the storage URL / endpoint"
            ) from None

    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject | _NotModified:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if if_none_match is not None:
            args["IfNoneMatch"] = if_none_match

        def once() -> StoredObject | _NotModified:
            try:
                resp = self._client.get_object(**args)
            except bx.ClientError as exc:
                if _code(exc)[1] == 304:
                    return NOT_MODIFIED
                raise
            return StoredObject(data=_read_body(resp["Body"]), etag=resp["ETag"])

        return await self._call("read", key, lambda: self._stream_retrying(once))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if start < 0 or end <= start:
            return b""
        args = {"Bucket": self.bucket, "Key": self._key(key), "Range": f"bytes={start}-{end - 1}"}

        def once() -> bytes:
            try:
                resp = self._client.get_object(**args)
            except bx.ClientError as exc:
                if _code(exc)[1] == 416:  # start at or past the end, as a file read gives b""
                    return b""
                raise
            return _read_body(resp["Body"])

        return await self._call("read", key, lambda: self._stream_retrying(once))

    async def download(
        self, key: str, dest: Path, start: int = 0, on_chunk: Callable[[int], None] | None = None
    ) -> None:
        """One streaming GET from `start`; if the stream breaks, resume from the last byte
        written (pinned to the first response's etag with If-Match)."""
        full = self._key(key)

        def boto3_get(pos: int, etag: str | None) -> tuple[str, Any] | None:
            args = {"Bucket": self.bucket, "Key": full, "Range": f"bytes={pos}-"}
            if etag is not None:
                args["IfMatch"] = etag
            try:
                resp = self._client.get_object(**args)
            except bx.ClientError as exc:
                if _code(exc)[1] != 416:
                    raise
                return None  # nothing at or after `pos` (e.g. an empty object)
            return resp["ETag"], resp["Body"]

        def work(stop: threading.Event) -> None:
            pos = start
            etag: str | None = None
            failures = 0
            fd = -1
            direct = True
            try:
                while not stop.is_set():
                    if direct:
                        try:
                            got = self._direct.get_from(full, pos, etag)
                        except Fallback:
                            direct = False
                            continue
                    else:
                        got = boto3_get(pos, etag)
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
                            except BROKEN_BODY as exc:
                                log.info("S3 download of %s broke off at byte %d, resuming: %s",
                                         self._where(key), pos, exc)
                                failures = 0 if pos > before else failures + 1
                                if failures > self._stream_retries:
                                    if isinstance(exc, STREAM_ERRORS):
                                        raise
                                    raise bx.ConnectionClosedError(
                                        endpoint_url=self.endpoint) from exc
                                time.sleep(min(2.0, 0.05 * 2**failures) * (1 + random.random()))
                                break  # resume from `pos`, pinned to `etag`
                            if not chunk:
                                return
                            view = memoryview(chunk)
                            while view:
                                written = os.pwrite(fd, view, pos)
                                pos += written
                                view = view[written:]
                            if on_chunk is not None:
                                on_chunk(pos)
                    finally:
                        body.close()
            finally:
                if fd >= 0:
                    os.close(fd)

        try:
            await run_stoppable(work, self._limiter)
        except (bx.ClientError, bx.BotoCoreError) as exc:
            raise self._error(exc, "download", key) from exc

    async def head(self, key: str) -> int | None:
        def work() -> int | None:
            try:
                return self._direct.head(self._key(key))
            except Fallback:
                pass
            try:
                resp = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except bx.ClientError as exc:
                if _code(exc)[1] == 404:
                    return None
                raise
            return int(resp["ContentLength"])

        return await self._call("stat", key, work)

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
        resp = await self._conditional("write", key, lambda: self._client.put_object(**args))
        return str(resp["ETag"])

    async def put_file(self, key: str, path: Path, sha256_hex: str) -> bool:
        """Streams from disk: one PUT up to the threshold, multipart above it. Does not HEAD
        first (the caller knows whether that is worth a request)."""
        checksum = _b64(sha256_hex)
        size = await trio.to_thread.run_sync(lambda: os.stat(path).st_size)
        if size <= self._threshold:
            return await self._put_single(key, path, size, checksum, sha256_hex.lower())
        return await self._put_multipart(key, path, size, sha256_hex.lower())

    async def _put_single(self, key: str, path: Path, size: int, checksum: str,
                          sha256_hex: str) -> bool:
        def work() -> bool:
            try:
                return self._direct.put_new(self._key(key), path, size, sha256_hex, checksum)
            except Fallback:
                pass
            with open(path, "rb") as body:
                try:
                    self._client.put_object(
                        Bucket=self.bucket,
                        Key=self._key(key),
                        Body=body,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=checksum,
                        IfNoneMatch="*",
                    )
                except bx.ClientError as exc:
                    if _code(exc)[1] == 412:
                        return False
                    raise
            return True

        return await self._conditional("upload", key, work)

    async def _put_multipart(self, key: str, path: Path, size: int, expected: str) -> bool:
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
                        with _FileSlice(path, offset, length) as body:
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
                        return str(resp["ETag"])

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
                                _hash_range, path, offset, length, whole
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
                    if _code(exc)[1] == 412:
                        return False
                    raise
                return True

            created_now = await self._conditional("upload", key, complete)
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
                if _code(exc)[1] != 404 or _code(exc)[0] == "NoSuchBucket":
                    raise

        await self._call("delete", key, work)

    async def aclose(self) -> None:
        self._direct.close()
        self._client.close()
