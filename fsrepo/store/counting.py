"""A `Store` wrapper that counts requests by kind and bytes each way.

Request counts are how dedup and batching are proven ("a second copy costs no upload",
"200 closes are a handful of manifest writes"): an HTTP proxy can count them on S3 only,
this wrapper counts them the same way on every backend, in process. Benchmarks use it to
report requests per operation.

    counting = CountingStore(store)
    before = counting.snapshot()
    ...                                   # the operation under test
    cost = counting.since(before)
    assert cost[PUT_FILE_CREATED] == 0 and cost.total() == 1

A call is counted when it returns or raises; a call that raised is counted under its kind
and also in `failed`, so retries are visible. The counters are only ever touched from the
trio thread that calls the store (no awaits between reading and writing a counter).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .base import (
    NOT_MODIFIED,
    BlobSource,
    NotModified,
    ObjectInfo,
    Store,
    StoredObject,
    source_size,
)

K = TypeVar("K")

GET = "get"
GET_NOT_MODIFIED = "get-not-modified"
GET_RANGE = "get_range"
DOWNLOAD = "download"
PUT = "put"
PUT_IF_MATCH = "put-if-match"
PUT_IF_NONE_MATCH = "put-if-none-match"
PUT_FILE_CREATED = "put_file-created"
PUT_FILE_EXISTED = "put_file-existed"
HEAD = "head"
LIST = "list"
DELETE = "delete"

PUT_FILE = "put_file"  # the kind a put_file that raised is counted under (no outcome known)


@dataclass(frozen=True)
class RequestCounts:
    """Calls per kind, calls that raised per kind, and bytes sent and received: a snapshot,
    or the difference of two (`later - earlier`)."""

    calls: Mapping[str, int] = field(default_factory=dict)
    failed: Mapping[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    by_key: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (kind, key) -> n

    def under(self, prefix: str) -> RequestCounts:
        """The calls on keys starting with `prefix` (needs a store made with by_key=True;
        failures and bytes are not kept per key)."""
        calls: Counter[str] = Counter()
        for (kind, key), n in self.by_key.items():
            if key.startswith(prefix):
                calls[kind] += n
        return RequestCounts(dict(calls))

    def __getitem__(self, kind: str) -> int:
        return self.calls.get(kind, 0)

    def total(self, *kinds: str) -> int:
        """All calls, or the calls of the given kinds."""
        if not kinds:
            return sum(self.calls.values())
        return sum(self.calls.get(k, 0) for k in kinds)

    @property
    def uploads(self) -> int:
        """Blob uploads attempted (put_file calls, whatever they found)."""
        return self.total(PUT_FILE_CREATED, PUT_FILE_EXISTED, PUT_FILE)

    @property
    def manifest_writes(self) -> int:
        """Small-object writes (manifests, the descriptor), conditional or not."""
        return self.total(PUT, PUT_IF_MATCH, PUT_IF_NONE_MATCH)

    def __sub__(self, earlier: RequestCounts) -> RequestCounts:
        def diff(a: Mapping[K, int], b: Mapping[K, int]) -> dict[K, int]:
            out = {k: a.get(k, 0) - b.get(k, 0) for k in set(a) | set(b)}
            return {k: v for k, v in out.items() if v}

        return RequestCounts(diff(self.calls, earlier.calls), diff(self.failed, earlier.failed),
                             self.bytes_sent - earlier.bytes_sent,
                             self.bytes_received - earlier.bytes_received,
                             diff(self.by_key, earlier.by_key))

    def __repr__(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.calls.items())]
        parts += [f"{k}!={v}" for k, v in sorted(self.failed.items())]
        return " ".join(parts + [f"sent={self.bytes_sent}", f"received={self.bytes_received}"])


class CountingStore(Store):
    """Forwards every call to `inner`, counting it (see the module docstring). With
    `by_key`, calls are also counted per key (memory grows with the keys touched)."""

    def __init__(self, inner: Store, *, by_key: bool = False) -> None:
        self.inner = inner
        self.url = inner.url
        self._by_key: Counter[tuple[str, str]] | None = Counter() if by_key else None
        self._calls: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        self._sent = 0
        self._received = 0

    def __repr__(self) -> str:
        return f"CountingStore({self.inner!r})"

    # -- the counters ---------------------------------------------------------------------
    def snapshot(self) -> RequestCounts:
        """The counts so far (an immutable copy)."""
        return RequestCounts(dict(self._calls), dict(self._failed), self._sent, self._received,
                             dict(self._by_key or {}))

    def since(self, earlier: RequestCounts) -> RequestCounts:
        """What was counted after `earlier` was taken."""
        return self.snapshot() - earlier

    def _count(self, kind: str, key: str, *, sent: int = 0, received: int = 0) -> None:
        self._calls[kind] += 1
        if self._by_key is not None:
            self._by_key[(kind, key)] += 1
        self._sent += sent
        self._received += received

    def _count_failed(self, kind: str, key: str) -> None:
        self._count(kind, key)
        self._failed[kind] += 1

    # -- the Store interface --------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self.inner.online

    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject | NotModified:
        try:
            obj = await self.inner.get(key, if_none_match)
        except BaseException:
            self._count_failed(GET, key)
            raise
        if obj is NOT_MODIFIED:
            self._count(GET_NOT_MODIFIED, key)
        else:
            assert isinstance(obj, StoredObject)
            self._count(GET, key, received=len(obj.data))
        return obj

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        try:
            data = await self.inner.get_range(key, start, end)
        except BaseException:
            self._count_failed(GET_RANGE, key)
            raise
        self._count(GET_RANGE, key, received=len(data))
        return data

    async def download(
        self, key: str, dest: Path, start: int = 0, on_chunk: Callable[[int], None] | None = None
    ) -> None:
        try:
            await self.inner.download(key, dest, start, on_chunk)
        except BaseException:
            self._count_failed(DOWNLOAD, key)
            raise
        self._count(DOWNLOAD, key, received=max(0, dest.stat().st_size - start))

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        kind = PUT_IF_MATCH if if_match is not None else \
            PUT_IF_NONE_MATCH if if_none_match else PUT
        try:
            etag = await self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)
        except BaseException:
            self._count_failed(kind, key)
            raise
        self._count(kind, key, sent=len(data))
        return etag

    async def put_file(self, key: str, path: BlobSource, sha256_hex: str) -> bool:
        size = source_size(path)
        try:
            created = await self.inner.put_file(key, path, sha256_hex)
        except BaseException:
            self._count_failed(PUT_FILE, key)
            raise
        # Bytes sent: only what created the object (a backend that finds the key there
        # may or may not have sent the body first; count the content that landed).
        self._count(PUT_FILE_CREATED if created else PUT_FILE_EXISTED, key,
                    sent=size if created else 0)
        return created

    async def head(self, key: str) -> int | None:
        try:
            size = await self.inner.head(key)
        except BaseException:
            self._count_failed(HEAD, key)
            raise
        self._count(HEAD, key)
        return size

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        try:
            async for info in self.inner.list(prefix):
                yield info
        except GeneratorExit:  # the caller stopped reading: a listing all the same
            self._count(LIST, prefix)
            raise
        except BaseException:
            self._count_failed(LIST, prefix)
            raise
        self._count(LIST, prefix)

    async def delete(self, key: str) -> None:
        try:
            await self.inner.delete(key)
        except BaseException:
            self._count_failed(DELETE, key)
            raise
        self._count(DELETE, key)

    async def aclose(self) -> None:
        await self.inner.aclose()

