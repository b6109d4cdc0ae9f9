"""Fixtures for the login tests: a real OIDC provider (node, oidc-provider), a moto server of
their own (`auth_moto`, apart from the suite-wide one), an isolated home directory, and a
guard that fails a test if any token text reaches its output or its logs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from auth_harness import ROLE_ARN, AwsEdge, MotoServer, OidcProvider, SecretGuard  # noqa: E402

from fsrepo.auth import TokenRedactingFilter, TokenStore  # noqa: E402
from fsrepo.auth import commands as auth_commands  # noqa: E402
from fsrepo.auth import store as auth_store  # noqa: E402
from fsrepo.config import Settings  # noqa: E402

_AWS_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_STS", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "IMGREPO_ISSUER", "IMGREPO_CLIENT_ID",
    "IMGREPO_ROLE_ARN", "IMGREPO_CONFIG", "BROWSER",
)

@pytest.fixture(autouse=True)
def auth_home(tmp_path, monkeypatch):
    """A private home: config dir, no AWS credentials or config, no browser."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    return home


@pytest.fixture(scope="session")
def oidc_server():
    provider = OidcProvider()
    yield provider
    provider.stop()


@pytest.fixture
def oidc(oidc_server):
    oidc_server.reset()
    return oidc_server


@pytest.fixture(scope="session")
def auth_moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def auth_moto(auth_moto_server):
    auth_moto_server.reset()
    return auth_moto_server


@pytest.fixture
def edge(auth_moto, oidc):
    """The AWS edge (STS + S3 behind a token check) whose credentials last 1.5 s."""
    edge = AwsEdge(auth_moto.url, oidc.issuer, oidc.client_id, usable=1.5, grace=1.0)
    yield edge
    edge.stop()


@pytest.fixture
def store(auth_home):
    """The token store in the private home (overrides the suite-wide `store` in tests/auth)."""
    return TokenStore(auth_home / ".config" / "imgrepo")


@pytest.fixture
def settings(oidc, auth_home):
    return Settings(
        issuer=oidc.issuer,
        client_id=oidc.client_id,
        role_arn=ROLE_ARN,
        config_file=auth_home / ".config" / "imgrepo" / "config.toml",
    )


@pytest.fixture
def secret_guard(monkeypatch, capsys, caplog):
    guard = SecretGuard()
    original_save = auth_store.TokenStore.save

    def save(self, login):
        guard.add(login.id_token, login.access_token, login.refresh_token)
        return original_save(self, login)

    monkeypatch.setattr(auth_store.TokenStore, "save", save)
    original_start = auth_commands.start_device_authorization

    def start(*args, **kwargs):
        auth = original_start(*args, **kwargs)
        guard.add(auth.device_code)
        return auth

    monkeypatch.setattr(auth_commands, "start_device_authorization", start)

    raw = logging.StreamHandler(guard.raw_log)
    raw.setLevel(logging.DEBUG)
    raw.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("fsrepo", "httpx", "httpcore")]
    old_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(raw)
        lg.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(TokenRedactingFilter())
    yield guard
    for lg, level in zip(loggers, old_levels, strict=True):
        lg.removeHandler(raw)
        lg.setLevel(level)
    captured = capsys.readouterr()
    guard.scan(captured.out, captured.err, caplog.text)
