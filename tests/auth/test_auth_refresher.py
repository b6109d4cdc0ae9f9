"""TokenRefresher against the real provider: short-lived ID tokens, rotating refresh tokens,
several processes sharing one login, and a login revoked while "mounted"."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from auth_harness import login, refresher_running, wait_until

from fsrepo.auth import TokenRefresher, format_status, run_status
from fsrepo.auth.oidc import jwt_claims


def test_refresher_keeps_the_web_identity_token_valid(settings, store, oidc, secret_guard):
    oidc.configure(ttl={"IdToken": 3, "AccessToken": 3})
    assert login(settings, store, oidc)[0] == 0
    refresher = TokenRefresher(store=store, watch_interval=0.1)
    seen, left = set(), []
    with refresher_running(refresher):
        end = time.time() + 7
        while time.time() < end:
            token = store.web_identity_path.read_text()
            seen.add(token)
            left.append(jwt_claims(token)["exp"] - time.time())
            time.sleep(0.05)
        state = refresher.state()
    # The file always held a token with time left (exp has whole seconds: allow rounding).
    assert min(left) > -1.0, min(left)
    assert len(seen) >= 3
    assert state.status == "ok" and state.refreshes >= 2 and state.identity == "alice"
    stats = oidc.stats()["token"]
    assert stats["refresh_token:ok"] >= 2 and "refresh_token:invalid_grant" not in stats
    for path in (store.path, store.web_identity_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not list(store.directory.glob(".*.tmp"))
    secret_guard.add(*seen)


REFRESHER_PROCESS = textwrap.dedent(
    """
    import json, sys, trio
    from fsrepo.auth import TokenRefresher, TokenStore

    async def main():
        refresher = TokenRefresher(store=TokenStore(sys.argv[1]), watch_interval=0.05)
        with trio.move_on_after(float(sys.argv[2])):
            await refresher.run()
        state = refresher.state()
        print(json.dumps({"status": state.status, "refreshes": state.refreshes}))

    trio.run(main)
    """
)


def test_processes_sharing_a_login_never_reuse_a_refresh_token(settings, store, oidc, secret_guard):
    """oidc-provider revokes the whole grant when a rotated refresh token is used twice: three
    mounts refreshing the same login for several token lifetimes must never trigger that."""
    oidc.configure(ttl={"IdToken": 2, "AccessToken": 2})
    assert login(settings, store, oidc)[0] == 0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REFRESHER_PROCESS, str(store.directory), "6"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
        secret_guard.texts.append(out + err)
    stats = oidc.stats()["token"]
    assert "refresh_token:invalid_grant" not in stats, stats
    assert all(r["status"] == "ok" for r in results), results
    total = sum(r["refreshes"] for r in results)
    assert total >= 3 and stats["refresh_token:ok"] == total
    assert not run_status(settings, store=store)["login_required"]


@pytest.mark.expected_logs(r"login required", reason="the login is revoked on purpose")
def test_revoked_login_asks_for_login_and_resumes_after_it(settings, store, oidc, secret_guard, caplog):
    oidc.configure(ttl={"IdToken": 2, "AccessToken": 2})
    assert login(settings, store, oidc)[0] == 0
    refresher = TokenRefresher(store=store, watch_interval=0.1)
    with refresher_running(refresher):
        assert wait_until(lambda: refresher.state().refreshes >= 1, 5)
        # The grant is revoked at the provider (by an administrator, or the token expired).
        with store.locked():
            oidc.revoke(json.loads(store.path.read_text())["refresh_token"])
        assert wait_until(lambda: refresher.state().login_required, 5)
        state = refresher.state()
        assert "imgrepo-mount --login" in state.message and "invalid_grant" in state.message

        status = run_status(settings, store=store)
        assert status["login_required"] and not status["can_refresh"]
        assert "invalid_grant" in status["login_required_reason"]
        assert "LOGIN REQUIRED" in format_status(status)
        warnings = [r for r in caplog.records if r.name == "fsrepo.auth.refresher" and r.levelname == "WARNING"]
        assert len(warnings) == 1 and "login required" in warnings[0].getMessage()

        time.sleep(0.5)  # still waiting, not hammering the provider
        assert oidc.stats()["token"].get("refresh_token:invalid_grant") == 1

        # A new login, while the "mount" keeps running: picked up without a restart.
        code, out = login(settings, store, oidc)
        assert code == 0
        assert wait_until(lambda: refresher.state().status == "ok", 5)
        before = refresher.state().refreshes
        assert wait_until(lambda: refresher.state().refreshes > before, 5)
        assert any("found a new login" in r.getMessage() for r in caplog.records)
    assert not run_status(settings, store=store)["login_required"]
    secret_guard.texts.append(out.text)
