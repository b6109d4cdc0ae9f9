"""`--status`'s login part: who is logged in, until when, and where the mount's AWS
credentials come from. Kept apart from the login commands so that a status needs no HTTP
client: it only reads the token store."""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

from ..config import Settings
from .store import TokenStore

# Variables that make botocore use other credentials before the web identity (its chain
# looks at the environment first): shown by --status so a login that is not used is no surprise.
_ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE")


def run_status(settings: Settings, *, store: TokenStore | None = None) -> dict[str, Any]:
    """Who is logged in and until when, and what the mount's AWS credentials come from.
    No secrets. Keys: logged_in, and when logged in: user, subject, email, issuer, client_id,
    role_arn, id_token_expires_at (epoch), id_token_expires_in (s), can_refresh,
    refresh_token_expires_at (epoch or None: the provider did not say), login_required (bool),
    login_required_reason, login_required_since, last_refresh_at,
    token_file, token_file_mode, web_identity_token_file, aws_credentials (a sentence)."""
    store = store or TokenStore()
    login = store.load()
    env_creds = [name for name in _ENV_CREDENTIALS if os.environ.get(name)]
    status: dict[str, Any] = {"logged_in": login is not None, "token_file": str(store.path)}
    if login is None:
        status["issuer"] = settings.issuer
        status["client_id"] = settings.client_id
        status["role_arn"] = settings.role_arn
        status["aws_credentials"] = (
            "no login: the mount uses plain AWS credentials (environment, profile, instance role)"
        )
        return status
    now = time.time()
    dead = login.login_required or None
    expired = login.seconds_left(now) <= 0
    status.update(
        user=login.display_name(),
        subject=login.subject,
        email=login.identity.get("email"),
        issuer=login.issuer,
        client_id=login.client_id,
        role_arn=login.role_arn or settings.role_arn,
        id_token_expires_at=login.id_token_expires_at,
        id_token_expires_in=round(login.seconds_left(now), 1),
        can_refresh=bool(login.refresh_token) and not dead,
        refresh_token_expires_at=login.refresh_token_expires_at,
        login_required=bool(dead) or (expired and not login.refresh_token),
        login_required_reason=(dead or {}).get("reason"),
        login_required_since=(dead or {}).get("since"),
        last_refresh_at=login.refreshed_at,
        token_file_mode=_mode(store.path),
        web_identity_token_file=str(store.web_identity_path),
    )
    if env_creds:
        status["aws_credentials"] = (
            f"{' and '.join(env_creds)} set in the environment: botocore uses those, not the login"
        )
    elif status["login_required"]:
        status["aws_credentials"] = (
            "login required: AWS credentials cannot be renewed; run imgrepo-mount --login "
            "(running mounts resume by themselves afterwards)"
        )
    else:
        status["aws_credentials"] = (
            f"temporary credentials for {status['role_arn']} from STS AssumeRoleWithWebIdentity, "
            "renewed automatically while mounted"
        )
    return status


def _mode(path: os.PathLike[str]) -> str | None:
    try:
        return oct(os.stat(path).st_mode & 0o777)
    except OSError:
        return None


def format_status(status: dict[str, Any]) -> str:
    """`run_status`'s dict as the lines `--status` prints."""
    if not status.get("logged_in"):
        return "Not logged in.\nAWS credentials: " + status["aws_credentials"]
    lines = [f"Logged in as {status['user']} at {status['issuer']} (client {status['client_id']})."]
    if status["login_required"]:
        lines.append("LOGIN REQUIRED: the login has expired or was revoked; run imgrepo-mount --login")
        if status.get("login_required_reason"):
            lines.append(f"  ({status['login_required_reason']}, since {format_when(status['login_required_since'])})")
    else:
        left = float(status["id_token_expires_in"])
        lines.append(f"ID token valid until {format_when(status['id_token_expires_at'])} ({_in(left)}).")
        if not status["can_refresh"]:
            lines.append("It cannot be renewed (no refresh token): log in again before it ends.")
        elif status.get("refresh_token_expires_at"):
            lines.append("It is renewed automatically while mounted, until "
                         f"{format_when(status['refresh_token_expires_at'])} (then log in again).")
        else:
            lines.append("It is renewed automatically while mounted.")
    if status.get("last_refresh_at"):
        lines.append(f"Last renewed {format_when(status['last_refresh_at'])}.")
    lines.append(f"AWS credentials: {status['aws_credentials']}.")
    lines.append(f"Tokens: {status['token_file']} (mode {status['token_file_mode']}).")
    return "\n".join(lines)


def format_when(epoch: float | None) -> str:
    if epoch is None:
        return "unknown"
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _in(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 0:
        return f"expired {format_duration(-seconds)} ago"
    return f"in {format_duration(seconds)}"


def format_duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


__all__ = ["format_duration", "format_status", "format_when", "run_status"]
