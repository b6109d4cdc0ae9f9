"""The entry points the CLI calls: --login, --logout, --status, and the mount's AWS setup."""

from __future__ import annotations

import os
import re
import sys
import time
import webbrowser
from collections.abc import Callable
from typing import TextIO

import httpx

from ..config import Settings, check_config_values, write_config_values
from ..errors import ConfigError, LoginError
from .oidc import (
    PollTiming,
    check_issuer_url,
    discover,
    new_http_client,
    poll_for_tokens,
    revoke_token,
    start_device_authorization,
)
from .status import format_duration, format_status, format_when, run_status
from .store import StoredLogin, TokenStore
from .tokens import login_from_token_response

_ROLE_ARN_RE = re.compile(r"arn:[\w-]+:iam::\d{12}:role/[\w+=,.@/-]{1,512}")  # fullmatch
_CONSOLE_BROWSERS = {"www-browser", "links", "links2", "elinks", "lynx", "w3m"}


def _print(out: TextIO, text: str = "") -> None:
    out.write(text + "\n")
    out.flush()


def browser_available() -> bool:
    """True when a graphical browser can be opened: never a text browser in this terminal,
    never on a server without a display."""
    if sys.platform.startswith("linux") or "bsd" in sys.platform:
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            return bool(os.environ.get("BROWSER"))
    try:
        controller = webbrowser.get()
    except webbrowser.Error:
        return False
    name = os.path.basename(str(getattr(controller, "name", "") or ""))
    return name not in _CONSOLE_BROWSERS


def _open_browser(url: str) -> bool:
    try:
        return bool(webbrowser.open(url, new=1, autoraise=True))
    except webbrowser.Error:
        return False


def _check_role_arn(role_arn: str) -> None:
    if not _ROLE_ARN_RE.fullmatch(role_arn):
        raise ConfigError(
            f"--role-arn {role_arn!r} is not an IAM role ARN "
            "(arn:aws:iam::123456789012:role/NAME)"
        )


def run_login(
    settings: Settings,
    *,
    no_browser: bool,
    out: TextIO = sys.stdout,
    store: TokenStore | None = None,
    http: httpx.Client | None = None,
    timing: PollTiming | None = None,
    sleep: Callable[[float], None] = time.sleep,
    open_browser: Callable[[str], bool] | None = None,
    check_role: bool = True,
) -> int:
    """`imgrepo-mount --login`: discovery, the device flow, save the tokens, remember the
    settings. Returns the exit code (0, or 130 after Ctrl-C); raises ImgrepoError subclasses
    for everything that can go wrong (each with a one-line message).

    The keyword arguments after `out` are for tests: the token store, an HTTP client, a poll
    timing that replaces the provider's interval, a sleep function, a browser opener, and
    whether to try the role with STS once (on by default: a wrong trust policy is then
    reported at login, not at the first upload).
    """
    if not settings.issuer:
        raise ConfigError(
            "--login needs the identity provider's URL: --issuer https://login.example.com "
            "(remembered afterwards)"
        )
    if not settings.client_id:
        raise ConfigError("--login needs --client-id (the OIDC client registered for imgrepo)")
    if not settings.role_arn:
        raise ConfigError(
            "--login needs --role-arn (the IAM role to assume with the login, "
            "arn:aws:iam::123456789012:role/NAME)"
        )
    _check_role_arn(settings.role_arn)
    issuer = check_issuer_url(settings.issuer)
    scope = settings.scope or "openid offline_access"
    if "openid" not in scope.split():
        raise ConfigError(f"--scope must include 'openid' (got {scope!r})")
    remembered = {"issuer": issuer, "client_id": settings.client_id,
                  "role_arn": settings.role_arn, "scope": scope}
    check_config_values(remembered)  # refused now, not after the user logged in
    store = store or TokenStore()
    own_http = http is None
    http = http or new_http_client()
    try:
        login = _device_login(settings, issuer, scope, no_browser, out, http, timing, sleep,
                              open_browser)
    except KeyboardInterrupt:
        _print(out, "")
        _print(out, "Login cancelled; nothing was changed.")
        return 130
    finally:
        if own_http:
            http.close()

    with store.locked():
        store.save(login)
        store.write_web_identity_token(login.id_token)
    write_config_values(settings.config_file, remembered)
    _print(out, f"Logged in as {login.display_name()} at {issuer}.")
    _print(out, f"Tokens saved in {store.path} (readable only by you).")
    if login.refresh_token:
        _print(out, f"The login is renewed automatically while imgrepo runs; it is valid until "
               f"{format_when(login.id_token_expires_at)} if nothing renews it.")
    else:
        _print(out, "Warning: the provider issued no refresh token (add offline_access to --scope, "
               f"or allow refresh tokens for the client): the login ends at "
               f"{format_when(login.id_token_expires_at)}.")
    if check_role:
        note = _try_role(login, settings.region)
        if note:
            _print(out, note)
    return 0


