"""Test servers for the login tests: the node OIDC provider, moto's server, and a small
"AWS edge" proxy in front of moto that makes web-identity credentials really expire.

Why the edge: botocore's web-identity provider cannot pass DurationSeconds (it always gets
STS's default hour), refreshes credentials 15 minutes before they expire, and moto neither
validates the web-identity token nor ever rejects an expired access key. The edge, on
127.0.0.1 between boto3 and moto:
- for STS AssumeRoleWithWebIdentity: verifies the ID token like AWS does (RS256 signature
  against the provider's JWKS, iss, aud, exp), rejects it with InvalidIdentityToken /
  ExpiredTokenException otherwise, and asks moto for DurationSeconds = 900 + `usable`, so
  botocore refreshes `usable` seconds after each AssumeRole;
- for S3: rejects requests signed with an access key issued more than `usable + grace`
  seconds ago (400 ExpiredToken, as S3 does). Credentials thus expire in seconds.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import httpx
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from testservers.net import free_port, wait_listening

OIDC_DIR = Path(__file__).resolve().parent.parent / "oidc"
CLIENT_ID = "imgrepo-test"


# --------------------------------------------------------------------------- OIDC provider


def _forms(page: str) -> list[tuple[str, dict[str, str]]]:
    found = []
    for m in re.finditer(r"<form([^>]*)>(.*?)</form>", page, re.S):
        attrs = dict(re.findall(r'([\w.-]+)="([^"]*)"', m.group(1)))
        values = {}
        for tag in re.findall(r"<input([^>]*)>", m.group(2), re.S):
            a = dict(re.findall(r'([\w.-]+)="([^"]*)"', tag))
            if a.get("name"):
                values[a["name"]] = html.unescape(a.get("value", ""))
        found.append((html.unescape(attrs.get("action", "")), values))
    return found


class OidcProvider:
    """`node tests/oidc/server.mjs`, one per test session; `reset()` between tests."""

    def __init__(self) -> None:
        node = shutil.which("node")
        if not node:
            raise RuntimeError("node is not installed (needed for the test OIDC provider)")
        if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError(
                f"{OIDC_DIR}/node_modules is missing: run `bash scripts/setup.sh --tests` "
                "(or `npm install` in tests/oidc)"
            )
        self.log_path = OIDC_DIR / "node_modules" / ".imgrepo-test-provider.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [node, str(OIDC_DIR / "server.mjs")],
            cwd=OIDC_DIR,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "OIDC_PORT": "0"},
        )
        line = self.proc.stdout.readline().decode()
        if not line.startswith("OIDC_READY "):
            self.stop()
            raise RuntimeError(f"the OIDC provider did not start: {line!r}; see {self.log_path}")
        self.issuer = line.split()[1]
        self.client_id = CLIENT_ID
        # keep draining stdout so the provider never blocks on a full pipe
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.http = httpx.Client(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def configure(self, **settings) -> dict:
        resp = self.http.post(self.issuer + "/_test/settings", json=settings)
        resp.raise_for_status()
        return resp.json()

    def reset(self) -> None:
        self.configure(
            ttl={"IdToken": 3600, "AccessToken": 3600, "RefreshToken": 14 * 86400, "DeviceCode": 600},
            slowDown=0,
            interval=None,
            expiresIn=None,
            resetStats=True,
        )

    def stats(self) -> dict:
        return self.http.get(self.issuer + "/_test/stats").json()

    def user(self, user_code: str, *, login: str = "alice", approve: bool = True) -> str:
        """Does what the user does in the browser: enter the code, confirm (or abort), log
        in, consent. Returns the title of the last page."""
        with httpx.Client(follow_redirects=True, timeout=10) as browser:
            page = browser.get(self.issuer + "/device")
            action, values = _forms(page.text)[0]
            values["user_code"] = user_code
            page = browser.post(action, data=values)
            action, values = _forms(page.text)[0]  # confirm the code
            if not approve:
                values["abort"] = "yes"
                values.pop("confirm", None)
                page = browser.post(action, data=values)
                return _title(page.text)
            page = browser.post(action, data=values)
            for _ in range(4):  # login, then consent
                forms = _forms(page.text)
                if not forms:
                    break
                action, values = forms[0]
                if values.get("prompt") == "login":
                    values.update(login=login, password="any")
                page = browser.post(action, data=values)
            return _title(page.text)

    def revoke(self, token: str, hint: str = "refresh_token") -> None:
        resp = self.http.post(
            self.issuer + "/token/revocation",
            data={"token": token, "token_type_hint": hint, "client_id": self.client_id},
        )
        resp.raise_for_status()


def _title(page: str) -> str:
    m = re.search(r"<title>(.*?)</title>", page, re.S)
    return m.group(1).strip() if m else ""


class UserAtBrowser:
    """An `out` stream for run_login: when the user code is printed, a thread plays the
    user's part (approve or deny) against the provider. Keeps everything written."""

    def __init__(self, provider: OidcProvider | None, *, approve: bool = True, login: str = "alice"):
        self.provider = provider
        self.approve = approve
        self.login = login
        self.text = ""
        self.user_code: str | None = None
        self.result: str | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def write(self, text: str) -> int:
        self.text += text
        m = re.search(r"enter the code:\s+(\S+)", self.text)
        if m and self.user_code is None:
            self.user_code = m.group(1)
            if self.provider is not None:
                self.thread = threading.Thread(target=self._act, daemon=True)
                self.thread.start()
        return len(text)

    def flush(self) -> None:
        pass

    def _act(self) -> None:
        try:
            self.result = self.provider.user(self.user_code, login=self.login, approve=self.approve)
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(30)
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------- moto server


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port, self.proc, what="the OIDC provider", timeout=60)
        self.url = f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        httpx.post(self.url + "/moto-api/reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------------- AWS edge


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@dataclass
class StsCall:
    at: float
    token_sha: str
    ok: bool
    error: str = ""
    access_key: str = ""
    token_expires_in: float = 0.0


@dataclass
class EdgeRecord:
    sts: list[StsCall] = field(default_factory=list)
    s3_ok: int = 0
    s3_rejected: int = 0


_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "expect",
        "proxy-connection", "te", "trailer", "upgrade"}


