"""TLS in front of a plain-HTTP server on 127.0.0.1, relaying bytes both ways, that can cut
a connection the way a load balancer or a broken middlebox does: without TLS's close.

    cert, key = make_certificate(folder)             # self-signed, for 127.0.0.1
    with TLSFront(proxy.url, cert, key) as front:    # https://127.0.0.1:PORT
        front.cut("handshake")                       # next connection: closed mid-handshake
        front.cut("request", after=64 * 1024)        # next one: closed after 64 KiB sent

A client sees the handshake's cut as an `ssl.SSLEOFError` ("EOF occurred in violation of
protocol"), the request's as that or a reset: a dropped connection, to be retried, not a
certificate problem.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

CUT_POINTS = ("handshake", "request")


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key for 127.0.0.1 (openssl), in `folder`."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class TLSFront:
    """https://127.0.0.1:PORT in front of the http:// `upstream`."""

    def __init__(self, upstream: str, cert: Path, key: Path) -> None:
        split = urlsplit(upstream)
        if split.scheme != "http" or not split.hostname:
            raise ValueError(f"upstream must be an http:// URL: {upstream!r}")
        self._upstream = (split.hostname, split.port or 80)
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(str(cert), str(key))
        self._lock = threading.Lock()
        self._cuts: list[tuple[str, int]] = []
        self.cuts_made = 0
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def cut(self, at: str = "handshake", after: int = 0, times: int = 1) -> None:
        """Cut the next `times` connections at `at` ("request": once `after` bytes of
        requests came through it)."""
        if at not in CUT_POINTS:
            raise ValueError(f"at must be one of {CUT_POINTS}")
        with self._lock:
            self._cuts += [(at, after)] * times

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(32)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name="tlsfront", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> TLSFront:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the relay ----------------------------------------------------------------------
    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        listener.settimeout(0.1)
        while self._listener is not None:
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                cut = self._cuts.pop(0) if self._cuts else None
            threading.Thread(target=self._serve, args=(raw, cut), daemon=True).start()

    def _serve(self, raw: socket.socket, cut: tuple[str, int] | None) -> None:
        if cut is not None and cut[0] == "handshake":
            self._cut_made()
            try:
                raw.settimeout(10)
                raw.recv(65536)  # the ClientHello, read: the close below is an EOF, not a reset
            except OSError:
                pass
            raw.close()  # the client waits for our hello: it gets an EOF, no TLS alert
            return
        try:
            client = self._tls.wrap_socket(raw, server_side=True)
            upstream = socket.create_connection(self._upstream, timeout=30)
        except OSError:
            raw.close()
            return
        limit = cut[1] if cut is not None else None
        back = threading.Thread(target=self._pump_back, args=(upstream, client), daemon=True)
        back.start()
        sent = 0
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    self._cut_made()
                    break  # closed below without TLS's close_notify
                upstream.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            upstream.close()
            client.close()  # SSLSocket.close() sends no close_notify: an unclean EOF

    @staticmethod
    def _pump_back(upstream: socket.socket, client: ssl.SSLSocket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass

    def _cut_made(self) -> None:
        with self._lock:
            self.cuts_made += 1
