"""Where a test's repository lives: a local folder or a bucket on a test server, as the
URL (and endpoint) that `open_store` and the mount's flags take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StorageTarget:
    """A repository location: what `open_store` (or the mount's flags) needs."""

    url: str
    endpoint_url: str | None = None

    def open(self) -> Any:
        """The opened `Store` (close it with `await store.aclose()`)."""
        from fsrepo.store import open_store

        return open_store(self.url, endpoint_url=self.endpoint_url)


@dataclass(frozen=True)
class S3Target(StorageTarget):
    """A bucket on a test server; `url` is s3://bucket/prefix."""

    bucket: str = ""
    prefix: str = ""
