"""Unit tests with a scripted provider (httpx.MockTransport) and a fake clock: the RFC 8628
timing rules at their real values (5 s default, +5 s per slow_down), error mapping,
discovery, the token store, log redaction."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import time
from dataclasses import replace

import httpx
import pytest
from auth_harness import ROLE_ARN, SecretGuard, UserAtBrowser

from fsrepo.auth import TokenRedactingFilter, aws_environment, run_login, run_status
from fsrepo.auth.commands import browser_available, format_status, session_name
from fsrepo.auth.oidc import (
    DEFAULT_INTERVAL,
    DeviceAuthorization,
    PollTiming,
    ProviderInfo,
    check_issuer_url,
    discover,
    initial_interval,
    poll_for_tokens,
    slowed_down,
)
from fsrepo.auth.redact import redact
from fsrepo.auth.store import StoredLogin, refresh_margin
from fsrepo.config import Settings
from fsrepo.errors import (
    AccessDenied,
    ConfigError,
    DeviceCodeExpired,
    DiscoveryError,
    InvalidClient,
    IssuerUnreachable,
    LoginError,
)

ISSUER = "https://login.example.test"
PROVIDER = ProviderInfo(ISSUER, ISSUER + "/device", ISSUER + "/token", ISSUER + "/revoke")


def jwt(claims: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'RS256'})}.{enc(claims)}.c2lnbmF0dXJl"


def id_token(sub="bob", lifetime=3600, **extra) -> str:
    now = int(time.time())
    return jwt({"iss": ISSUER, "aud": "cli", "sub": sub, "iat": now, "exp": now + lifetime, **extra})


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.slept: list[float] = []

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self):
        return self.now


def scripted(answers):
    """A token endpoint answering the given (status, json) pairs in order."""
    answers = list(answers)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(dict(httpx.QueryParams(request.content.decode())))
        status, body = answers.pop(0)
        if isinstance(body, Exception):
            raise body
        return httpx.Response(status, json=body)

    return httpx.Client(transport=httpx.MockTransport(handler)), seen


def device(interval=None, expires_in=600.0):
    return DeviceAuthorization("dev-code-secret", "ABCD-EFGH", ISSUER + "/device", None, expires_in, interval)


PENDING = (400, {"error": "authorization_pending"})
SLOW = (400, {"error": "slow_down"})
TOKENS = (200, {"access_token": "at", "id_token": "x", "token_type": "Bearer"})


def poll(answers, auth=None):
    http, seen = scripted(answers)
    clock = FakeClock()
    result = poll_for_tokens(http, PROVIDER, "cli", auth or device(),
                             sleep=clock.sleep, clock=clock)
    return result, clock.slept, seen


def test_default_interval_is_five_seconds():
    result, slept, seen = poll([PENDING, PENDING, TOKENS])
    assert result["access_token"] == "at"
    assert slept == [5.0, 5.0, 5.0] and DEFAULT_INTERVAL == 5.0
    assert seen[0] == {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": "dev-code-secret",
        "client_id": "cli",
    }


def test_provider_interval_is_used():
    assert poll([PENDING, TOKENS], auth=device(interval=3))[1] == [3.0, 3.0]


def test_slow_down_adds_five_seconds_to_every_later_poll():
    _, slept, _ = poll([PENDING, SLOW, PENDING, SLOW, PENDING, TOKENS], auth=device(interval=2))
    assert slept == [2, 2, 7, 7, 12, 12]


def test_interval_computation():
    assert initial_interval(device()) == 5.0
    assert initial_interval(device(interval=8)) == 8.0
    assert initial_interval(device(interval=8), PollTiming(interval=0.1)) == 0.1  # tests only
    assert slowed_down(5.0) == 10.0
    assert slowed_down(58.0) == 60.0  # capped


@pytest.mark.parametrize(
    "answer, error, message",
    [
        ((400, {"error": "access_denied"}), AccessDenied, "denied"),
        ((400, {"error": "expired_token"}), DeviceCodeExpired, "expired"),
        ((401, {"error": "invalid_client"}), InvalidClient, "client id 'cli'"),
        ((400, {"error": "invalid_grant", "error_description": "bad code"}), LoginError, "invalid_grant: bad code"),
    ],
)
def test_poll_errors(answer, error, message):
    with pytest.raises(error, match=message):
        poll([PENDING, answer])


def test_local_deadline_when_the_provider_keeps_saying_pending():
    with pytest.raises(DeviceCodeExpired):
        poll([PENDING] * 10, auth=device(expires_in=12))


def test_network_trouble_backs_off_and_keeps_polling():
    http, _ = scripted([(0, httpx.ConnectError("refused")), (0, httpx.ConnectError("refused")), PENDING, TOKENS])
    clock, notices = FakeClock(), []
    poll_for_tokens(http, PROVIDER, "cli", device(), sleep=clock.sleep, clock=clock, notice=notices.append)
    assert clock.slept == [5, 10, 20, 20]
    assert len(notices) == 1 and "Lost contact" in notices[0]


def test_server_errors_back_off():
    _, slept, _ = poll([(503, {}), PENDING, TOKENS])
    assert slept == [5, 10, 10]


# -- discovery ----------------------------------------------------------------------------


def discovery_client(status=200, doc=None):
    def handler(request):
        assert request.url.path == "/.well-known/openid-configuration"
        return httpx.Response(status, json=doc if doc is not None else {})

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_discovery():
    doc = {"issuer": ISSUER, "device_authorization_endpoint": ISSUER + "/d", "token_endpoint": ISSUER + "/t"}
    info = discover(discovery_client(doc=doc), ISSUER + "/")
    assert info == ProviderInfo(ISSUER, ISSUER + "/d", ISSUER + "/t", None)


def test_discovery_without_device_endpoint():
    doc = {"issuer": ISSUER, "token_endpoint": ISSUER + "/t"}
    with pytest.raises(DiscoveryError, match="does not offer the device login flow"):
        discover(discovery_client(doc=doc), ISSUER)


def test_discovery_errors():
    with pytest.raises(DiscoveryError, match="answered HTTP 404"):
        discover(discovery_client(404), ISSUER)
    with pytest.raises(DiscoveryError, match="different issuer"):
        discover(discovery_client(doc={"issuer": "https://evil.test"}), ISSUER)

    def refuse(request):
        raise httpx.ConnectError("Connection refused")

    with pytest.raises(IssuerUnreachable, match="cannot reach the identity provider at"):
        discover(httpx.Client(transport=httpx.MockTransport(refuse)), ISSUER)


def test_issuer_url_rules():
    assert check_issuer_url("https://a.test/realms/x/") == "https://a.test/realms/x"
    assert check_issuer_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert check_issuer_url("http://localhost:1") == "http://localhost:1"
    with pytest.raises(ConfigError, match="plain http"):
        check_issuer_url("http://login.example.com")
    with pytest.raises(ConfigError):
        check_issuer_url("login.example.com")


# -- run_login with a scripted provider -----------------------------------------------------


def scripted_provider(*, token_answers, device_extra=None):
    answers = list(token_answers)

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={
                "issuer": ISSUER, "device_authorization_endpoint": ISSUER + "/device/auth",
                "token_endpoint": ISSUER + "/token", "revocation_endpoint": ISSUER + "/revoke"})
        if path == "/device/auth":
            return httpx.Response(200, json={
                "device_code": "dev-code-secret", "user_code": "WXYZ-1234",
                "verification_uri": ISSUER + "/activate", "expires_in": 300, **(device_extra or {})})
        if path == "/token":
            status, body = answers.pop(0)
            return httpx.Response(status, json=body)
        return httpx.Response(404)

    return httpx.Client(transport=httpx.MockTransport(handler))


def scripted_settings(home):
    return Settings(issuer=ISSUER, client_id="cli", role_arn=ROLE_ARN,
                    config_file=home / ".config" / "imgrepo" / "config.toml")


def test_login_with_default_timing_and_a_browser(auth_home, store):
    """The real 5 s default, on a fake clock; a browser 'opens' the complete URL."""
    token = id_token(email="bob@example.test", name="Bob")
    http = scripted_provider(
        token_answers=[PENDING, SLOW, (200, {"access_token": "at-secret-value", "id_token": token,
                                             "refresh_token": "rt-secret-value",
                                             "refresh_expires_in": 86400})],
        device_extra={"verification_uri_complete": ISSUER + "/activate?code=WXYZ-1234"},
    )
    clock, opened = FakeClock(), []
    out = UserAtBrowser(None)
    code = run_login(scripted_settings(auth_home), no_browser=False, out=out, store=store, http=http,
                     sleep=clock.sleep, open_browser=lambda url: opened.append(url) or True,
                     check_role=False)
    assert code == 0
    assert clock.slept == [5.0, 5.0, 10.0]
    assert opened == [ISSUER + "/activate?code=WXYZ-1234"]
    assert "Opened the page in your browser" in out.text and "WXYZ-1234" in out.text
    assert "Logged in as Bob <bob@example.test>" in out.text
    guard = SecretGuard()
    guard.add("dev-code-secret", "at-secret-value", "rt-secret-value", token)
    guard.scan(out.text)
    assert store.load().refresh_token == "rt-secret-value"
    status = run_status(scripted_settings(auth_home), store=store)
    assert 86000 < status["refresh_token_expires_at"] - time.time() <= 86400
    assert "until" in format_status(status) and "(then log in again)" in format_status(status)


def test_login_without_refresh_token_warns(auth_home, store):
    http = scripted_provider(token_answers=[(200, {"access_token": "at-secret-value", "id_token": id_token()})])
    out = UserAtBrowser(None)
    assert run_login(scripted_settings(auth_home), no_browser=True, out=out, store=store, http=http,
                     sleep=lambda s: None, check_role=False) == 0
    assert "no refresh token" in out.text
    status = run_status(scripted_settings(auth_home), store=store)
    assert status["logged_in"] and not status["can_refresh"]


def test_login_needs_its_settings(auth_home, store):
    base = scripted_settings(auth_home)
    for change, message in [
        ({"issuer": None}, "--issuer"),
        ({"client_id": None}, "--client-id"),
        ({"role_arn": None}, "--role-arn"),
        ({"role_arn": "my-role"}, "not an IAM role ARN"),
        ({"scope": "offline_access"}, "must include 'openid'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            run_login(replace(base, **change), no_browser=True, out=UserAtBrowser(None), store=store)


def test_id_token_for_another_client_is_refused(auth_home, store):
    bad = jwt({"iss": ISSUER, "aud": "someone-else", "sub": "bob", "exp": time.time() + 60})
    http = scripted_provider(token_answers=[(200, {"access_token": "a", "id_token": bad})])
    with pytest.raises(LoginError, match="not meant for client id"):
        run_login(scripted_settings(auth_home), no_browser=True, out=UserAtBrowser(None), store=store,
                  http=http, sleep=lambda s: None, check_role=False)
    assert store.load() is None


def test_browser_detection(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("BROWSER", raising=False)
    assert browser_available() is False  # a server over ssh: print only


# -- token store ----------------------------------------------------------------------------


def sample_login(**changes) -> StoredLogin:
    base = StoredLogin(
        issuer=ISSUER, client_id="cli", scope="openid offline_access", token_endpoint=ISSUER + "/token",
        subject="bob", id_token="id-token-secret", id_token_expires_at=time.time() + 3600,
        id_token_lifetime=3600, access_token="access-secret", refresh_token="refresh-secret",
        role_arn=ROLE_ARN, identity={"preferred_username": "bob"},
    )
    return replace(base, **changes)


@pytest.mark.expected_logs(r"was readable by others; making it private", reason="the test makes the token file readable by others to see it tightened")
def test_store_files_are_private_and_whole(store):
    os.umask(0o022)
    with store.locked():
        store.save(sample_login())
        assert store.write_web_identity_token("id-token-secret") is True
        assert store.write_web_identity_token("id-token-secret") is False
    for path in (store.path, store.web_identity_path, store.lock_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert store.load() == sample_login(login_id=store.load().login_id,
                                        id_token_expires_at=store.load().id_token_expires_at)
    os.chmod(store.path, 0o644)
    store.load()
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600  # repaired
    assert not list(store.directory.glob(".*.tmp"))


@pytest.mark.expected_logs(r"was readable by others; making it private", reason="the damaged store the test writes is created with the default mode")
def test_damaged_store_is_reported(store):
    store.directory.mkdir(parents=True)
    store.path.write_text("{not json")
    with pytest.raises(LoginError, match="damaged"):
        store.load()


def test_repr_hides_tokens():
    text = repr(sample_login()) + repr(device())
    for secret in ("id-token-secret", "access-secret", "refresh-secret", "dev-code-secret"):
        assert secret not in text


def test_refresh_margin():
    assert refresh_margin(3600) == 300  # refreshed after 55 minutes
    assert refresh_margin(6) == 2
    login = sample_login(id_token_expires_at=1000.0, id_token_lifetime=30)
    assert login.refresh_due_at() == 990.0


def test_session_name():
    assert session_name(sample_login()) == "imgrepo-bob"
    weird = sample_login(identity={"email": "Zoë Smith/ops@example.test"})
    assert session_name(weird) == "imgrepo-Zo__Smith_ops@example.test"
    assert len(session_name(sample_login(identity={"preferred_username": "x" * 100}))) == 64


def test_no_login_means_plain_aws_credentials(store, auth_home):
    settings = scripted_settings(auth_home)
    assert aws_environment(settings, store=store) == {}
    status = run_status(settings, store=store)
    assert status["logged_in"] is False and "plain AWS credentials" in status["aws_credentials"]
    assert format_status(status).startswith("Not logged in.")


def test_environment_credentials_take_precedence_and_status_says_so(store, auth_home, monkeypatch):
    with store.locked():
        store.save(sample_login())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    status = run_status(scripted_settings(auth_home), store=store)
    assert "AWS_ACCESS_KEY_ID" in status["aws_credentials"]


def test_aws_environment_recreates_a_missing_token_file(store, auth_home):
    with store.locked():
        store.save(sample_login())
    env = aws_environment(scripted_settings(auth_home), store=store)
    assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == str(store.web_identity_path)
    assert store.web_identity_path.read_text() == "id-token-secret"


# -- redaction ------------------------------------------------------------------------------


def test_redaction_of_library_debug_output(caplog):
    """botocore at DEBUG logs the STS request body, web-identity token included."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    token = id_token()
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(TokenRedactingFilter())
    sts = boto3.client("sts", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                       config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1},
                                     connect_timeout=1))
    with pytest.raises(Exception):  # noqa: B017 - nothing listens there
        sts.assume_role_with_web_identity(RoleArn=ROLE_ARN, RoleSessionName="imgrepo-bob",
                                          WebIdentityToken=token)
    assert "AssumeRoleWithWebIdentity" in caplog.text  # botocore did log the request...
    assert token not in caplog.text  # ...without the token


