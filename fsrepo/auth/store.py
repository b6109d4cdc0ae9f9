"""The token store: one file per user, readable by that user only.

Layout (in `config_dir()`, normally `~/.config/imgrepo/`):

    tokens.json          the login: tokens, their expiry, endpoints, who logged in (0600)
    tokens.lock          flock(2) lock serialising every read-modify-write of tokens.json
    web-identity-token   the current ID token alone (0600), the file botocore's web-identity
                         provider reads (AWS_WEB_IDENTITY_TOKEN_FILE) at every credential refresh

Both files are written atomically (temporary file, fsync, rename), so a reader (botocore in
another process, `--status`) never sees half a file. Refresh tokens rotate and reusing an old
one revokes the whole grant, so every refresh happens under the lock, after re-reading the
file: a process that finds a newer refresh token than the one it knew uses that instead.

Why a file and not the system keyring: botocore needs the ID token in a file anyway, several
processes (mounts, `--status`, `--login`) must share and lock one login, and a headless server
has no keyring. The file is 0600 in a 0700 directory we create.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..config import config_dir
from ..errors import LoginError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOCK_TIMEOUT = 90.0  # longer than one refresh request can take (HTTP timeout 20 s)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never a mix."""
    ensure_private_dir(path.parent)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def ensure_private_dir(path: Path) -> None:
    """The folder of the login (tokens, settings) made 0700: created so, or tightened if it
    was there already (made by hand, by an older version, with a loose umask)."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) != 0o700:
        path.chmod(0o700)


@dataclass(frozen=True)
class StoredLogin:
    """One login. Token fields are kept out of repr() so a stray log line cannot leak them."""

    issuer: str
    client_id: str
    scope: str
    token_endpoint: str
    subject: str
    id_token: str = field(repr=False)
    id_token_expires_at: float  # local clock, seconds since the epoch
    id_token_lifetime: float  # seconds, as issued
    access_token: str = field(default="", repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    refresh_token_expires_at: float | None = None  # when the provider says (Keycloak, Entra ID)
    revocation_endpoint: str | None = None
    role_arn: str | None = None
    identity: dict[str, str] = field(default_factory=dict)  # name, email, preferred_username
    logged_in_at: float = 0.0
    refreshed_at: float | None = None
    refreshes: int = 0
    login_id: str = field(default_factory=lambda: secrets.token_hex(8))
    login_required: dict[str, Any] | None = None  # {"since": t, "reason": "..."} once dead

    def display_name(self) -> str:
        email = self.identity.get("email")
        user = self.identity.get("preferred_username") or self.identity.get("name")
        if user and email and user != email:
            return f"{user} <{email}>"
        return user or email or self.subject

    def seconds_left(self, now: float | None = None) -> float:
        return self.id_token_expires_at - (time.time() if now is None else now)

    def refresh_margin(self) -> float:
        return refresh_margin(self.id_token_lifetime)

    def refresh_due_at(self) -> float:
        """When to refresh: a margin before the ID token expires (see refresh_margin)."""
        return self.id_token_expires_at - self.refresh_margin()

    def to_json(self) -> bytes:
        data = asdict(self)
        data["version"] = FORMAT_VERSION
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> StoredLogin:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError("unknown token store format")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def refresh_margin(lifetime: float) -> float:
    """How long before expiry the ID token is refreshed: a third of its lifetime, at most
    five minutes (an hour-long token is refreshed after 55 minutes; a 6 s test token
    after 4 s). The web-identity file then always holds a token with time left on it,
    whenever botocore happens to read it."""
    return min(300.0, max(lifetime, 0.0) / 3.0)


class TokenStore:
    """tokens.json, its lock and the web-identity token file, in one directory."""

    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory is not None else config_dir()
        self.path = self.directory / "tokens.json"
        self.lock_path = self.directory / "tokens.lock"
        self.web_identity_path = self.directory / "web-identity-token"

    # -- reading ----------------------------------------------------------------------

    def load(self) -> StoredLogin | None:
        """The stored login, or None. A damaged file is reported, not silently replaced."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LoginError(f"{self.path} is a symlink; refusing to read tokens from it") from None
            raise LoginError(f"cannot read the token store {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_mode & 0o077:
                log.warning("%s was readable by others; making it private (0600)", self.path)
                os.fchmod(fh.fileno(), 0o600)
            raw = fh.read()
        try:
            return StoredLogin.from_json(raw)
        except (ValueError, TypeError):
            raise LoginError(
                f"the token store {self.path} is damaged; run `imgrepo-mount --login` again"
            ) from None

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever tokens.json is replaced (every write is a rename)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    # -- writing (callers hold the lock) ---------------------------------------------

    def save(self, login: StoredLogin) -> None:
        atomic_write(self.path, login.to_json())

    def write_web_identity_token(self, token: str) -> bool:
        """Replace the web-identity file if its content differs; True if it was written."""
        try:
            with open(self.web_identity_path, "rb") as fh:
                if fh.read() == token.encode():
                    if stat.S_IMODE(os.fstat(fh.fileno()).st_mode) != 0o600:
                        os.fchmod(fh.fileno(), 0o600)
                    return False
        except FileNotFoundError:
            pass
        atomic_write(self.web_identity_path, token.encode())
        return True

    def mark_login_required(self, login: StoredLogin, reason: str) -> StoredLogin:
        """Record that this login is dead. The refresh token is dropped: it cannot work again."""
        dead = replace(
            login, refresh_token=None, login_required={"since": time.time(), "reason": reason}
        )
        self.save(dead)
        return dead

    def delete(self) -> bool:
        removed = False
        for path in (self.path, self.web_identity_path):
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass
        return removed

    # -- locking ----------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """An exclusive flock on tokens.lock, across processes (and across TokenStore
        objects in one process: each has its own open file description)."""
        ensure_private_dir(self.directory)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LoginError(
                            f"another imgrepo process holds {self.lock_path} for too long"
                        ) from None
                    time.sleep(0.02)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
