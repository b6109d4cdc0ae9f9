"""The HTTP side of logging in: OIDC discovery, the RFC 8628 device flow, the refresh grant
and RFC 7009 revocation. Synchronous httpx; the trio refresher runs these in a thread.

Nothing here logs or formats a token. Error messages carry the provider's `error` code and
(shortened) `error_description`, never a request body.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import (
    AccessDenied,
    ConfigError,
    DeviceCodeExpired,
    DiscoveryError,
    InvalidClient,
    IssuerUnreachable,
    LoginError,
)

log = logging.getLogger(__name__)

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_INTERVAL = 5.0  # RFC 8628 §3.2: when the provider sends no `interval`
SLOW_DOWN_STEP = 5.0  # RFC 8628 §3.5: `slow_down` adds 5 seconds to every later poll
MAX_INTERVAL = 60.0
DEFAULT_DEVICE_CODE_LIFETIME = 600.0  # when the provider sends no `expires_in`
HTTP_TIMEOUT = httpx.Timeout(20.0, connect=10.0)


def new_http_client() -> httpx.Client:
    return httpx.Client(timeout=HTTP_TIMEOUT, headers={"User-Agent": "imgrepo"})


def _short(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_issuer_url(issuer: str) -> str:
    """The issuer without a trailing slash; https only, except on the loopback interface."""
    issuer = issuer.strip().rstrip("/")
    parts = urlsplit(issuer)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"--issuer must be an https:// URL, not {issuer!r}")
    if parts.scheme == "http":
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(
                f"--issuer {issuer} uses plain http: tokens would cross the network "
                "unencrypted; use https:// (http is allowed only on localhost)"
            )
    if parts.query or parts.fragment:
        raise ConfigError(f"--issuer must not have a query or fragment: {issuer!r}")
    return issuer


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return _short(text, 160)


@dataclass(frozen=True)
class ProviderInfo:
    """What discovery tells us about an OpenID Connect provider."""

    issuer: str
    device_authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str | None = None


def discover(http: httpx.Client, issuer: str) -> ProviderInfo:
    """Reads `<issuer>/.well-known/openid-configuration` (OpenID Connect Discovery 1.0)."""
    issuer = check_issuer_url(issuer)
    url = issuer + "/.well-known/openid-configuration"
    try:
        resp = http.get(url, follow_redirects=True)
    except httpx.TransportError as exc:
        raise IssuerUnreachable(
            f"cannot reach the identity provider at {issuer}: {_reason(exc)}"
        ) from None
    if resp.status_code != 200:
        raise DiscoveryError(
            f"{issuer} is not an OpenID Connect provider: {url} answered HTTP "
            f"{resp.status_code} (check --issuer)"
        )
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise DiscoveryError(f"{url} did not return a JSON discovery document (check --issuer)")
    announced = str(doc.get("issuer", "")).rstrip("/")
    if announced != issuer:
        raise DiscoveryError(
            f"the discovery document at {url} names a different issuer ({announced or 'none'}); "
            "use exactly that URL as --issuer"
        )
    device = doc.get("device_authorization_endpoint")
    if not device:
        raise DiscoveryError(
            f"the identity provider at {issuer} does not offer the device login flow "
            "(its discovery document has no device_authorization_endpoint); "
            "ask its administrator to enable the OAuth 2.0 device authorization grant"
        )
    token = doc.get("token_endpoint")
    if not token:
        raise DiscoveryError(f"the discovery document of {issuer} has no token_endpoint")
    return ProviderInfo(
        issuer=issuer,
        device_authorization_endpoint=str(device),
        token_endpoint=str(token),
        revocation_endpoint=str(doc["revocation_endpoint"]) if doc.get("revocation_endpoint") else None,
    )


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    """(`error`, `error_description`) of an OAuth error response, or ("", "") if none."""
    try:
        body = resp.json()
    except ValueError:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    return str(body.get("error") or ""), _short(body.get("error_description") or "")


def _describe(error: str, description: str) -> str:
    return f"{error}: {description}" if description else error


@dataclass(frozen=True)
class DeviceAuthorization:
    """The provider's answer to a device authorization request (RFC 8628 §3.2)."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float | None

    def __repr__(self) -> str:  # the device code is a credential: keep it out of reprs
        return f"DeviceAuthorization(user_code={self.user_code!r}, uri={self.verification_uri!r})"