def test_redact_patterns():
    text = redact("refresh_token=abcdefgh12345&x=1 <SecretAccessKey>wJalrXUtnFEMI/K7MDENG</SecretAccessKey> "
                  "{'WebIdentityToken': 'opaque-token-123'} " + id_token())
    for secret in ("abcdefgh12345", "wJalrXUtnFEMI/K7MDENG", "opaque-token-123", "eyJ"):
        assert secret not in text
    assert redact("nothing secret here") == "nothing secret here"


def test_secret_guard_catches_a_leak():
    guard = SecretGuard()
    guard.add("leaky-token-value")
    with pytest.raises(AssertionError):
        guard.scan("log line with leaky-token-value inside")


def test_ctrl_c_before_polling_is_clean_too(auth_home, store):
    def interrupted(request):
        raise KeyboardInterrupt

    out = UserAtBrowser(None)
    http = httpx.Client(transport=httpx.MockTransport(interrupted))
    assert run_login(scripted_settings(auth_home), no_browser=True, out=out, store=store, http=http) == 130
    assert "Login cancelled" in out.text and store.load() is None


# -- refresher, with a scripted provider -----------------------------------------------------


def run_refresher_until(refresher, *conditions, timeout=5.0):
    """Runs the refresher until each condition on its state has been seen, in order."""
    import trio

    seen = []

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresher.run)
            with trio.fail_after(timeout):
                for condition in conditions:
                    while not condition(refresher.state()):
                        await trio.sleep(0.01)
                    seen.append(refresher.state())
            nursery.cancel_scope.cancel()

    trio.run(main)
    return seen


