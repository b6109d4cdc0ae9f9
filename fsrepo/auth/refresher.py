"""Keeps the login fresh while a mount runs (a trio task).

The mount sets `aws_environment(settings)` before creating its boto3 client; botocore then
calls STS AssumeRoleWithWebIdentity itself, and reads the web-identity token file again at
every credential refresh (15 minutes before its credentials expire). This task's only job is
that the file always holds a valid ID token: it refreshes the token with the refresh grant a
margin before it expires (see `refresh_margin`) and rewrites the file atomically.

When the provider rejects the refresh token (expired, revoked: `invalid_grant`), the state
becomes "login_required", the store records it (so `--status` in another process shows it),
one warning is logged, and the task keeps watching the token store: as soon as
`imgrepo-mount --login` writes a new login, it is picked up, the web-identity file is
rewritten, and botocore's next refresh attempt succeeds -- no remount. Until then S3 calls
fail with expired credentials and the mount's upload journal keeps what was written.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import httpx
import trio

from ..retry import QUEUE, Backoff
from .oidc import new_http_client
from .store import StoredLogin, TokenStore
from .tokens import RefreshOutcome, refresh_under_lock

log = logging.getLogger(__name__)

NOT_LOGGED_IN = "not_logged_in"
OK = "ok"
RETRYING = "retrying"
LOGIN_REQUIRED = "login_required"
NO_REFRESH_TOKEN = "no_refresh_token"


@dataclass(frozen=True)
class RefresherState:
    """What the refresher knows, for `--status` and the mount's logs. No secrets."""

    status: str  # one of the constants above
    message: str = ""
    identity: str | None = None
    id_token_expires_at: float | None = None  # seconds since the epoch
    last_refresh_at: float | None = None
    refreshes: int = 0  # by this refresher

    @property
    def login_required(self) -> bool:
        return self.status == LOGIN_REQUIRED


class TokenRefresher:
    """`await refresher.run()` in the mount's nursery; `refresher.state()` any time.

    `watch_interval` is how often the token store is checked for a new login (a stat(2),
    cheap); `retry` is the back-off after provider failures (background work: the QUEUE
    layer's policy, tried again for as long as the mount runs).
    """

    def __init__(
        self,
        *,
        store: TokenStore | None = None,
        http: httpx.Client | None = None,
        watch_interval: float = 2.0,
        retry: Backoff = QUEUE,
    ):
        self._store = store or TokenStore()
        self._http = http
        self._watch_interval = watch_interval
        self._retry = retry
        self._state = RefresherState(NOT_LOGGED_IN, "not logged in: run imgrepo-mount --login")
        self._refreshes = 0
        self._last_refresh: float | None = None
        self._warned_login_id: str | None = None

    def state(self) -> RefresherState:
        return self._state

    def _set(self, status: str, login: StoredLogin | None, message: str = "") -> None:
        self._state = RefresherState(
            status=status,
            message=message,
            identity=login.display_name() if login else None,
            id_token_expires_at=login.id_token_expires_at if login else None,
            last_refresh_at=self._last_refresh,
            refreshes=self._refreshes,
        )

    async def run(self) -> None:
        """Runs until cancelled. Never raises for provider or network trouble."""
        http = self._http or new_http_client()
        try:
            await self._loop(http)
        finally:
            if self._http is None:
                http.close()

    async def _loop(self, http: httpx.Client) -> None:
        failures = 0  # provider failures in a row
        known: str | None = None  # the refresh token we last saw (None: not yet loaded)
        while True:
            # Not abandonable on cancel: a refresh in flight must get to save the rotated
            # refresh token, or the next process would reuse the old one and lose the grant.
            outcome: RefreshOutcome = await trio.to_thread.run_sync(
                functools.partial(refresh_under_lock, self._store, http, known_refresh_token=known)
            )
            login = outcome.login
            wake_at: float | None = None
            if outcome.kind == "none":
                self._set(NOT_LOGGED_IN, None, "not logged in: run imgrepo-mount --login")
            elif outcome.kind == "login_required":
                self._set(LOGIN_REQUIRED, login, self._login_required_message(login))
                if login is not None and self._warned_login_id != login.login_id:
                    self._warned_login_id = login.login_id
                    log.warning("%s", self._state.message)
            elif outcome.kind == "no_refresh_token":
                assert login is not None
                if login.seconds_left() > 0:
                    self._set(
                        NO_REFRESH_TOKEN,
                        login,
                        "the login has no refresh token (scope without offline_access?): "
                        "it cannot be renewed and ends when the ID token expires",
                    )
                    wake_at = login.id_token_expires_at
                else:
                    self._set(LOGIN_REQUIRED, login, self._login_required_message(login))
                    if self._warned_login_id != login.login_id:
                        self._warned_login_id = login.login_id
                        log.warning("%s", self._state.message)
            elif outcome.kind == "transient":
                assert login is not None
                self._set(RETRYING, login, f"refreshing the login failed, retrying: {outcome.message}")
                failures += 1
                delay = self._retry.delay(failures)
                log.warning("login refresh failed (retrying in %.0f s): %s", delay, outcome.message)
                wake_at = time.time() + delay
            else:  # refreshed or fresh
                assert login is not None
                if outcome.kind == "refreshed":
                    self._refreshes += 1
                    self._last_refresh = time.time()
                    log.info(
                        "login refreshed for %s; ID token valid for %.0f s",
                        login.display_name(),
                        login.seconds_left(),
                    )
                elif self._state.status in (LOGIN_REQUIRED, NOT_LOGGED_IN):
                    log.info("found a new login for %s; AWS credentials resume", login.display_name())
                failures = 0
                self._set(OK, login)
                wake_at = login.refresh_due_at()
            known = login.refresh_token if login is not None else None
            await self._wait(outcome.signature, wake_at)

    @staticmethod
    def _login_required_message(login: StoredLogin | None) -> str:
        reason = (login.login_required or {}).get("reason", "") if login else ""
        text = "login required: the login has expired or was revoked"
        if reason:
            text += f" ({reason})"
        return (
            text + ". Run `imgrepo-mount --login`; the mount keeps running, cached files stay "
            "readable, and queued uploads resume after the login"
        )

    async def _wait(self, signature: tuple[int, int, int] | None, wake_at: float | None) -> None:
        """Sleep until `wake_at` (None: forever) or until the token store changes on disk."""
        while True:
            now = time.time()
            if wake_at is not None and now >= wake_at:
                return
            step = self._watch_interval if wake_at is None else min(self._watch_interval, wake_at - now)
            await trio.sleep(max(step, 0.0))
            if self._store.signature() != signature:
                return
