"""Turning token responses into stored logins, and the one place that refreshes them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import httpx

from ..errors import LoginError
from .oidc import (
    GrantRejected,
    ProviderInfo,
    TransientError,
    check_id_token,
    jwt_claims,
    refresh_tokens,
)
from .store import StoredLogin, TokenStore

log = logging.getLogger(__name__)

_IDENTITY_CLAIMS = ("name", "email", "preferred_username")


def _refresh_expiry(response: dict[str, Any], received_at: float) -> float | None:
    """The refresh token's end, for providers that announce it (non-standard names)."""
    for key in ("refresh_expires_in", "refresh_token_expires_in"):
        try:
            seconds = float(response[key])
        except (KeyError, TypeError, ValueError):
            continue
        if seconds > 0:  # Keycloak says 0 for offline tokens without a limit
            return received_at + seconds
    return None


def _id_token_times(claims: dict[str, Any], received_at: float) -> tuple[float, float]:
    """(local expiry, lifetime). Measured from when we received the token, with the
    provider's own exp - iat, so that a skewed clock on either side does not matter."""
    exp = float(claims["exp"])
    iat = claims.get("iat")
    lifetime = exp - float(iat) if isinstance(iat, int | float) else exp - received_at
    lifetime = max(lifetime, 0.0)
    return received_at + lifetime, lifetime


def login_from_token_response(
    provider: ProviderInfo,
    client_id: str,
    scope: str,
    role_arn: str | None,
    response: dict[str, Any],
    received_at: float,
) -> StoredLogin:
    id_token = response.get("id_token")
    if not id_token:
        raise LoginError(
            "the identity provider returned no ID token: the scope must include 'openid' "
            f"(it is {scope!r})"
        )
    claims = jwt_claims(str(id_token))
    check_id_token(claims, provider.issuer, client_id)
    expires_at, lifetime = _id_token_times(claims, received_at)
    return StoredLogin(
        issuer=provider.issuer,
        client_id=client_id,
        scope=scope,
        token_endpoint=provider.token_endpoint,
        revocation_endpoint=provider.revocation_endpoint,
        role_arn=role_arn,
        subject=str(claims["sub"]),
        identity={k: str(claims[k]) for k in _IDENTITY_CLAIMS if claims.get(k)},
        id_token=str(id_token),
        id_token_expires_at=expires_at,
        id_token_lifetime=lifetime,
        access_token=str(response.get("access_token") or ""),
        refresh_token=str(response["refresh_token"]) if response.get("refresh_token") else None,
        refresh_token_expires_at=_refresh_expiry(response, received_at),
        logged_in_at=received_at,
    )


def apply_refresh(login: StoredLogin, response: dict[str, Any], received_at: float) -> StoredLogin:
    """The login after a successful refresh grant. A provider that does not rotate refresh
    tokens sends none back: the old one stays valid then (RFC 6749 §6)."""
    changes: dict[str, Any] = {
        "access_token": str(response.get("access_token") or login.access_token),
        "refresh_token": str(response.get("refresh_token") or login.refresh_token or "") or None,
        "refreshed_at": received_at,
        "refreshes": login.refreshes + 1,
    }
    if response.get("refresh_token"):
        changes["refresh_token_expires_at"] = _refresh_expiry(response, received_at)
    id_token = response.get("id_token")
    if id_token:
        claims = jwt_claims(str(id_token))
        check_id_token(claims, login.issuer, login.client_id)
        if str(claims["sub"]) != login.subject:
            raise LoginError("the refreshed ID token names a different user; log in again")
        expires_at, lifetime = _id_token_times(claims, received_at)
        changes.update(
            id_token=str(id_token),
            id_token_expires_at=expires_at,
            id_token_lifetime=lifetime,
            identity={k: str(claims[k]) for k in _IDENTITY_CLAIMS if claims.get(k)}
            or login.identity,
        )
    else:
        log.warning(
            "the identity provider refreshed the login without a new ID token; "
            "AWS credentials stop refreshing when the current one expires"
        )
    return replace(login, **changes)


@dataclass(frozen=True)
class RefreshOutcome:
    """What `refresh_under_lock` did. `kind` is one of:
    refreshed   we refreshed; `login` is the new login
    fresh       nothing to do (another process refreshed, or not due yet)
    none        nobody is logged in (logout happened)
    login_required   the login is dead (now, or already marked so)
    no_refresh_token the login has no refresh token: nothing can be done until it expires
    transient   the provider could not be reached or failed; try again later
    """

    kind: str
    login: StoredLogin | None
    message: str = ""
    signature: tuple[int, int, int] | None = None  # of tokens.json, taken under the lock


def refresh_under_lock(
    store: TokenStore,
    http: httpx.Client,
    *,
    known_refresh_token: str | None,
    force: bool = False,
    now: float | None = None,
) -> RefreshOutcome:
    """Refresh the login if it is due, holding the store's lock from re-reading the file to
    writing the rotated refresh token. `known_refresh_token` is the one the caller saw: if the
    file holds another one, some other process refreshed (or the user logged in again) and no
    request is made. The provider is never sent a refresh token that is not the newest."""
    with store.locked():
        outcome = _refresh_locked(store, http, known_refresh_token, force, now)
        return replace(outcome, signature=store.signature())


def _refresh_locked(
    store: TokenStore,
    http: httpx.Client,
    known_refresh_token: str | None,
    force: bool,
    now: float | None,
) -> RefreshOutcome:
    login = store.load()
    if login is None:
        return RefreshOutcome("none", None)
    if login.login_required:
        store.write_web_identity_token(login.id_token)
        return RefreshOutcome("login_required", login, str(login.login_required.get("reason", "")))
    if not login.refresh_token:
        store.write_web_identity_token(login.id_token)
        return RefreshOutcome("no_refresh_token", login)
    current = time.time() if now is None else now
    someone_else = known_refresh_token is not None and login.refresh_token != known_refresh_token
    if someone_else or (not force and current < login.refresh_due_at()):
        store.write_web_identity_token(login.id_token)
        return RefreshOutcome("fresh", login)
    try:
        response = refresh_tokens(http, login.token_endpoint, login.client_id, login.refresh_token)
    except GrantRejected as exc:
        reason = f"the identity provider rejected the refresh token ({exc})"
        dead = store.mark_login_required(login, reason)
        return RefreshOutcome("login_required", dead, reason)
    except TransientError as exc:
        return RefreshOutcome("transient", login, str(exc))
    received_at = time.time()
    try:
        new = apply_refresh(login, response, received_at)
    except LoginError as exc:
        # Keep the rotated refresh token anyway, or the next attempt would reuse the
        # old one (and the provider would revoke the grant).
        if response.get("refresh_token"):
            login = replace(login, refresh_token=str(response["refresh_token"]))
            store.save(login)
        return RefreshOutcome("transient", login, str(exc))
    store.save(new)
    store.write_web_identity_token(new.id_token)
    return RefreshOutcome("refreshed", new)
