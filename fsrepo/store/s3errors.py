"""What went wrong with an S3 request, in the words of `fsrepo.errors`.

Both blob transports (boto3 and the direct path) and every other S3 request end up here, so
a failure reads the same whichever path met it: messages name the bucket, key or endpoint,
never a credential. Also the one log line of a failed attempt that is about to be retried.
"""

from __future__ import annotations

import logging

import botocore.exceptions as bx

from ..errors import (
    ImgrepoError,
    IntegrityError,
    NoSuchBucket,
    ObjectNotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
)

log = logging.getLogger(__name__)

ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "SignatureDoesNotMatch",
        "InvalidSecurity",
        "AccountProblem",
    }
)
CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "OperationAborted"})
INTEGRITY_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout"}
)
CREDENTIAL_ERRORS = (
    bx.PartialCredentialsError,
    bx.CredentialRetrievalError,
    bx.TokenRetrievalError,
    bx.RefreshWithMFAUnsupportedError,
    bx.NoAuthTokenError,
)
NETWORK_ERRORS = (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError)
# Failures while reading a response body, after botocore's own retries are over.
STREAM_ERRORS = (
    bx.ResponseStreamingError,
    bx.IncompleteReadError,
    bx.ReadTimeoutError,
    bx.ConnectionClosedError,
    bx.FlexibleChecksumError,
)


class ConditionalConflict(PreconditionFailed):
    """409 ConditionalRequestConflict: transient; the store retries the write."""


class BrokenBody(StorageUnavailable):
    """A response body broke off mid-read (the one failure botocore cannot retry: the body
    is read after its call returned). The store retries or resumes the request."""


def note_retry(operation: str, url: str, attempt: int, what: str) -> None:
    """The one log line of a failed S3 attempt about to be retried (ours and botocore's).
    A refused connection is an outage, which the connectivity guard logs once: each of its
    retries is only debug detail."""
    level = logging.DEBUG if "ConnectionRefused" in what or "Could not connect" in what \
        else logging.INFO
    log.log(level, "S3 %s %s failed (attempt %d): %s", operation, url.split("?", 1)[0],
            attempt, what[:300])


class S3Errors:
    """Turns S3 answers and botocore exceptions into `fsrepo.errors` for one bucket.
    `key` arguments are full keys (with the repository prefix)."""

    def __init__(self, bucket: str, url: str, endpoint: str, attempts: int) -> None:
        self.bucket = bucket
        self.url = url
        self.endpoint = endpoint
        self.attempts = attempts

    def where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{key}" if key is not None else f"s3://{self.bucket}"

    def no_such_bucket(self) -> NoSuchBucket:
        return NoSuchBucket(
            f"bucket {self.bucket!r} does not exist at {self.endpoint}: "
            "create it, or fix the storage URL / endpoint"
        )

    def no_credentials(self) -> StorageAccessDenied:
        return StorageAccessDenied(
            f"no AWS credentials found: to use {self.url}, set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, pick a profile with AWS_PROFILE, "
            "or log in with `imgrepo-mount --login`"
        )

    def unreachable(self, key: str | None, detail: object) -> StorageUnavailable:
        return StorageUnavailable(
            f"cannot reach S3 at {self.endpoint} ({self.where(key)}): {detail}")

    def etag_of(self, resp: dict, what: str, key: str | None) -> str:
        """The ETag of a response; a server that sends none (some S3 look-alikes) cannot
        serve imgrepo, which pins reads and writes to etags: a clear error, not a KeyError."""
        etag = resp.get("ETag")
        if not etag:
            raise StorageError(
                f"S3 at {self.endpoint} answered a request to {what} {self.where(key)} without "
                "an ETag: this server is not S3-compatible enough for imgrepo")
        return str(etag)

    def response(self, status: int, code: str, message: str, operation: str, what: str,
                 key: str | None) -> ImgrepoError:
        """An error answer: its HTTP status, S3 error code and message."""
        where = self.where(key)
        label = code or str(status)
        if code == "NoSuchBucket":
            return self.no_such_bucket()
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            return ObjectNotFound(f"{where} does not exist")
        if code in CONFLICT_CODES:
            return ConditionalConflict(f"{where}: a conflicting write was in progress")
        if code == "PreconditionFailed" or status == 412:
            return PreconditionFailed(f"{where} already exists or was changed by another writer")
        if code in ACCESS_CODES or status in (401, 403):
            return StorageAccessDenied(
                f"S3 at {self.endpoint} refused access to {where} ({label}): the AWS "
                "credentials are missing, wrong or expired, or lack permission on this bucket"
            )
        if status == 400 and code in ("400", "BadRequest", "") and \
                operation in ("HeadObject", "HeadBucket"):
            # A HEAD error has no body, so S3's ExpiredToken arrives as a bare 400:
            # expired (or otherwise unusable) credentials are by far its likeliest cause.
            return StorageAccessDenied(
                f"S3 at {self.endpoint} refused access to {where} (400 on HEAD): the AWS "
                "credentials are most likely expired (run `imgrepo-mount --login` if you "
                "logged in with it) or invalid"
            )
        if code in INTEGRITY_CODES:
            return IntegrityError(f"S3 rejected {where} ({label}): content and checksum differ")
        detail = f"{label}{': ' + message if message else ''}"
        if status >= 500 or status == 429 or code in THROTTLE_CODES:
            return StorageUnavailable(
                f"S3 at {self.endpoint} kept failing to {what} {where} ({detail}) "
                f"after {self.attempts} attempts"
            )
        return StorageError(f"cannot {what} {where}: {detail}")

    def botocore(self, exc: Exception, what: str, key: str | None) -> ImgrepoError:
        """A botocore exception (ClientError or BotoCoreError)."""
        if isinstance(exc, bx.ClientError):
            status, code = client_error_status(exc)
            message = str((exc.response.get("Error") or {}).get("Message") or "")
            return self.response(status, code, message, getattr(exc, "operation_name", ""),
                                 what, key)
        if isinstance(exc, bx.NoCredentialsError):
            return self.no_credentials()
        if isinstance(exc, CREDENTIAL_ERRORS):
            return StorageAccessDenied(f"cannot get AWS credentials for {self.url}: {exc}")
        if isinstance(exc, (bx.ChecksumError, bx.FlexibleChecksumError)):
            return IntegrityError(f"{self.where(key)}: {exc}")
        if isinstance(exc, NETWORK_ERRORS):
            return self.unreachable(key, exc)
        return StorageError(f"cannot {what} {self.where(key)}: {exc}")


def client_error_status(exc: bx.ClientError) -> tuple[int, str]:
    """A ClientError's HTTP status and S3 error code."""
    err = exc.response.get("Error") or {}
    meta = exc.response.get("ResponseMetadata") or {}
    return int(meta.get("HTTPStatusCode") or 0), str(err.get("Code") or "")