def start_device_authorization(
    http: httpx.Client, provider: ProviderInfo, client_id: str, scope: str
) -> DeviceAuthorization:
    try:
        resp = http.post(
            provider.device_authorization_endpoint, data={"client_id": client_id, "scope": scope}
        )
    except httpx.TransportError as exc:
        raise IssuerUnreachable(
            f"cannot reach the identity provider at {provider.issuer}: {_reason(exc)}"
        ) from None
    if resp.status_code != 200:
        error, description = _error_of(resp)
        if error in ("invalid_client", "unauthorized_client"):
            raise InvalidClient(
                f"the identity provider at {provider.issuer} refused client id {client_id!r} "
                f"({_describe(error, description)}); check --client-id, and that the client "
                "is a public client allowed to use the device flow"
            )
        if error == "invalid_scope":
            raise LoginError(
                f"the identity provider refused the scope {scope!r} ({_describe(error, description)}); "
                "check --scope"
            )
        raise LoginError(
            f"the identity provider refused to start a device login: "
            f"{_describe(error, description) if error else f'HTTP {resp.status_code}'}"
        )
    try:
        body = resp.json()
        device_code = str(body["device_code"])
        user_code = str(body["user_code"])
        # "verification_url" is a pre-standard spelling some providers still send
        uri = str(body.get("verification_uri") or body["verification_url"])
    except (ValueError, KeyError, TypeError):
        raise LoginError(
            "the identity provider's device authorization answer is incomplete "
            "(no device_code, user_code or verification_uri)"
        ) from None
    return DeviceAuthorization(
        device_code=device_code,
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=body.get("verification_uri_complete") or None,
        expires_in=_positive(body.get("expires_in"), DEFAULT_DEVICE_CODE_LIFETIME),
        interval=_positive(body.get("interval"), None),
    )


def _positive(value: Any, default: float | None) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default


@dataclass(frozen=True)
class PollTiming:
    """How fast to poll the token endpoint.

    `interval` overrides the provider's interval (tests only: real logins leave it None and
    get the provider's value, or 5 s). `slow_down_step` is what each `slow_down` adds.
    """

    interval: float | None = None
    slow_down_step: float = SLOW_DOWN_STEP


def initial_interval(auth: DeviceAuthorization, timing: PollTiming = PollTiming()) -> float:
    if timing.interval is not None:
        return timing.interval
    return auth.interval if auth.interval is not None else DEFAULT_INTERVAL


def slowed_down(interval: float, timing: PollTiming = PollTiming()) -> float:
    return min(interval + timing.slow_down_step, MAX_INTERVAL)


