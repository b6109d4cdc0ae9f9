"""The device flow against a real OpenID Connect provider (oidc-provider on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import stat
import time
import tomllib

import httpx
import pytest
from auth_harness import ROLE_ARN, UserAtBrowser, fast_timing, login

from fsrepo.auth import (
    PollTiming,
    aws_environment,
    format_status,
    run_login,
    run_logout,
    run_status,
)
from fsrepo.config import load_settings
from fsrepo.errors import AccessDenied, DeviceCodeExpired, InvalidClient, IssuerUnreachable

FAST = fast_timing()


def test_login_status_logout(settings, store, oidc, secret_guard):
    code, out = login(settings, store, oidc)
    assert code == 0
    assert out.result == "Sign-in Success"
    # what the user is shown
    assert f"{oidc.issuer}/device" in out.text
    assert out.user_code and f"enter the code:  {out.user_code}" in out.text
    assert f"{oidc.issuer}/device?user_code={out.user_code}" in out.text  # verification_uri_complete
    assert f"Logged in as alice at {oidc.issuer}." in out.text
    assert "Opened" not in out.text  # --no-browser

    # tokens: private files, written whole
    for path in (store.path, store.web_identity_path, store.lock_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    saved = json.loads(store.path.read_text())
    assert saved["refresh_token"] and saved["id_token"] and saved["subject"] == "alice"
    assert store.web_identity_path.read_text() == saved["id_token"]
    assert not list(store.directory.glob(".*.tmp"))

    # the settings are remembered in the config file, and only they (no tokens)
    config = tomllib.loads(settings.config_file.read_text())
    assert config == {
        "client-id": oidc.client_id,
        "issuer": oidc.issuer,
        "role-arn": ROLE_ARN,
        "scope": "openid offline_access",
    }
    again = load_settings({}, config_file=settings.config_file)
    assert (again.issuer, again.client_id, again.role_arn) == (oidc.issuer, oidc.client_id, ROLE_ARN)

    status = run_status(settings, store=store)
    assert status["logged_in"] and status["user"] == "alice" and status["subject"] == "alice"
    assert status["issuer"] == oidc.issuer and status["role_arn"] == ROLE_ARN
    assert status["can_refresh"] and not status["login_required"]
    assert 3500 < status["id_token_expires_in"] <= 3600
    assert status["token_file_mode"] == "0o600"
    text = format_status(status)
    assert "Logged in as alice" in text and "renewed automatically" in text

    env = aws_environment(settings, store=store)
    assert env == {
        "AWS_ROLE_ARN": ROLE_ARN,
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(store.web_identity_path),
        "AWS_ROLE_SESSION_NAME": "imgrepo-alice",
    }
    secret_guard.texts += [out.text, json.dumps(status), text, json.dumps(env),
                           settings.config_file.read_text()]

    # logout revokes at the provider: the refresh token no longer works there
    refresh_token = saved["refresh_token"]
    assert run_logout(settings, store=store, out=out) == 0
    assert "revoked" in out.text
    assert not store.path.exists() and not store.web_identity_path.exists()
    resp = httpx.post(
        oidc.issuer + "/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": oidc.client_id},
    )
    assert resp.json()["error"] == "invalid_grant"
    assert oidc.stats()["revocations"] >= 1
    assert run_status(settings, store=store)["logged_in"] is False
    assert aws_environment(settings, store=store) == {}
    assert run_logout(settings, store=store, out=out) == 0
    assert "Not logged in." in out.text
    secret_guard.texts.append(out.text)


def test_provider_interval_is_honoured(settings, store, oidc, secret_guard):
    """With no test override, the client waits the provider's `interval` between polls."""
    oidc.configure(interval=1)
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        time.sleep(seconds)

    code, out = login(settings, store, oidc, timing=None, sleep=sleep)
    assert code == 0
    assert slept and all(s == 1 for s in slept)
    polls = oidc.stats()["devicePolls"]
    assert all(b - a >= 0.9 for a, b in zip(polls, polls[1:], strict=False))
    secret_guard.texts.append(out.text)


def test_slow_down_adds_to_the_interval(settings, store, oidc, secret_guard):
    oidc.configure(slowDown=2)
    slept = []

    def sleep(seconds):
        slept.append(round(seconds, 3))
        time.sleep(seconds)

    code, out = login(settings, store, oidc, sleep=sleep)
    assert code == 0
    assert oidc.stats()["token"]["device_code:slow_down"] == 2
    # every slow_down adds one step (5 s in real life) to all later polls
    assert slept[:3] == [0.05, 0.1, 0.15]
    assert set(slept[2:]) == {0.15}
    secret_guard.texts.append(out.text)


def test_expired_token(settings, store, oidc, secret_guard):
    """The provider's own expired_token answer (the client is told the code lives longer)."""
    oidc.configure(ttl={"DeviceCode": 1}, expiresIn=600)
    out = UserAtBrowser(None)
    with pytest.raises(DeviceCodeExpired, match="expired before the login was completed"):
        run_login(settings, no_browser=True, out=out, store=store,
                  timing=PollTiming(interval=0.2), check_role=False)
    assert oidc.stats()["token"].get("device_code:expired_token") == 1
    assert not store.path.exists()
    secret_guard.texts.append(out.text)


def test_access_denied(settings, store, oidc, secret_guard):
    with pytest.raises(AccessDenied, match="denied"):
        login(settings, store, oidc, approve=False)
    assert oidc.stats()["token"].get("device_code:access_denied") == 1
    assert not store.path.exists()


def test_unknown_client(settings, store, oidc):
    from dataclasses import replace

    with pytest.raises(InvalidClient, match="refused client id 'nobody'"):
        run_login(replace(settings, client_id="nobody"), no_browser=True, out=UserAtBrowser(None),
                  store=store, check_role=False)


def test_issuer_unreachable(settings, store):
    from dataclasses import replace

    from testservers.net import free_port

    issuer = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(IssuerUnreachable, match=f"cannot reach the identity provider at {issuer}"):
        run_login(replace(settings, issuer=issuer), no_browser=True, out=UserAtBrowser(None),
                  store=store, check_role=False)


def test_ctrl_c_while_waiting(settings, store, oidc):
    out = UserAtBrowser(None)

    def sleep(seconds):
        raise KeyboardInterrupt

    assert run_login(settings, no_browser=True, out=out, store=store, sleep=sleep, check_role=False) == 130
    assert "Login cancelled" in out.text
    assert not store.path.exists()
    assert not settings.config_file.exists()


def test_browser_is_opened_when_available(settings, store, oidc, secret_guard):
    opened = []

    def opener(url):
        opened.append(url)
        return True

    out = UserAtBrowser(oidc)
    try:
        assert run_login(settings, no_browser=False, out=out, store=store, timing=FAST,
                         open_browser=opener, check_role=False) == 0
    finally:
        out.join()
    assert opened == [f"{oidc.issuer}/device?user_code={out.user_code}"]
    assert "Opened the page in your browser" in out.text
    secret_guard.texts.append(out.text)
