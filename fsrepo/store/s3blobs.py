"""The requests every blob needs (HEAD, PUT if new, streaming GET), and the whole-object
GET of a manifest (many per walk, small), behind one interface.

Two transports implement `BlobTransport`: `Boto3Blobs` (boto3's full request pipeline) and
`s3direct.DirectBlobs` (plain keep-alive http.client, half the CPU per request). The store
picks one at construction (`blob_transport`); where the direct path meets something only
botocore handles, `LatchedBlobs` switches the store to boto3 for good, saying so once.
Both raise only `fsrepo.errors` exceptions (a body that breaks mid-read: `BrokenBody`).
All methods block: call them from worker threads. Keys are full keys (with the prefix).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any, Protocol

import botocore.exceptions as bx

from ..retry import Backoff
from .base import BlobSource, FileSlice, too_large
from .s3direct import SAFE_KEY, DirectBlobs, DirectUnsupported
from .s3errors import STREAM_ERRORS, BrokenBody, S3Errors, client_error_status

log = logging.getLogger(__name__)

SAFE_PREFIX = re.compile(r"[A-Za-z0-9/._-]*")  # no escaping needed, so no signing ambiguity
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
              "all_proxy")


class BlobBody(Protocol):
    """A response body being read. `read` raises BrokenBody if the body breaks off."""

    def read(self, size: int) -> bytes: ...

    def close(self) -> None: ...


class BlobTransport(Protocol):
    def head(self, key: str) -> int | None:
        """The object's size, or None if it does not exist."""

    def get_small(self, key: str, if_none_match: str | None, limit: int
                  ) -> tuple[str, bytes] | None:
        """The whole object and its etag; None while it still has the etag `if_none_match`.
        Over `limit` bytes: ObjectTooLarge, left unread."""

    def put_new(self, key: str, path: BlobSource, size: int, sha256_hex: str,
                checksum_b64: str) -> bool:
        """PUT the file at `path` unless the key exists: True if this request created it,
        False if it was there already."""

    def open_from(self, key: str, start: int, if_match: str | None
                  ) -> tuple[str, BlobBody] | None:
        """GET the object from byte `start` on (pinned to etag `if_match`): its etag and
        the body to read, or None if nothing is at or after `start`."""

    def close(self) -> None:
        """Release connections."""


class Boto3Blobs:
    """The blob requests made with boto3."""

    def __init__(self, client: Any, bucket: str, errors: S3Errors) -> None:
        self._client = client
        self._bucket = bucket
        self._errors = errors

    def head(self, key: str) -> int | None:
        try:
            resp = self._client.head_object(Bucket=self._bucket, Key=key)
        except bx.ClientError as exc:
            if client_error_status(exc)[0] == 404:
                return None
            raise self._errors.botocore(exc, "stat", key) from exc
        except bx.BotoCoreError as exc:
            raise self._errors.botocore(exc, "stat", key) from exc
        return int(resp["ContentLength"])

    def get_small(self, key: str, if_none_match: str | None, limit: int
                  ) -> tuple[str, bytes] | None:
        args = {"Bucket": self._bucket, "Key": key}
        if if_none_match is not None:
            args["IfNoneMatch"] = if_none_match
        try:
            resp = self._client.get_object(**args)
        except bx.ClientError as exc:
            if client_error_status(exc)[0] == 304:
                return None
            raise self._errors.botocore(exc, "read", key) from exc
        except bx.BotoCoreError as exc:
            raise self._errors.botocore(exc, "read", key) from exc
        body = Boto3Body(resp["Body"])
        try:
            size = int(resp.get("ContentLength") or 0)
            if size > limit:
                raise too_large(self._errors.where(key), size)
            data = body.read(limit + 1)
        finally:
            body.close()
        if len(data) > limit:  # a server that did not say
            raise too_large(self._errors.where(key), len(data))
        return self._errors.etag_of(resp, "read", key), data

    def put_new(self, key: str, path: BlobSource, size: int, sha256_hex: str,
                checksum_b64: str) -> bool:
        with FileSlice.whole(path) as body:
            try:
                self._client.put_object(Bucket=self._bucket, Key=key, Body=body,
                                        ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum_b64,
                                        IfNoneMatch="*")
            except bx.ClientError as exc:
                if client_error_status(exc)[0] == 412:
                    return False
                raise self._errors.botocore(exc, "upload", key) from exc
            except bx.BotoCoreError as exc:
                raise self._errors.botocore(exc, "upload", key) from exc
        return True

    def open_from(self, key: str, start: int, if_match: str | None
                  ) -> tuple[str, BlobBody] | None:
        args = {"Bucket": self._bucket, "Key": key, "Range": f"bytes={start}-"}
        if if_match is not None:
            args["IfMatch"] = if_match
        try:
            resp = self._client.get_object(**args)
        except bx.ClientError as exc:
            if client_error_status(exc)[0] == 416:
                return None  # nothing at or after `start` (e.g. an empty object)
            raise self._errors.botocore(exc, "download", key) from exc
        except bx.BotoCoreError as exc:
            raise self._errors.botocore(exc, "download", key) from exc
        etag = self._errors.etag_of(resp, "download", key)
        return etag, Boto3Body(resp["Body"])

    def close(self) -> None:
        """The client is the store's: nothing of our own to release."""