class AwsEdge:
    def __init__(self, moto_url: str, issuer: str, client_id: str, *, usable: float, grace: float):
        self.moto_url = moto_url
        self.issuer = issuer
        self.client_id = client_id
        self.usable = usable
        self.grace = grace
        self.record = EdgeRecord()
        self.keys: dict[str, float] = {}  # access key id -> valid until
        self._lock = threading.Lock()
        self._jwks: dict[str, rsa.RSAPublicKey] = {}
        self._upstream = httpx.Client(timeout=30)
        edge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                status, headers, payload = edge.handle(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._upstream.close()

    # -- the checks --------------------------------------------------------------------

    def _key(self, kid: str | None) -> rsa.RSAPublicKey:
        if kid not in self._jwks:
            jwks = httpx.get(self.issuer + "/jwks", timeout=10).json()
            for jwk in jwks["keys"]:
                if jwk.get("kty") == "RSA":
                    numbers = rsa.RSAPublicNumbers(
                        int.from_bytes(_b64(jwk["e"]), "big"), int.from_bytes(_b64(jwk["n"]), "big")
                    )
                    self._jwks[jwk.get("kid")] = numbers.public_key()
        return self._jwks[kid]

    def verify_web_identity(self, token: str) -> tuple[str, float]:
        """('', seconds left) if valid, else (error code, 0)."""
        try:
            head_b64, payload_b64, sig_b64 = token.strip().split(".")
            header = json.loads(_b64(head_b64))
            claims = json.loads(_b64(payload_b64))
            if header.get("alg") != "RS256":
                return "InvalidIdentityToken", 0.0
            self._key(header.get("kid")).verify(
                _b64(sig_b64), f"{head_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except Exception:  # noqa: BLE001 - any failure is an invalid token
            return "InvalidIdentityToken", 0.0
        aud = claims.get("aud")
        if claims.get("iss") != self.issuer or self.client_id not in (aud if isinstance(aud, list) else [aud]):
            return "InvalidIdentityToken", 0.0
        left = float(claims.get("exp", 0)) - time.time()
        if left <= 0:
            return "ExpiredTokenException", 0.0
        return "", left

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes):
        form = {}
        if method == "POST" and b"Action=AssumeRoleWithWebIdentity" in body:
            form = dict(parse_qsl(body.decode()))
        if form:
            token = form.get("WebIdentityToken", "")
            sha = hashlib.sha256(token.encode()).hexdigest()[:16]
            error, left = self.verify_web_identity(token)
            if error:
                with self._lock:
                    self.record.sts.append(StsCall(time.time(), sha, False, error))
                xml = (
                    "<ErrorResponse><Error><Type>Sender</Type>"
                    f"<Code>{error}</Code><Message>web identity token rejected: {error}</Message>"
                    "</Error><RequestId>edge</RequestId></ErrorResponse>"
                )
                return 400, [("Content-Type", "text/xml"), ("Content-Length", str(len(xml)))], xml.encode()
            form["DurationSeconds"] = str(int(900 + self.usable))
            body = urlencode(form).encode()
            issued = time.time()
            status, out_headers, payload = self._forward(method, path, headers, body)
            m = re.search(rb"<AccessKeyId>([^<]+)</AccessKeyId>", payload)
            if status == 200 and m:
                key = m.group(1).decode()
                with self._lock:
                    self.keys[key] = issued + self.usable + self.grace
                    self.record.sts.append(StsCall(issued, sha, True, access_key=key, token_expires_in=left))
            return status, out_headers, payload
        m = re.search(r"Credential=([A-Z0-9]+)/", headers.get("Authorization", ""))
        if m:
            with self._lock:
                valid_until = self.keys.get(m.group(1))
            if valid_until is not None and time.time() > valid_until:
                with self._lock:
                    self.record.s3_rejected += 1
                xml = (
                    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>ExpiredToken</Code>'
                    "<Message>The provided token has expired.</Message></Error>"
                )
                return 400, [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))], xml.encode()
            with self._lock:
                self.record.s3_ok += 1
        return self._forward(method, path, headers, body)

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes):
        send = {k: v for k, v in headers.items() if k.lower() not in _HOP}
        resp = self._upstream.request(method, self.moto_url + path, headers=send, content=body)
        out = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in _HOP | {"content-encoding"}]
        payload = resp.content
        if method == "HEAD":
            out.append(("Content-Length", resp.headers.get("content-length", "0")))
        else:
            out.append(("Content-Length", str(len(payload))))
        return resp.status_code, out, payload