def _device_login(
    settings: Settings,
    issuer: str,
    scope: str,
    no_browser: bool,
    out: TextIO,
    http: httpx.Client,
    timing: PollTiming | None,
    sleep: Callable[[float], None],
    open_browser: Callable[[str], bool] | None,
) -> StoredLogin:
    assert settings.client_id is not None
    provider = discover(http, issuer)
    auth = start_device_authorization(http, provider, settings.client_id, scope)
    _print(out, f"To log in to {issuer}, open this page in a browser:")
    _print(out, f"    {auth.verification_uri}")
    _print(out, f"and enter the code:  {auth.user_code}")
    if auth.verification_uri_complete:
        _print(out, f"(or open {auth.verification_uri_complete} , which fills in the code)")
    if not no_browser and (open_browser is not None or browser_available()):
        target = auth.verification_uri_complete or auth.verification_uri
        if (open_browser or _open_browser)(target):
            _print(out, "Opened the page in your browser; check that it shows the same code.")
        else:
            _print(out, "(Could not open a browser; open the page yourself.)")
    _print(out, f"Waiting for the login (the code is valid for {format_duration(int(auth.expires_in))}; "
           "Ctrl-C cancels)...")
    response = poll_for_tokens(
        http,
        provider,
        settings.client_id,
        auth,
        timing=timing or PollTiming(),
        sleep=sleep,
        notice=lambda text: _print(out, text),
    )
    return login_from_token_response(
        provider, settings.client_id, scope, settings.role_arn, response, time.time()
    )


def _try_role(login: StoredLogin, region: str | None) -> str:
    """One AssumeRoleWithWebIdentity, so that a role that refuses this login is reported now.
    Returns a line to print ("" when nothing worth saying); raises LoginError if refused."""
    import boto3
    import botocore.exceptions
    from botocore import UNSIGNED
    from botocore.config import Config

    try:
        session = boto3.session.Session()
        sts = session.client(
            "sts",
            region_name=region or session.region_name or "us-east-1",
            config=Config(
                signature_version=UNSIGNED,
                connect_timeout=5,
                read_timeout=10,
                retries={"max_attempts": 1},
            ),
        )
        resp = sts.assume_role_with_web_identity(
            RoleArn=login.role_arn,
            RoleSessionName=session_name(login),
            WebIdentityToken=login.id_token,
        )
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        raise LoginError(
            f"logged in, but AWS STS refused to let this login assume {login.role_arn}: "
            f"{error.get('Code', 'error')}: {error.get('Message', '')} "
            "(check the role's trust policy: it must trust this identity provider and client id)"
        ) from None
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        return f"Note: could not check the role with AWS STS now ({exc}); the mount will try."
    expiry = resp.get("Credentials", {}).get("Expiration")
    stamp = expiry.timestamp() if hasattr(expiry, "timestamp") else None
    return f"AWS role {login.role_arn}: credentials granted (renewed automatically; first set valid until {format_when(stamp)})."


def session_name(login: StoredLogin) -> str:
    """RoleSessionName for STS: 2-64 characters of [\\w+=,.@-], naming the user (it shows
    in CloudTrail)."""
    who = login.identity.get("preferred_username") or login.identity.get("email") or login.subject
    name = "imgrepo-" + re.sub(r"[^\w+=,.@-]", "_", who, flags=re.ASCII)
    return name[:64]


def run_logout(settings: Settings, *, out: TextIO = sys.stdout, store: TokenStore | None = None,
               http: httpx.Client | None = None) -> int:
    """`imgrepo-mount --logout`: revoke the tokens where the provider supports it, then
    delete them (also when the provider cannot be reached). Settings stay remembered."""
    store = store or TokenStore()
    own_http = http is None
    http = http or new_http_client()
    try:
        with store.locked():
            login = store.load()
            if login is None:
                store.delete()
                _print(out, "Not logged in.")
                return 0
            revoked: bool | None = None
            if login.revocation_endpoint:
                revoked = True
                if login.refresh_token:
                    revoked &= revoke_token(http, login.revocation_endpoint, login.client_id,
                                            login.refresh_token, "refresh_token")
                if login.access_token:
                    revoked &= revoke_token(http, login.revocation_endpoint, login.client_id,
                                            login.access_token, "access_token")
            store.delete()
    finally:
        if own_http:
            http.close()
    _print(out, f"Logged out {login.display_name()} from {login.issuer}; the stored tokens are deleted.")
    if revoked is None:
        _print(out, "The provider offers no token revocation: the tokens stay valid there until they expire.")
    elif not revoked:
        _print(out, "Warning: the provider could not be reached or refused to revoke the tokens; "
               "they stay valid there until they expire.")
    else:
        _print(out, "The tokens were revoked at the provider.")
    return 0


def aws_environment(settings: Settings, *, store: TokenStore | None = None) -> dict[str, str]:
    """The variables the mount sets (os.environ.update) before creating its boto3 client, so
    that botocore's web-identity provider assumes the role itself and re-reads the token file
    at every refresh. Empty when nobody is logged in (plain AWS credentials then work as
    ever). Also returned while the login is marked "login required": the mount must be set
    up for web identity so that a later --login resumes it without a remount."""
    store = store or TokenStore()
    login = store.load()
    if login is None:
        return {}
    role_arn = login.role_arn or settings.role_arn
    if not role_arn:
        return {}
    if not store.web_identity_path.exists():
        with store.locked():
            current = store.load()
            if current is not None:
                store.write_web_identity_token(current.id_token)
    return {
        "AWS_ROLE_ARN": role_arn,
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(store.web_identity_path),
        "AWS_ROLE_SESSION_NAME": session_name(login),
    }


def apply_login_environment(settings: Settings) -> None:
    """With a device-flow login and S3 storage, let botocore assume the role with our ID
    token file: `aws_environment` put into this process's environment."""
    if settings.storage.startswith("s3://"):
        os.environ.update(aws_environment(settings))


__all__ = [
    "apply_login_environment",
    "aws_environment",
    "browser_available",
    "format_status",
    "run_login",
    "run_logout",
    "run_status",
    "session_name",
]
