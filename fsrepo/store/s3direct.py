"""HEAD, PUT and GET of blobs, and GET of small objects, without boto3's request pipeline.

A boto3 call costs ~0.8 ms (HEAD) to ~1.3 ms (PUT) of CPU before a byte moves: parameter
handling, endpoint rules, event hooks, response parsing. For a 200 KiB photo that is more
than everything else its upload costs, and the mount's uploads share the CPU (and the GIL)
with the file system. So the requests every blob needs - HEAD (does the bucket have it?),
PUT, and the streaming GET of a download - go over plain keep-alive `http.client`
connections here (as S3QL does), and so does the whole-object GET of a manifest (plain or
conditional, 304: a cold walk makes one per folder, ~10,000 at 1M files), while boto3 keeps
doing everything else (lists, writes of manifests, multipart uploads, deletes). What stays botocore's: the credentials (the client's own
provider, refreshed as usual), the region, the bucket's URL (resolved once, by presigning)
and the SigV4 signature. The payload is signed with the blob's SHA-256, which is its name, so
the signature covers the body at no extra hashing cost.

Where real servers differ from the happy path it does what botocore and urllib3 do: a region
error (301/400 with `x-amz-bucket-region`, also on a body-less HEAD) is followed and
remembered; an idle keep-alive connection is checked before reuse; a connection cut without
TLS's close (SSLEOFError) is a dropped connection, retried; 429 and SlowDown are retried
behind a pause all the store's blob requests share (`SharedThrottle`, the direct path's
counterpart of botocore's adaptive limiter); a large PUT waits for `100 Continue`, so an
early refusal (412: the blob is there already) costs no upload.

`s3blobs.blob_transport` uses this path only where it can work (no proxy, no client
certificate, a prefix that needs no escaping). What it still cannot handle - a redirect
without a region, a key that needs escaping, a server that ignores ranges - raises
`DirectUnsupported`, and `LatchedBlobs` hands the store to boto3 for good. Failures are
raised as `fsrepo.errors` exceptions, worded by the same `S3Errors` as boto3's.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import select
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import botocore.exceptions as bx
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from ..retry import Backoff, SharedThrottle
from .base import BlobSource, FileSlice, too_large
from .s3errors import THROTTLE_CODES, BrokenBody, S3Errors, note_retry

log = logging.getLogger(__name__)

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SAFE_KEY = re.compile(r"[A-Za-z0-9/._-]+")  # no escaping needed, so no signing ambiguity
RETRY_STATUS = frozenset({500, 502, 503, 504})
SEND_BLOCK = 256 * 1024
EXPECT_ABOVE = 1 << 20  # bodies this large wait for "100 Continue" before they are sent
CONTINUE_WAIT = 1.0  # seconds to wait for it (then the body goes anyway, as curl does)
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
                 policy: Backoff, connect_timeout: float, read_timeout: float,
                 pool_size: int = 32) -> None:
        self._client = client
        self._session = session
        self._bucket = bucket
        self._errors = errors
        self._policy = policy
        self._throttle = SharedThrottle(policy)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._lock = threading.Lock()  # the pool
        self._idle: list[tuple[str, http.client.HTTPConnection]] = []  # (origin, connection)
        self._pool_size = pool_size  # idle connections kept: as many as requests in flight
        self._where_lock = threading.Lock()  # the endpoint and the region, settled together
        self._region: str = client.meta.region_name
        self._endpoint: _Endpoint | None = None
        self.tls: ssl.SSLContext | None = None

    # -- where requests go ----------------------------------------------------------------
    def _resolve(self) -> tuple[_Endpoint, str]:
        """The bucket's URL as botocore resolves it (virtual host or path style, custom
        endpoint, region), taken once from a presigned URL (which needs credentials, so it
        is made at the first request, not at construction), and the region to sign for."""
        with self._where_lock:
            if self._endpoint is None:
                self._endpoint = self._endpoint_of(self._client)
            return self._endpoint, self._region

    def _endpoint_of(self, client: Any) -> _Endpoint:
        try:
            url = client.generate_presigned_url(
                "head_object", Params={"Bucket": self._bucket, "Key": "k"}, ExpiresIn=60)
        except bx.NoCredentialsError:
            raise self._errors.no_credentials() from None
        except (bx.BotoCoreError, bx.ClientError) as exc:
            raise DirectUnsupported(f"cannot presign a URL: {exc}") from None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.path.endswith("/k"):
            raise DirectUnsupported(f"unexpected URL shape {parts.scheme}://{parts.netloc}")
        if parts.scheme == "https" and self.tls is None:
            self.tls = ssl.create_default_context(cafile=self._ca_bundle())
        default_port = parts.port in (None, 80 if parts.scheme == "http" else 443)
        return _Endpoint(
            scheme=parts.scheme, hostname=parts.hostname or "", port=parts.port,
            # the Host header as signed: no port when it is the scheme's default
            host=(parts.hostname or "") if default_port else parts.netloc,
            origin=f"{parts.scheme}://{parts.netloc}", path=parts.path[:-2])

    def _follow_region(self, region: str, wrong: str) -> None:
        """The bucket lives in `region`, not in `wrong` (the one just signed for): sign for
        it from now on, at the URL botocore gives for it (AWS's regional host; a custom
        endpoint stays), as botocore's own redirector does, and remember it."""
        with self._where_lock:
            if self._region != wrong:
                return  # another thread followed it already
            custom = self._client.meta.endpoint_url
            host = urlsplit(custom).hostname or ""
            aws = host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
            presigner = self._session.client(
                "s3", region_name=region, endpoint_url=None if aws else custom,
                config=self._client.meta.config)
            try:
                self._endpoint = self._endpoint_of(presigner)
            finally:
                presigner.close()
            self._region = region
        log.info("s3://%s is in region %s (not %s): its blob requests are signed for it from "
                 "now on", self._bucket, region, wrong)

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
        """An idle connection to `ep` that is still open (as urllib3 checks before reuse:
        a server that closes idle connections would cost a failed try), or a new one."""
        while True:
            with self._lock:
                found = next((i for i, (origin, _) in enumerate(self._idle)
                              if origin == ep.origin), None)
                conn = self._idle.pop(found)[1] if found is not None else None
            if conn is None:
                break
            if _still_open(conn):
                return conn
            conn.close()
        if ep.scheme == "https":
            return http.client.HTTPSConnection(ep.hostname, ep.port,
                                               timeout=self._connect_timeout,
                                               context=self.tls, blocksize=SEND_BLOCK)
        return http.client.HTTPConnection(ep.hostname, ep.port, timeout=self._connect_timeout,
                                          blocksize=SEND_BLOCK)

    def _release(self, conn: http.client.HTTPConnection, origin: str, reusable: bool) -> None:
        if reusable and conn.sock is not None:
            with self._lock:
                if len(self._idle) < self._pool_size:
                    self._idle.append((origin, conn))
                    return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()

    # -- one request ----------------------------------------------------------------------
    def _request(self, method: str, key: str, payload_sha256: str,
                 headers: dict[str, str], body: Callable[[], Any] | None = None,
                 operation: str = "", stream_ok: frozenset[int] = frozenset(),
                 ) -> tuple[int, http.client.HTTPMessage, bytes | DirectBody]:
        """One signed request, retried (REQUEST policy) on 5xx, throttling and connection
        failures; a region error is followed once. A response whose status is in
        `stream_ok` comes back unread, as a DirectBody."""
        if not SAFE_KEY.fullmatch(key):
            raise DirectUnsupported(f"the key {key!r} needs escaping")
        attempt = 0
        followed = False
        while True:
            attempt += 1
            ep, region = self._resolve()
            target = f"{ep.path}/{key}"
            url = ep.origin + target
            pause = self._throttle.pause()
            if pause:
                time.sleep(pause)
            credentials = self._session.get_credentials()
            if credentials is None:
                raise self._errors.no_credentials()
            request = AWSRequest(method=method, url=url, headers={**headers, "Host": ep.host})
            _KnownPayload(credentials.get_frozen_credentials(), region,
                          payload_sha256).add_auth(request)
            stream = body() if body is not None else None  # (a missing file: not a retry)
            conn = self._connection(ep)
            reusable = False
            try:
                resp = self._exchange(conn, method, target, dict(request.headers.items()),
                                      stream)
                if resp.status in stream_ok:
                    self._throttle.succeeded()
                    return resp.status, resp.headers, DirectBody(self, conn, ep.origin, resp)
                data = resp.read()
                reusable = not resp.will_close and not getattr(resp, "body_unsent", False)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if isinstance(exc, ssl.SSLError) and _fatal_tls(exc):
                    raise self._errors.unreachable(
                        key, f"SSL validation failed for {ep.origin} {exc}") from None
                # a dropped connection (also one cut without TLS's close: SSLEOFError)
                what = f"{type(exc).__name__}: {exc}"
                note_retry(operation, url, attempt, what)
                if self._policy.gives_up(attempt):
                    raise self._errors.unreachable(key, what) from None
                time.sleep(self._policy.delay(attempt))
                continue
            finally:
                if stream is not None:
                    stream.close()
            self._release(conn, ep.origin, reusable)
            status = resp.status
            code = _error_fields(data)[0]
            bucket_region = resp.headers.get("x-amz-bucket-region")
            if status in (301, 307, 400) and bucket_region and bucket_region != region:
                if followed:
                    raise DirectUnsupported(f"{status}: the bucket moved again, to "
                                            f"{bucket_region}")
                followed = True
                attempt -= 1  # not a failure: the same try, signed for the right region
                self._follow_region(bucket_region, region)
                continue
            if status == 429 or code in THROTTLE_CODES:
                delay = self._throttle.throttled()
                note_retry(operation, url, attempt, f"{status} {code or 'throttled'}: "
                           f"all blob requests wait {delay:.2f}s")
                if not self._policy.gives_up(attempt):
                    continue  # after the shared pause, at the top of the loop
            else:
                self._throttle.succeeded()  # an answer that was not "slow down"
            if status in RETRY_STATUS and code not in THROTTLE_CODES:
                note_retry(operation, url, attempt, f"{status} {code}")
                if not self._policy.gives_up(attempt):
                    time.sleep(self._policy.delay(attempt))
                    continue
            if (300 <= status < 400 and status != 304) or (status == 400 and b"Region" in data):
                raise DirectUnsupported(f"{status} from the direct path")
            return status, resp.headers, data

    def _exchange(self, conn: http.client.HTTPConnection, method: str, target: str,
                  headers: dict[str, str], stream: Any) -> http.client.HTTPResponse:
        """Send the request and read the response's head. A large body waits for the
        server's `100 Continue` (`Expect: 100-continue`, sent with the headers): a refusal
        (412: the blob is there already, 403, a region error) comes before a byte of it
        was sent. A server that says nothing within CONTINUE_WAIT gets the body anyway."""
        size = int(headers.get("Content-Length") or 0)
        if stream is None or size < EXPECT_ABOVE:
            conn.request(method, target, body=stream, headers=headers)
            if conn.sock is not None:  # connected (within the connect timeout): now reads
                conn.sock.settimeout(self._read_timeout)
            return conn.getresponse()
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in {**headers, "Expect": "100-continue"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        early = _early_answer(conn, method)
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout)
        if early is not None:
            return early
        conn.send(stream)
        return conn.getresponse()

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

    def get_small(self, key: str, if_none_match: str | None, limit: int
                  ) -> tuple[str, bytes] | None:
        """The whole object (a manifest) and its etag; None while it still has the etag
        `if_none_match` (304). Over `limit` bytes: refused, left unread. A body cut short
        raises BrokenBody (the store reads it again)."""
        headers = {} if if_none_match is None else {"If-None-Match": if_none_match}
        status, resp_headers, body = self._request("GET", key, EMPTY_SHA256, headers,
                                                   operation="GetObject",
                                                   stream_ok=frozenset({200}))
        if status == 304:
            return None
        if not isinstance(body, DirectBody):
            raise self._failed(status, body, "GetObject", "read", key)
        try:
            length = resp_headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise too_large(self._errors.where(key), int(length))
            etag = self._errors.etag_of({"ETag": resp_headers.get("ETag")}, "read", key)
            chunks: list[bytes] = []
            size = 0
            while chunk := body.read(limit + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:  # a server that did not say
                    raise too_large(self._errors.where(key), size)
            return etag, b"".join(chunks)
        finally:
            body.close()

    def put_new(self, key: str, path: BlobSource, size: int, sha256_hex: str,
                checksum_b64: str) -> bool:
        """PUT the file at `path` (`size` bytes, SHA-256 `sha256_hex`) unless the key
        exists: True if this request created it, False if it was there already (412)."""
        headers = {"Content-Length": str(size), "If-None-Match": "*",
                   "x-amz-checksum-sha256": checksum_b64,
                   "x-amz-sdk-checksum-algorithm": "SHA256",
                   "Content-Type": "application/octet-stream"}
        status, _headers, data = self._request(
            "PUT", key, sha256_hex, headers, body=lambda: FileSlice.whole(path),
            operation="PutObject")
        if status == 200:
            return True
        if status == 412:
            return False
        raise self._failed(status, data, "PutObject", "upload", key)  # type: ignore[arg-type]


class DirectBody:
    """A response body being read; its connection goes back to the pool only if the body
    was read to its end."""

    def __init__(self, owner: DirectBlobs, conn: http.client.HTTPConnection, origin: str,
                 resp: http.client.HTTPResponse) -> None:
        self._owner = owner
        self._conn: http.client.HTTPConnection | None = conn
        self._origin = origin
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
            self._owner._release(conn, self._origin, self._complete and not self._resp.will_close)


def _error_fields(data: bytes) -> tuple[str, str]:
    fields = {m.group(1): m.group(2) for m in _XML_FIELD.finditer(data[:4096])}
    return (fields.get(b"Code", b"").decode("utf-8", "replace"),
            fields.get(b"Message", b"").decode("utf-8", "replace"))


def _fatal_tls(exc: ssl.SSLError) -> bool:
    """A TLS failure retrying cannot fix (a certificate refused, no common protocol), as
    opposed to a connection cut without TLS's close (SSLEOFError, SSLZeroReturnError), which
    is a dropped connection like any other."""
    return not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive connection can take a request: nothing to read on it
    (an idle connection that is readable was closed by the server, or holds garbage)."""
    sock = conn.sock
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)


class _EarlyResponse(http.client.HTTPResponse):
    """A final answer that came instead of `100 Continue`: its status line was read already
    (to tell the two apart), the rest is parsed as usual, from the same buffered reader."""

    body_unsent = True  # the server may still expect the body: not reusable

    def __init__(self, sock: Any, method: str, fp: Any, status_line: tuple[str, int, str]
                 ) -> None:
        super().__init__(sock, method=method)
        self.fp.close()
        self.fp = fp
        self._status_line: tuple[str, int, str] | None = status_line

    def _read_status(self) -> tuple[str, int, str]:  # type: ignore[override]
        if self._status_line is not None:
            line, self._status_line = self._status_line, None
            return line
        return super()._read_status()  # type: ignore[misc]


def _early_answer(conn: http.client.HTTPConnection, method: str
                  ) -> http.client.HTTPResponse | None:
    """After headers with `Expect: 100-continue`: None when the body should go now (the
    server said 100 Continue, or nothing within CONTINUE_WAIT), else the server's final
    answer (the body was not sent)."""
    sock = conn.sock
    assert sock is not None
    sock.settimeout(CONTINUE_WAIT)
    fp = sock.makefile("rb")
    probe = http.client.HTTPResponse(sock, method=method)
    probe.fp.close()
    probe.fp = fp
    try:
        status_line = probe._read_status()  # type: ignore[attr-defined]
    except TimeoutError:
        fp.close()  # nothing came (a server that does not know Expect): send the body
        return None
    finally:
        probe.fp = None  # (closing the probe, as its collection does, would close `fp`)
    if status_line[1] == http.client.CONTINUE:
        while fp.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # the interim answer's headers
        fp.close()
        return None
    response = _EarlyResponse(sock, method, fp, status_line)
    response.begin()
    return response