# --------------------------------------------------------------------------- refresher


@contextlib.contextmanager
def refresher_running(refresher) -> Iterator[None]:
    """Runs `await refresher.run()` in a trio loop on a background thread."""
    started = threading.Event()
    box: dict = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            box["token"] = trio.lowlevel.current_trio_token()
            box["scope"] = nursery.cancel_scope
            nursery.start_soon(refresher.run)
            started.set()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield
    finally:
        if "scope" in box:
            trio.from_thread.run_sync(box["scope"].cancel, trio_token=box["token"])
        thread.join(30)
        if "error" in box:
            raise box["error"]


# --------------------------------------------------------------------------- shared helpers

ROLE_ARN = "arn:aws:iam::123456789012:role/imgrepo-users"


def fast_timing():
    from fsrepo.auth import PollTiming

    return PollTiming(interval=0.05, slow_down_step=0.05)


def login(settings, store, oidc, *, approve=True, timing="fast", **kwargs):
    """run_login with the user's side played by a thread; returns (exit code, output)."""
    from fsrepo.auth import run_login

    out = UserAtBrowser(oidc, approve=approve)
    kwargs.setdefault("check_role", False)
    try:
        code = run_login(settings, no_browser=True, out=out, store=store,
                         timing=fast_timing() if timing == "fast" else timing, **kwargs)
    finally:
        out.join()
    return code, out


def wait_until(predicate, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


class SecretGuard:
    """Remembers every token the code under test stored or received, and every log line
    (raw, without any redaction, for imgrepo's own loggers and httpx; redacted as the mount
    would for everything else), so that a test can assert none of the former appears in
    the latter."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()
        self.raw_log = io.StringIO()
        self.texts: list[str] = []

    def add(self, *values) -> None:
        self.secrets.update(v for v in values if v and len(v) >= 8)

    def scan(self, *extra: str) -> None:
        haystacks = [self.raw_log.getvalue(), *self.texts, *extra]
        for secret in self.secrets:
            for text in haystacks:
                assert secret not in text, "a token leaked into output or logs"
