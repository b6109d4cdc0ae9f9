"""A small reverse HTTP proxy for tests: counts requests and injects faults.

Put it between the code under test and an S3 server (moto) on 127.0.0.1:

    with S3Proxy(moto.url) as proxy:
        store = S3Store(bucket, endpoint_url=proxy.url)
        proxy.inject(method="PUT", status=503, times=2)       # 503 SlowDown, twice
        proxy.inject(method="PUT", status=409)                # ConditionalRequestConflict
        proxy.inject(method="GET", drop="midway")             # body cut off half way
        proxy.inject(path=r"/dirs/", delay=1.5, times=None)   # slow, forever
        proxy.pause(); ...; proxy.resume()                    # outage: connections refused
        S3Proxy(moto.url, strip_conditions=True)              # a server ignoring If-Match
        S3Proxy(moto.url, region="eu-west-1")                 # the bucket is elsewhere
        S3Proxy(moto.url, idle_timeout=0.2)                   # idle connections closed
        S3Proxy(moto.url, drop_headers=("etag",))             # a server without ETags
        proxy.inject(method="PUT", status=429, times=2)       # throttled
        proxy.count("PUT"); proxy.count("PUT", path=r"/blobs/"); proxy.requests

Faults are matched in the order they were added; each has a budget (`times`, None for
unlimited). Requests are recorded after the fault decision, with the status the client saw
(None when the connection was dropped). `pause()` keeps the upstream's data (unlike stopping
moto, which loses everything), so it is the way to simulate a network outage.

Runs in threads of the test process (one per client connection), so a mount running as a
subprocess can use it too.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
DEFAULT_CODES = {
    400: "BadRequest",
    403: "AccessDenied",
    404: "NoSuchKey",
    409: "ConditionalRequestConflict",
    429: "SlowDown",
    412: "PreconditionFailed",
    500: "InternalError",
    503: "SlowDown",
}
DROP_MODES = ("before", "after", "midway")


@dataclass
class Fault:
    """What to do to matching requests. Match fields are ANDed; None matches anything."""

    method: str | None = None  # "PUT", "GET", ...
    path: str | None = None  # regex searched in the URL path (bucket and key)
    query: str | None = None  # substring of the raw query string, e.g. "uploadId", "list-type"
    times: int | None = 1  # budget of matching requests; None: unlimited
    status: int | None = None  # answer with this status and an S3 error body, no forwarding
    code: str | None = None  # S3 error code for `status` (default from DEFAULT_CODES)
    delay: float = 0.0  # seconds to wait before doing anything else
    drop: str | None = None  # "before" forwarding, "after" forwarding, or "midway" in the body
    headers: dict[str, str] | None = None  # extra headers of a `status` answer
    hits: int = 0  # how many requests this fault has hit so far

    def __post_init__(self) -> None:
        if self.drop is not None and self.drop not in DROP_MODES:
            raise ValueError(f"drop must be one of {DROP_MODES}")

    def matches(self, method: str, path: str, query: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if self.path is not None and not re.search(self.path, path):
            return False
        return self.query is None or self.query in query


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it."""

    method: str
    path: str
    query: str
    status: int | None  # what the client got; None if the connection was dropped
    fault: bool = False  # whether an injected fault decided the outcome
    at: float = field(default_factory=time.monotonic)
    headers: dict[str, str] = field(default_factory=dict, compare=False)  # lower-cased
    body_size: int = 0  # request body bytes received (0 for an answer before the body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: S3Proxy

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up (or connections we reset on purpose) are not news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass

    def _seen_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()}

    _early: Fault | None = None  # a fault answered before the body (Expect: 100-continue)

    def setup(self) -> None:
        self.timeout = self.server.proxy.idle_timeout
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stall between headers and body
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, False)
            if self._upstream is not None:
                self._upstream.close()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # the client went away mid-body: S3 keeps nothing of it
            raise ConnectionError(f"request body cut at {len(body)} of {length} bytes")
        return body

    def log_error(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        if format.startswith("Request timed out"):  # S3Proxy(idle_timeout=...) closed one
            self.server.proxy._idle_closed()

    def handle_expect_100(self) -> bool:
        """An error answer can be given before the body is sent (as S3 does): the client
        is told so instead of "100 Continue"."""
        split = urlsplit(self.path)
        fault = self.server.proxy._take_fault(self.command, split.path, split.query)
        if fault is not None and fault.status is not None and fault.drop is None:
            self._early = fault
            return True
        self._early = None
        if fault is not None:
            self._early = fault  # taken: applied as usual, after the body
        return super().handle_expect_100()

    def _region_error(self) -> Fault | None:
        """With S3Proxy(region=...): a request signed for another region is answered as S3
        answers it, with the bucket's region in x-amz-bucket-region (a HEAD has no body)."""
        want = self.server.proxy.region
        scope = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/s3/",
                          self.headers.get("Authorization", ""))
        if want is None or scope is None or scope.group(1) == want:
            return None
        return Fault(status=400, code="AuthorizationHeaderMalformed",
                     headers={"x-amz-bucket-region": want})

    def _drop(self) -> None:
        """Reset the client connection without an answer."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _handle(self) -> None:
        proxy = self.server.proxy
        split = urlsplit(self.path)
        method, path, query = self.command, split.path, split.query
        expecting = self.headers.get("Expect", "").lower() == "100-continue"
        early, self._early = self._early, None
        fault = self._region_error()
        if fault is None and expecting:
            fault = early
        before_body = fault is not None and fault.status is not None and expecting
        if before_body:  # the client waits for our answer before it sends the body
            body = b""
            self.close_connection = True
        else:
            try:
                body = self._read_body()
            except ConnectionError:  # nothing forwarded, as a server drops a cut request
                self.close_connection = True
                return
        if fault is None and not expecting:
            fault = proxy._take_fault(method, path, query)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and (fault.drop == "before" or fault.status is not None):
            if fault.drop == "before":
                proxy._record(Seen(method, path, query, None, True, headers=self._seen_headers()))
                self._drop()
                return
            assert fault.status is not None
            code = fault.code or DEFAULT_CODES.get(fault.status, "InternalError")
            payload = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message>"
                "<RequestId>s3proxy</RequestId></Error>"
            ).encode()
            proxy._record(Seen(method, path, query, fault.status, True,
                               headers=self._seen_headers(), body_size=len(body)))
            self.send_response_only(fault.status)
            for name, value in (fault.headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if method == "HEAD" else str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
            return
        try:
            resp = self._forward(method, body)
        except OSError:
            proxy._record(Seen(method, path, query, None, False, headers=self._seen_headers()))
            self._drop()
            return
        drop = fault.drop if fault is not None else None
        if drop == "after":
            resp.read()
            proxy._record(Seen(method, path, query, None, True, headers=self._seen_headers()))
            self._drop()
            return
        # Recorded before relaying: the client may act on the answer before the relay ends.
        proxy._record(Seen(method, path, query, None if drop else resp.status, fault is not None,
                           headers=self._seen_headers(), body_size=len(body)))
        self._relay(resp, method, cut=drop == "midway")

    def _forward(self, method: str, body: bytes) -> http.client.HTTPResponse:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.pop("Content-Length", None)
        if self.server.proxy.strip_conditions and method in ("PUT", "POST"):
            headers = {k: v for k, v in headers.items()
                       if k.lower() not in ("if-match", "if-none-match")}
        if body or method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have gone stale
            if self._upstream is None:
                host, port = self.server.proxy._upstream
                self._upstream = http.client.HTTPConnection(host, port, timeout=120)
            try:
                self._upstream.request(method, self.path, body=body, headers=headers)
                return self._upstream.getresponse()
            except (http.client.HTTPException, OSError):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _relay(self, resp: http.client.HTTPResponse, method: str, cut: bool) -> None:
        length_header = resp.getheader("Content-Length")
        self.send_response_only(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length" \
                    and key.lower() not in self.server.proxy.drop_headers:
                self.send_header(key, value)
        if method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            if length_header is not None:
                self.send_header("Content-Length", length_header)
            self.end_headers()
            resp.read()
            return
        if length_header is None:  # unknown length: buffer it (only small bodies do this)
            data = resp.read()
            length = len(data)
            chunks = iter([data])
        else:
            length = int(length_header)
            chunks = iter(lambda: resp.read(64 * 1024), b"")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        limit = length // 2 if cut else length
        sent = 0
        for chunk in chunks:
            if cut and sent + len(chunk) >= limit:
                self.wfile.write(chunk[: max(0, limit - sent)])
                resp.close()
                self._drop()
                return
            self.wfile.write(chunk)
            sent += len(chunk)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class S3Proxy:
    """A counting, fault-injecting HTTP proxy on 127.0.0.1 in front of `upstream`."""

    def __init__(self, upstream: str, port: int = 0, strip_conditions: bool = False,
                 region: str | None = None, idle_timeout: float | None = None,
                 drop_headers: tuple[str, ...] = ()) -> None:
        split = urlsplit(upstream)
        if split.scheme != "http" or not split.hostname:
            raise ValueError(f"upstream must be an http:// URL: {upstream!r}")
        self._upstream = (split.hostname, split.port or 80)
        self.port = port
        # Like s3rver or `rclone serve s3`: conditional writes are accepted and ignored.
        self.strip_conditions = strip_conditions
        # Like a bucket in another region: requests signed for any other region get S3's
        # region error (400 with x-amz-bucket-region).
        self.region = region
        # Like servers that close keep-alive connections idle this long (seconds).
        self.idle_timeout = idle_timeout
        self.idle_closed = 0
        # Response headers left out (lower-case names), like servers that never send them.
        self.drop_headers = frozenset(h.lower() for h in drop_headers)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._seen: list[Seen] = []
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (on the same port as before, after a pause)."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.proxy = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="s3proxy", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and reset every open client connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    pause = stop  # an outage: new connections are refused, open ones are reset
    resume = start

    def __enter__(self) -> S3Proxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults -----------------------------------------------------------------------------

    def inject(self, **kwargs: object) -> Fault:
        """Add a fault (see `Fault` for the fields); returns it, so `.hits` can be checked."""
        fault = Fault(**kwargs)  # type: ignore[arg-type]
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- counting ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def count(
        self, method: str | None = None, path: str | None = None, query: str | None = None
    ) -> int:
        """Requests seen so far that match (method exactly, path regex, query substring)."""
        return sum(
            1
            for seen in self.requests
            if (method is None or seen.method == method.upper())
            and (path is None or re.search(path, seen.path))
            and (query is None or query in seen.query)
        )

    def reset_counts(self) -> None:
        with self._lock:
            self._seen.clear()

    # -- used by the handler threads ----------------------------------------------------------

    def _take_fault(self, method: str, path: str, query: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path, query):
                    fault.hits += 1
                    return fault
        return None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def _idle_closed(self) -> None:
        with self._lock:
            self.idle_closed += 1

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)
