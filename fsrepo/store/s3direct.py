"""HEAD, PUT and GET of blobs without boto3's request pipeline.

A boto3 call costs ~0.8 ms (HEAD) to ~1.3 ms (PUT) of CPU before a byte moves: parameter
handling, endpoint rules, event hooks, response parsing. For a 200 KiB photo that is more
than everything else its upload costs, and the mount's uploads share the CPU (and the GIL)
with the file system. So the requests every blob needs - HEAD (does the bucket have it?),
PUT, and the streaming GET of a download - go over plain keep-alive `http.client`
connections here (as S3QL does), while boto3 keeps doing everything else (manifests,
lists, multipart uploads, deletes). What stays botocore's: the credentials (the client's own
provider, refreshed as usual), the region, the bucket's URL (resolved once, by presigning)
and the SigV4 signature. The payload is signed with the blob's SHA-256, which is its name, so
the signature covers the body at no extra hashing cost.

`s3blobs.blob_transport` uses this path only where it can work (no proxy, no client
certificate, a prefix that needs no escaping). What it still cannot handle - a redirect, a
region error, a key that needs escaping - raises `DirectUnsupported`, and `LatchedBlobs`
hands the store to boto3 for good. Failures are raised as `fsrepo.errors` exceptions, worded
by the same `S3Errors` as boto3's.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions as bx
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from ..retry import Backoff
from .s3errors import BrokenBody, S3Errors, note_retry

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SAFE_KEY = re.compile(r"[A-Za-z0-9/._-]+")  # no escaping needed, so no signing ambiguity
RETRY_STATUS = frozenset({500, 502, 503, 504})
SEND_BLOCK = 256 * 1024
_XML_FIELD = re.compile(rb"<(Code|Message)>([^<]*)</\1>")


@dataclass(frozen=True)
class _Endpoint:
    scheme: str
    hostname: str
    port: int | None
    host: str  # the Host header, as signed
    origin: str  # scheme://host[:port]
    path: str  # the bucket's path prefix ("" with virtual-host addressing)


class DirectUnsupported(Exception):
    """Something only botocore handles: the store's blob requests go to boto3 from now on."""


class _KnownPayload(S3SigV4Auth):
    """botocore's S3 SigV4 signer, told the payload's SHA-256 instead of computing it."""

    def __init__(self, credentials: Any, region: str, payload_sha256: str) -> None:
        super().__init__(credentials, "s3", region)
        self._payload_sha256 = payload_sha256

    def payload(self, request: Any) -> str:
        return self._payload_sha256


