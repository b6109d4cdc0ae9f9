"""Shared fixtures: moto's S3 server, fresh buckets, and stores on both backends.

Tests are plain (sync) pytest functions that call `trio.run(...)` themselves: no async
test plugin is needed, and a test decides where its event loop starts and ends.

- `moto_server`      session-wide moto S3 server (started on first use, never restarted:
                     tests that stop it or switch auth on use `private_moto_server`)
- `private_moto_server`  a moto server of the test's own (about 0.5 s to start)
- `s3_bucket`        a fresh, empty bucket on `moto_server` -> S3Target(url, endpoint_url, ...)
- `storage`          parametrised over file:// and s3:// -> StorageTarget(url, endpoint_url)
- `store`            the same, opened: a `Store` (closed after the test)
- `s3_proxy`         an `S3Proxy` in front of `moto_server` (counts requests, injects faults)

Every test fails if the code it ran in this process logged a WARNING or worse that it did
not declare with `@pytest.mark.expected_logs(r"regex", ..., reason="why")` (S3QL's
checklogs idea): a retry, a conflict or a dropped change that nobody expected is a bug
report, not noise. Logs of mount subprocesses are their own (see mountutil).
"""

from __future__ import annotations

import http.server
import logging
import os
import re
import secrets
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, settings

from fsrepo.store import Store
from testservers.moto import TEST_AWS_ENV, MotoServer
from testservers.s3proxy import S3Proxy

from .mountutil import Mounter, make_env
from .targets import S3Target, StorageTarget

# -- Hypothesis budgets -----------------------------------------------------------------------
# "ci" (the default) keeps each stateful model run to well under a minute; "long" soaks
# (HYPOTHESIS_PROFILE=long). Examples are not saved: the failure report prints the steps.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=16, stateful_step_count=130, deadline=None,
                          database=None, suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("long", max_examples=400, stateful_step_count=300, deadline=None,
                          database=None, suppress_health_check=_SLOW_OK, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -- unexpected warnings fail the test --------------------------------------------------------
_CALL_FAILED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expected_logs(*patterns, reason): WARNING/ERROR log messages matching "
        "one of the regexes (re.search) are allowed in this test; say why in reason")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


class _Collector(logging.Handler):
    """Keeps every WARNING-or-worse record, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _allowed_patterns(item: pytest.Item) -> list[re.Pattern[str]]:
    patterns = []
    for mark in item.iter_markers("expected_logs"):
        assert mark.kwargs.get("reason"), f"{item.nodeid}: expected_logs needs a reason="
        patterns += [re.compile(p) for p in mark.args]
    return patterns


@pytest.fixture(autouse=True)
def fail_on_unexpected_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Collect WARNING+ records for the whole test (other fixtures' set-up and tear-down
    included); after a test that passed, fail it if any was not expected."""
    collector = _Collector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield
    finally:
        root.removeHandler(collector)
    if request.node.stash.get(_CALL_FAILED, True):
        return  # failed or skipped: its own report says more than its logs
    allowed = _allowed_patterns(request.node)
    unexpected = [r for r in collector.records
                  if not any(p.search(r.getMessage()) for p in allowed)]
    if unexpected:
        lines = [f"  {r.levelname} {r.name}: {r.getMessage()}" for r in unexpected[:20]]
        pytest.fail(f"{len(unexpected)} unexpected WARNING/ERROR log record(s) (allow "
                    "them with @pytest.mark.expected_logs(regex, reason=...)):\n"
                    + "\n".join(lines), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def aws_test_env() -> Iterator[None]:
    """Fake credentials and no ambient AWS config, so no test can ever reach real AWS."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in TEST_AWS_ENV.items():
            mp.setenv(name, value)
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
        ):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def moto_server(
    aws_test_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MotoServer]:
    server = MotoServer(log_path=tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_moto_server(aws_test_env: None, tmp_path: Path) -> Iterator[MotoServer]:
    with MotoServer(log_path=tmp_path / "moto.log") as server:
        yield server


def _new_bucket(server: MotoServer, prefix: str = "repo") -> S3Target:
    name = "imgrepo-test-" + secrets.token_hex(6)
    server.create_bucket(name)
    return S3Target(
        url=f"s3://{name}/{prefix}" if prefix else f"s3://{name}",
        endpoint_url=server.url,
        bucket=name,
        prefix=prefix,
    )


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> Iterator[S3Target]:
    """A fresh bucket; its storage URL has the prefix 'repo'. Emptied and deleted after."""
    target = _new_bucket(moto_server)
    yield target
    if moto_server.running:
        try:
            moto_server.delete_bucket(target.bucket)
        except Exception:  # noqa: BLE001 - cleanup must not mask the test's outcome
            pass


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> StorageTarget:
    """A repository location on each backend (moto starts only when an s3 case runs)."""
    if request.param == "file":
        return StorageTarget(url=f"file://{tmp_path}/repository")
    return request.getfixturevalue("s3_bucket")


@pytest.fixture
def store(storage: StorageTarget) -> Iterator[Store]:
    opened = storage.open()
    yield opened
    trio.run(opened.aclose)


@pytest.fixture
def s3_proxy(moto_server: MotoServer) -> Iterator[S3Proxy]:
    with S3Proxy(moto_server.url) as proxy:
        yield proxy


# -- real FUSE mounts ---------------------------------------------------------------------


@pytest.fixture
def mount_env(tmp_path: Path) -> dict[str, str]:
    """Environment for imgrepo-mount subprocesses: HOME and XDG dirs inside tmp_path."""
    return make_env(tmp_path / "home")


@pytest.fixture
def mounter(tmp_path: Path, mount_env: dict[str, str]) -> Iterator[Mounter]:
    """mounter(storage_url, *extra_args, endpoint_url=..., cache_dir=...) -> MountProcess.
    Every mount is unmounted and its process stopped at teardown, even on failure."""
    m = Mounter(tmp_path, mount_env)
    try:
        yield m
    finally:
        m.cleanup()


# -- TLS ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate (for 127.0.0.1); it
    answers every request 404 NoSuchBucket."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = (b"<?xml version='1.0'?><Error><Code>NoSuchBucket</Code>"
                    b"<Message>no</Message></Error>")
            self.send_response(404)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = _answer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()