class Boto3Body:
    """botocore's StreamingBody, with a break off mid-read as BrokenBody."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, size: int) -> bytes:
        try:
            return bytes(self._body.read(size))
        except STREAM_ERRORS as exc:
            raise BrokenBody(f"the response body broke off: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._body.close()


class LatchedBlobs:
    """The direct path until it meets something only botocore handles (a redirect without a
    region, a server that ignores ranges or sends no etag): from then on boto3, for every
    blob of this store, decided once (under a lock: many threads may meet it at once)."""

    def __init__(self, direct: DirectBlobs, fallback: Boto3Blobs) -> None:
        self._direct = direct
        self._fallback = fallback
        self._latched = False
        self._lock = threading.Lock()  # blob requests run in many worker threads

    @property
    def serving(self) -> BlobTransport:
        """The transport requests go to now."""
        return self._fallback if self._latched else self._direct

    def _latch(self, why: DirectUnsupported) -> None:
        with self._lock:
            first, self._latched = not self._latched, True
        if first:
            log.info("S3 blob requests go through boto3 from now on: %s", why)

    def head(self, key: str) -> int | None:
        if not self._latched:
            try:
                return self._direct.head(key)
            except DirectUnsupported as why:
                self._latch(why)
        return self._fallback.head(key)

    def get_small(self, key: str, if_none_match: str | None, limit: int
                  ) -> tuple[str, bytes] | None:
        # A key that needs escaping (a snapshot's name may hold ":" or "+") is the key's
        # trait, not the server's: that one goes to boto3, the store stays on the direct path.
        if not self._latched and SAFE_KEY.fullmatch(key):
            try:
                return self._direct.get_small(key, if_none_match, limit)
            except DirectUnsupported as why:
                self._latch(why)
        return self._fallback.get_small(key, if_none_match, limit)

    def put_new(self, key: str, path: BlobSource, size: int, sha256_hex: str,
                checksum_b64: str) -> bool:
        if not self._latched:
            try:
                return self._direct.put_new(key, path, size, sha256_hex, checksum_b64)
            except DirectUnsupported as why:
                self._latch(why)
        return self._fallback.put_new(key, path, size, sha256_hex, checksum_b64)

    def open_from(self, key: str, start: int, if_match: str | None
                  ) -> tuple[str, BlobBody] | None:
        if not self._latched:
            try:
                return self._direct.open_from(key, start, if_match)
            except DirectUnsupported as why:
                self._latch(why)
        return self._fallback.open_from(key, start, if_match)

    def close(self) -> None:
        self._direct.close()
        self._fallback.close()


def blob_transport(client: Any, session: Any, bucket: str, prefix: str, errors: S3Errors, *,
                   policy: Backoff, connect_timeout: float, read_timeout: float,
                   pool_size: int = 32) -> BlobTransport:
    """The direct path where it can serve this store (no proxy, no client certificate, a
    region to sign for, a prefix that needs no escaping), else boto3."""
    boto3_blobs = Boto3Blobs(client, bucket, errors)
    config = client.meta.config
    if (any(os.environ.get(v) for v in PROXY_VARS)
            or getattr(config, "proxies", None) or getattr(config, "client_cert", None)
            or not client.meta.region_name or not SAFE_PREFIX.fullmatch(prefix)):
        return boto3_blobs
    direct = DirectBlobs(client, session, bucket, errors, policy=policy,
                         connect_timeout=connect_timeout, read_timeout=read_timeout,
                         pool_size=pool_size)
    return LatchedBlobs(direct, boto3_blobs)