class DirectBlobs:
    """The blob requests (a `BlobTransport`) over a pool of keep-alive connections."""

    def __init__(self, client: Any, session: Any, bucket: str, errors: S3Errors, *,
                 policy: Backoff, connect_timeout: float, read_timeout: float) -> None:
        self._client = client
        self._session = session
        self._bucket = bucket
        self._errors = errors
        self._policy = policy
        self._region: str = client.meta.region_name
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self._endpoint: _Endpoint | None = None
        self.tls: ssl.SSLContext | None = None

    # -- where requests go ----------------------------------------------------------------
    def _resolve(self) -> _Endpoint:
        """The bucket's URL as botocore resolves it (virtual host or path style, custom
        endpoint, region), taken once from a presigned URL (which needs credentials, so it
        is made at the first request, not at construction)."""
        if self._endpoint is None:
            try:
                url = self._client.generate_presigned_url(
                    "head_object", Params={"Bucket": self._bucket, "Key": "k"}, ExpiresIn=60)
            except bx.NoCredentialsError:
                raise self._errors.no_credentials() from None
            except (bx.BotoCoreError, bx.ClientError) as exc:
                raise DirectUnsupported(f"cannot presign a URL: {exc}") from None
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.path.endswith("/k"):
                raise DirectUnsupported(f"unexpected URL shape {parts.scheme}://{parts.netloc}")
            if parts.scheme == "https":
                self.tls = ssl.create_default_context(cafile=self._ca_bundle())
            default_port = parts.port in (None, 80 if parts.scheme == "http" else 443)
            self._endpoint = _Endpoint(
                scheme=parts.scheme, hostname=parts.hostname or "", port=parts.port,
                # the Host header as signed: no port when it is the scheme's default
                host=(parts.hostname or "") if default_port else parts.netloc,
                origin=f"{parts.scheme}://{parts.netloc}", path=parts.path[:-2])
        return self._endpoint

    def _ca_bundle(self) -> str | None:
        bundle = os.environ.get("AWS_CA_BUNDLE")
        if not bundle:
            try:
                bundle = self._session._session.get_config_variable("ca_bundle")
            except Exception:  # noqa: BLE001 - no such setting: botocore's default below
                bundle = None
        if not bundle:
            from botocore.httpsession import get_cert_path
            bundle = get_cert_path(True)
        return bundle if isinstance(bundle, str) else None

    def _connection(self, ep: _Endpoint) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if ep.scheme == "https":
            return http.client.HTTPSConnection(ep.hostname, ep.port,
                                               timeout=self._connect_timeout,
                                               context=self.tls, blocksize=SEND_BLOCK)
        return http.client.HTTPConnection(ep.hostname, ep.port, timeout=self._connect_timeout,
                                          blocksize=SEND_BLOCK)

    def _release(self, conn: http.client.HTTPConnection, reusable: bool) -> None:
        if reusable:
            with self._lock:
                if len(self._idle) < 32:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- one request ----------------------------------------------------------------------
    def _request(self, method: str, key: str, payload_sha256: str,
                 headers: dict[str, str], body: Callable[[], Any] | None = None,
                 operation: str = "", stream_ok: frozenset[int] = frozenset(),
                 ) -> tuple[int, http.client.HTTPMessage, bytes | DirectBody]:
        """One signed request, retried (REQUEST policy) on 5xx and connection failures. A
        response whose status is in `stream_ok` comes back unread, as a DirectBody."""
        if not SAFE_KEY.fullmatch(key):
            raise DirectUnsupported(f"the key {key!r} needs escaping")
        ep = self._resolve()
        target = f"{ep.path}/{key}"
        url = ep.origin + target
        attempt = 0
        while True:
            attempt += 1
            credentials = self._session.get_credentials()
            if credentials is None:
                raise self._errors.no_credentials()
            request = AWSRequest(method=method, url=url, headers={**headers, "Host": ep.host})
            _KnownPayload(credentials.get_frozen_credentials(), self._region,
                          payload_sha256).add_auth(request)
            stream = body() if body is not None else None  # (a missing file: not a retry)
            conn = self._connection(ep)
            reusable = False
            try:
                conn.request(method, target, body=stream, headers=dict(request.headers.items()))
                if conn.sock is not None:  # connected (within the connect timeout): now reads
                    conn.sock.settimeout(self._read_timeout)
                resp = conn.getresponse()
                if resp.status in stream_ok:
                    return resp.status, resp.headers, DirectBody(self, conn, resp)
                data = resp.read()
                reusable = not resp.will_close
            except ssl.SSLError as exc:  # a certificate refused: retrying cannot help
                conn.close()
                raise self._errors.unreachable(
                    key, f"SSL validation failed for {ep.origin} {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                what = f"{type(exc).__name__}: {exc}"
                note_retry(operation, url, attempt, what)
                if self._policy.gives_up(attempt):
                    raise self._errors.unreachable(key, what) from None
                time.sleep(self._policy.delay(attempt))
                continue
            finally:
                if stream is not None:
                    stream.close()
            self._release(conn, reusable)
            status = resp.status
            if status in RETRY_STATUS:
                note_retry(operation, url, attempt, f"{status} {_error_fields(data)[0]}")
                if not self._policy.gives_up(attempt):
                    time.sleep(self._policy.delay(attempt))
                    continue
            if 300 <= status < 400 or (status == 400 and b"Region" in data):
                raise DirectUnsupported(f"{status} from the direct path")
            return status, resp.headers, data

    def _failed(self, status: int, data: bytes, operation: str, what: str,
                key: str) -> Exception:
        """An error answer in fsrepo.errors' words (a body-less error's code is its status,
        as botocore makes it)."""
        code, message = _error_fields(data)
        return self._errors.response(status, code or str(status), message, operation, what,
                                     key)

    # -- the three requests -----------------------------------------------------------------
    def head(self, key: str) -> int | None:
        """The object's size, or None if it does not exist."""
        status, headers, data = self._request("HEAD", key, EMPTY_SHA256, {},
                                              operation="HeadObject")
        if status == 404:
            return None
        if status != 200:
            raise self._failed(status, data, "HeadObject", "stat", key)  # type: ignore[arg-type]
        length = headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise DirectUnsupported("HEAD without a Content-Length")
        return int(length)

    def open_from(self, key: str, start: int, if_match: str | None
                  ) -> tuple[str, DirectBody] | None:
        """GET the object from byte `start` on (pinned to etag `if_match`): its etag and
        the body to read, or None if nothing is at or after `start` (416)."""
        headers = {"Range": f"bytes={start}-"}
        if if_match is not None:
            headers["If-Match"] = if_match
        status, resp_headers, body = self._request("GET", key, EMPTY_SHA256, headers,
                                                   operation="GetObject",
                                                   stream_ok=frozenset({200, 206}))
        if isinstance(body, DirectBody):
            etag = resp_headers.get("ETag")
            if status == 200 and start > 0 or not etag:  # a server that ignored the Range
                body.close()
                raise DirectUnsupported("GET answered without the range or an etag")
            return etag, body
        if status == 416:
            return None
        raise self._failed(status, body, "GetObject", "download", key)

    def put_new(self, key: str, path: Path, size: int, sha256_hex: str,
                checksum_b64: str) -> bool:
        """PUT the file at `path` (`size` bytes, SHA-256 `sha256_hex`) unless the key
        exists: True if this request created it, False if it was there already (412)."""
        headers = {"Content-Length": str(size), "If-None-Match": "*",
                   "x-amz-checksum-sha256": checksum_b64,
                   "x-amz-sdk-checksum-algorithm": "SHA256",
                   "Content-Type": "application/octet-stream"}
        status, _headers, data = self._request(
            "PUT", key, sha256_hex, headers, body=lambda: open(path, "rb"),
            operation="PutObject")
        if status == 200:
            return True
        if status == 412:
            return False
        raise self._failed(status, data, "PutObject", "upload", key)  # type: ignore[arg-type]


class DirectBody:
    """A response body being read; its connection goes back to the pool only if the body
    was read to its end."""

    def __init__(self, owner: DirectBlobs, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse) -> None:
        self._owner = owner
        self._conn: http.client.HTTPConnection | None = conn
        self._resp = resp
        self._complete = False

    def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" at the end. A body cut short raises BrokenBody
        (http.client itself would just return b"" early)."""
        try:
            data = self._resp.read(size)
        except (OSError, http.client.HTTPException) as exc:
            raise BrokenBody(f"the response body broke off: {type(exc).__name__}: {exc}") from exc
        if not data:
            if self._resp.length:  # bytes announced but never sent
                raise BrokenBody(f"the response body broke off {self._resp.length} bytes early")
            self._complete = True
        return data

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._owner._release(conn, self._complete and not self._resp.will_close)


def _error_fields(data: bytes) -> tuple[str, str]:
    fields = {m.group(1): m.group(2) for m in _XML_FIELD.finditer(data[:4096])}
    return (fields.get(b"Code", b"").decode("utf-8", "replace"),
            fields.get(b"Message", b"").decode("utf-8", "replace"))