def poll_for_tokens(
    http: httpx.Client,
    provider: ProviderInfo,
    client_id: str,
    auth: DeviceAuthorization,
    *,
    timing: PollTiming = PollTiming(),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    notice: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Polls the token endpoint until the user approves; returns the token response.

    Raises AccessDenied, DeviceCodeExpired, InvalidClient or LoginError. KeyboardInterrupt
    propagates (the caller turns it into a clean exit).
    """
    interval = initial_interval(auth, timing)
    deadline = clock() + auth.expires_in
    lost_contact = False
    form = {"grant_type": DEVICE_CODE_GRANT, "device_code": auth.device_code, "client_id": client_id}
    while True:
        sleep(interval)
        if clock() > deadline:
            raise DeviceCodeExpired(
                "the login code expired before the login was completed; run --login again"
            )
        try:
            resp = http.post(provider.token_endpoint, data=form)
        except httpx.TransportError as exc:
            # RFC 8628 §3.5: back off on connection problems, keep going until the code expires
            if not lost_contact:
                notice(f"Lost contact with the identity provider ({_reason(exc)}); still trying.")
                lost_contact = True
            interval = min(interval * 2, MAX_INTERVAL)
            continue
        if resp.status_code == 200:
            try:
                body = resp.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or not body.get("access_token"):
                raise LoginError("the identity provider's token answer is not valid JSON with tokens")
            return body
        error, description = _error_of(resp)
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval = slowed_down(interval, timing)
            log.debug("provider asked to slow down; polling every %.1f s", interval)
            continue
        if error == "access_denied":
            raise AccessDenied("the login was denied (the request was declined in the browser)")
        if error == "expired_token":
            raise DeviceCodeExpired(
                "the login code expired before the login was completed; run --login again"
            )
        if error in ("invalid_client", "unauthorized_client"):
            raise InvalidClient(
                f"the identity provider refused client id {client_id!r} "
                f"({_describe(error, description)}); check --client-id"
            )
        if resp.status_code >= 500 or resp.status_code == 429:
            interval = min(interval * 2, MAX_INTERVAL)
            continue
        raise LoginError(
            "the identity provider refused the login: "
            + (_describe(error, description) if error else f"HTTP {resp.status_code}")
        )


class GrantRejected(Exception):
    """The provider rejected a refresh token for good (invalid_grant, invalid_client...)."""

    def __init__(self, error: str, description: str):
        super().__init__(_describe(error, description))
        self.error = error


class TransientError(Exception):
    """The provider could not be reached or failed; trying again later may work."""


def refresh_tokens(
    http: httpx.Client, token_endpoint: str, client_id: str, refresh_token: str
) -> dict[str, Any]:
    """The refresh-token grant (RFC 6749 §6). Returns the token response."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    try:
        resp = http.post(token_endpoint, data=form)
    except httpx.TransportError as exc:
        raise TransientError(f"cannot reach the identity provider: {_reason(exc)}") from None
    if resp.status_code == 200:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not body.get("access_token"):
            raise TransientError("the identity provider's refresh answer has no tokens")
        return body
    error, description = _error_of(resp)
    if resp.status_code < 500 and resp.status_code != 429 and error in (
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "invalid_scope",
    ):
        raise GrantRejected(error, description)
    raise TransientError(
        "the identity provider failed to refresh the login: "
        + (_describe(error, description) if error else f"HTTP {resp.status_code}")
    )


def revoke_token(
    http: httpx.Client, revocation_endpoint: str, client_id: str, token: str, hint: str
) -> bool:
    """RFC 7009 revocation; True when the provider confirmed it."""
    form = {"token": token, "token_type_hint": hint, "client_id": client_id}
    try:
        resp = http.post(revocation_endpoint, data=form)
    except httpx.TransportError:
        return False
    return resp.status_code == 200


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, not verified: the ID token came straight from the provider's
    token endpoint over TLS (OIDC Core §3.1.3.7), and STS verifies its signature anyway."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (IndexError, ValueError, binascii.Error, UnicodeError):
        raise LoginError("the identity provider returned an ID token that is not a JWT") from None
    if not isinstance(claims, dict):
        raise LoginError("the identity provider returned an ID token that is not a JWT")
    return claims


def check_id_token(claims: dict[str, Any], issuer: str, client_id: str) -> None:
    """The checks that matter for using the ID token as an AWS web identity."""
    if str(claims.get("iss", "")).rstrip("/") != issuer.rstrip("/"):
        raise LoginError(f"the ID token was issued by {claims.get('iss')!r}, not {issuer}")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if client_id not in audiences:
        raise LoginError(f"the ID token is not meant for client id {client_id!r}")
    if not isinstance(claims.get("exp"), int | float):
        raise LoginError("the ID token has no expiry (exp claim)")
    if not claims.get("sub"):
        raise LoginError("the ID token names no subject (sub claim)")