@pytest.mark.expected_logs(r"login refresh failed \(retrying", reason="the provider fails on purpose")
def test_refresher_retries_after_provider_trouble(store, caplog):
    from fsrepo.auth import TokenRefresher
    from fsrepo.retry import Backoff

    with store.locked():
        store.save(sample_login(id_token_expires_at=time.time() + 0.5, id_token_lifetime=3))
    new_id = id_token(lifetime=3600)
    http, seen = scripted([
        (503, {"error": "temporarily_unavailable"}),
        (200, {"access_token": "access-2", "id_token": new_id, "refresh_token": "refresh-2"}),
    ])
    refresher = TokenRefresher(store=store, http=http, watch_interval=0.02,
                               retry=Backoff(first=0.1, cap=60.0))
    states = run_refresher_until(refresher, lambda s: s.status == "retrying", lambda s: s.status == "ok"
                                 and s.refreshes == 1)
    assert "temporarily_unavailable" in states[0].message
    assert [form["refresh_token"] for form in seen] == ["refresh-secret", "refresh-secret"]
    saved = store.load()
    assert (saved.refresh_token, saved.id_token, saved.refreshes) == ("refresh-2", new_id, 1)
    assert store.web_identity_path.read_text() == new_id
    assert 3500 < saved.seconds_left() <= 3600
    assert any("retrying" in r.getMessage() for r in caplog.records)


@pytest.mark.expected_logs(r"login required", reason="the login expires on purpose")
def test_refresher_without_refresh_token_says_login_required_at_expiry(store, caplog):
    from fsrepo.auth import TokenRefresher

    with store.locked():
        store.save(sample_login(refresh_token=None, id_token_expires_at=time.time() + 0.3))
    refresher = TokenRefresher(store=store, http=scripted([])[0], watch_interval=0.02)
    states = run_refresher_until(refresher, lambda s: s.status == "no_refresh_token",
                                 lambda s: s.login_required)
    assert "imgrepo-mount --login" in states[1].message
    assert any(r.levelname == "WARNING" and "login required" in r.getMessage() for r in caplog.records)


def test_refresher_with_nobody_logged_in_waits_quietly(store):
    from fsrepo.auth import TokenRefresher

    refresher = TokenRefresher(store=store, http=scripted([])[0], watch_interval=0.02)
    states = run_refresher_until(refresher, lambda s: s.status == "not_logged_in")
    assert "--login" in states[0].message
