"""AWS credentials from the login, at the boto3 level: a client configured only through
aws_environment() keeps working across several credential and ID-token expiries, stops
when the login is revoked, and resumes -- same client, no restart -- after a new login.

STS and S3 are moto's server behind the "AWS edge" of auth_harness, which makes the
credentials expire for real within seconds and checks every web-identity token the way
AWS does (see its docstring for why moto alone cannot show this)."""

from __future__ import annotations

import json
import time

import boto3
import botocore.exceptions
import pytest
from auth_harness import UserAtBrowser, fast_timing, refresher_running, wait_until
from botocore.config import Config

from fsrepo.auth import TokenRefresher, aws_environment, run_login, run_status

BUCKET = "imgrepo-auth-test"


def s3_client(endpoint):
    # retries off: a request that fails must show here, not be retried into success
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 1})
    )


def roundtrip(s3, i):
    body = f"photo {i}".encode() * 100
    s3.put_object(Bucket=BUCKET, Key=f"p/{i}.jpg", Body=body)
    assert s3.get_object(Bucket=BUCKET, Key=f"p/{i}.jpg")["Body"].read() == body


@pytest.mark.expected_logs(r"login required", r"Refreshing temporary credentials failed", reason="the login is revoked on purpose, so botocore's advisory refresh fails until the new login")
def test_credentials_refresh_across_expiries_and_resume_after_new_login(
    settings, store, oidc, auth_moto, edge, monkeypatch, secret_guard
):
    boto3.client(
        "s3", endpoint_url=auth_moto.url, aws_access_key_id="admin", aws_secret_access_key="admin"
    ).create_bucket(Bucket=BUCKET)
    oidc.configure(ttl={"IdToken": 4, "AccessToken": 4})
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", edge.url)

    # --login checks the role with STS once (through the edge, which verifies the token)
    out = UserAtBrowser(oidc)
    try:
        assert run_login(settings, no_browser=True, out=out, store=store, timing=fast_timing()) == 0
    finally:
        out.join()
    assert "credentials granted" in out.text
    assert edge.record.sts[-1].ok

    env = aws_environment(settings, store=store)
    assert set(env) == {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_SESSION_NAME"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3 = s3_client(edge.url)
    assert s3._request_signer._credentials.method == "assume-role-with-web-identity"

    refresher = TokenRefresher(store=store, watch_interval=0.1)
    with refresher_running(refresher):
        # 1. Several expiries: credentials live 1.5 s (+1 s grace), ID tokens 4 s.
        sts_before = len(edge.record.sts)
        start, i = time.time(), 0
        while time.time() - start < 10:
            roundtrip(s3, i)
            i += 1
            time.sleep(0.05)
        calls = edge.record.sts[sts_before:]
        assert len(calls) >= 4, calls  # botocore assumed the role again and again
        assert all(c.ok for c in calls), calls
        assert len({c.token_sha for c in calls}) >= 2  # ... with the refreshed ID tokens
        assert edge.record.s3_rejected == 0
        assert refresher.state().refreshes >= 2
        assert oidc.stats()["token"]["refresh_token:ok"] >= 2

        # 2. The login is revoked: the refresher says so, S3 calls start failing.
        with store.locked():
            oidc.revoke(json.loads(store.path.read_text())["refresh_token"])
        assert wait_until(lambda: refresher.state().login_required, 6)
        failure = None
        deadline = time.time() + 15
        while time.time() < deadline and failure is None:
            try:
                roundtrip(s3, i)
                i += 1
            except botocore.exceptions.ClientError as exc:
                failure = exc
            time.sleep(0.1)
        assert failure is not None, "credentials outlived a revoked login"
        assert failure.response["Error"]["Code"] == "ExpiredToken"
        assert any(not c.ok and c.error == "ExpiredTokenException" for c in edge.record.sts)
        assert run_status(settings, store=store)["login_required"]

        # 3. A new login: the same client works again, without being recreated.
        out = UserAtBrowser(oidc)
        try:
            assert run_login(settings, no_browser=True, out=out, store=store, timing=fast_timing(),
                             check_role=False) == 0
        finally:
            out.join()
        resumed = None
        deadline = time.time() + 10
        while time.time() < deadline and resumed is None:
            try:
                roundtrip(s3, i)
                resumed = time.time()
            except botocore.exceptions.ClientError:
                time.sleep(0.1)
        assert resumed is not None, "S3 did not resume after the new login"
        assert wait_until(lambda: refresher.state().status == "ok", 3)
        for j in range(i + 1, i + 20):  # and keeps working
            roundtrip(s3, j)
            time.sleep(0.05)
    assert not run_status(settings, store=store)["login_required"]
    secret_guard.texts.append(out.text)
