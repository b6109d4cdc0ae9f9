"""Storage backends behind one interface (`Store`), chosen by URL.

The S3 backend is imported only when an `s3://` URL is opened, so the `file://` default
(and processes that only need it) never pay for importing boto3.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError
from .base import NOT_MODIFIED, ObjectInfo, Store, StoredObject
from .endpoint import check_endpoint

__all__ = ["NOT_MODIFIED", "ObjectInfo", "Store", "StoredObject", "check_endpoint", "open_store"]

# Lenient on purpose (MinIO, R2 and old us-east-1 buckets differ); S3 says the rest.
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")  # fullmatch


def open_store(url: str, endpoint_url: str | None = None, region: str | None = None,
               create: bool = True) -> Store:
    """`file:///abs/path` (or a bare absolute path) -> LocalStore,
    `s3://bucket[/prefix]` -> S3Store. Anything else is a ConfigError. `create=False`: a
    local folder that does not exist is not made (a check must not leave one behind)."""
    text = url.strip()
    if text.startswith("file://"):
        path = text[len("file://") :]
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
        if not path.startswith("/"):
            raise ConfigError(
                f"file:// storage URLs need an absolute path, like file:///home/me/photos-repo "
                f"(three slashes): {url!r}"
            )
        from .local import LocalStore

        return LocalStore(Path(path), create=create)
    if text.startswith("/"):
        from .local import LocalStore

        return LocalStore(Path(text), create=create)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if "@" in bucket or ":" in bucket:
            raise ConfigError(
                f"s3:// URLs name only a bucket and prefix; credentials and endpoints go "
                f"elsewhere (AWS_* variables, --endpoint-url): {url!r}"
            )
        if not bucket:
            raise ConfigError(f"s3:// storage URL without a bucket name: {url!r}")
        if not _BUCKET_RE.fullmatch(bucket):
            raise ConfigError(
                f"{bucket!r} is not a valid bucket name (3-63 letters, digits, dots, hyphens): "
                f"{url!r}"
            )
        prefix = prefix.strip("/")
        if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
            raise ConfigError(f"the prefix in {url!r} has empty, '.' or '..' parts")
        check_endpoint(endpoint_url)
        from .s3 import S3Store

        return S3Store(bucket, prefix, endpoint_url=endpoint_url, region=region)
    raise ConfigError(
        f"unknown storage URL {url!r}: use s3://bucket/prefix or file:///absolute/path"
    )
