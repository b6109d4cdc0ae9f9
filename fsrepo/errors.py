"""Exceptions with messages meant for users.

Everything a user can cause or meet in normal operation (bad input, unreachable storage,
a damaged repository) is an `ImgrepoError`: the CLI prints its message on one line and exits
non-zero, without a traceback. `FsError` is the other kind: an errno answer to one
filesystem request, and `errno_for` the one mapping from any failure to that errno.
"""

from __future__ import annotations

import errno
import sqlite3


class ImgrepoError(Exception):
    """An expected failure, with a message that tells the user what happened."""

    exit_code = 1


class ConfigError(ImgrepoError):
    """Settings that cannot work (bad URL, bad size, unreadable config file)."""

    exit_code = 2


class StorageError(ImgrepoError):
    """The storage failed in a way retrying did not fix."""


class StorageUnavailable(StorageError):
    """The storage cannot be reached (network down, endpoint wrong, server stopped)."""


class StorageOffline(StorageUnavailable):
    """The storage is known to be unreachable right now: the call was not even tried."""


class StorageAccessDenied(StorageError):
    """The storage refused our credentials (missing, wrong, expired or revoked)."""


class NoSuchBucket(StorageError):
    """The bucket named in the storage URL does not exist."""


class ObjectNotFound(StorageError):
    """A key does not exist (also: an If-Match write to a key that does not exist)."""


class PreconditionFailed(StorageError):
    """A conditional write lost: If-None-Match met an existing key or If-Match a new etag."""


class RepositoryFormatError(ImgrepoError):
    """The storage holds something that is not a usable imgrepo repository."""


class ManifestError(RepositoryFormatError):
    """A directory manifest in the repository is malformed or hostile."""


class IntegrityError(ImgrepoError):
    """Downloaded bytes do not match the SHA-256 they are named by."""


class LoginError(ImgrepoError):
    """Logging in (OIDC device flow) or keeping the login fresh failed."""


class IssuerUnreachable(LoginError):
    """The identity provider (issuer URL) cannot be reached."""


class DiscoveryError(LoginError):
    """The issuer's OpenID Connect discovery document is missing or unusable."""


class InvalidClient(LoginError):
    """The identity provider does not accept our client id."""


class AccessDenied(LoginError):
    """The user (or the provider) denied the login request."""


class DeviceCodeExpired(LoginError):
    """The device code expired before the user finished logging in."""


class FsError(Exception):
    """An errno answer for the kernel. A failure behind it (EIO, ENOSPC...) was logged by
    whoever raised it; ENOENT, EEXIST and the like are answers, not failures."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


# SQLite's primary result codes for a failing disk under the database.
_SQLITE_ERRNO = {13: errno.ENOSPC, 8: errno.EROFS, 5: errno.EBUSY, 6: errno.EBUSY}


def errno_for(exc: BaseException) -> int:
    """The errno a request that failed with `exc` answers: its own for an FsError or an
    OSError, the disk's for SQLite, ENETDOWN when the storage is known unreachable, EIO
    for everything else."""
    if isinstance(exc, FsError | OSError):
        return exc.errno or errno.EIO
    if isinstance(exc, sqlite3.OperationalError):
        return _SQLITE_ERRNO.get(getattr(exc, "sqlite_errorcode", 0) & 0xFF, errno.EIO)
    if isinstance(exc, StorageOffline):
        return errno.ENETDOWN
    return errno.EIO
