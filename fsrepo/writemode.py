"""Which way this mount may write to the bucket: decided at start, kept while it runs.

- `conditional writes`: the server honours If-Match/If-None-Match (every file:// folder,
  AWS S3, MinIO, R2, ...): any number of machines write at once, as designed.
- `single writer`: the server ignores them (serverprobe.py); this mount writes only while
  it holds the writer lease (lease.py), and another machine's mount is refused.
- `read-only`: asked for with --read-only; nothing is ever written, not even a probe.

Until the mode is known (the storage was unreachable at start) nothing is written to the
bucket; local changes queue in the journal as they do offline. `WriteGate` is the one place
that enforces this for every bucket write the engine makes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from .config import Settings
from .errors import StorageError
from .lease import RENEW_EVERY, SETTLE, LeaseHeld, WriterLease, clock
from .serverprobe import ProbeResult, server_honours_conditions
from .store.base import NotModified, ObjectInfo, Store, StoredObject

log = logging.getLogger(__name__)

CONDITIONAL, SINGLE_WRITER, READ_ONLY, UNKNOWN = (
    "conditional writes", "single writer", "read-only", "not yet known")


class WritesRefused(StorageError):
    """A bucket write this mount may not make now (no lease, read-only, mode unknown)."""


class WriteMode:
    """The mode, the probe answer and (in single-writer mode) the lease of one mount."""

    def __init__(self, store: Store, settings: Settings, host: str,
                 read_only: bool = False) -> None:
        self.store = store
        self.settings = settings
        self.kind = READ_ONLY if read_only else UNKNOWN
        self.probe: ProbeResult | None = None
        self.lease = WriterLease(store, host)
        self.on_ready: list[Callable[[], None]] = []  # called once writes may start late

    @property
    def settle(self) -> float:
        """How long a repository creation waits before reading its descriptor back."""
        return 0.0 if self.kind == CONDITIONAL else SETTLE

    def why_single(self) -> str:
        ignored = self.probe.ignored if self.probe else "conditional PUTs"
        return (f"{self.settings.storage}: the server ignores {ignored} on PUT (no "
                "conditional writes), so only one machine at a time may write")

    def refusal(self) -> str | None:
        """Why a bucket write is refused right now; None when it may go."""
        if self.kind == CONDITIONAL:
            return None
        if self.kind == READ_ONLY:
            return "this mount is read-only"
        if self.kind == UNKNOWN:
            return "the server's support for conditional writes is not known yet"
        if self.lease.lost is not None:
            return (f"the writer lease was taken by {self.lease.lost.describe()}; this mount "
                    "stopped writing (its pending changes stay in the local cache)")
        if not self.lease.held:
            return "waiting to take the writer lease again"
        return None

    def local_refusal(self) -> str | None:
        """Why changes through the mountpoint are refused (EROFS): read-only, or lease lost."""
        if self.kind == READ_ONLY or self.lease.lost is not None:
            return self.refusal()
        return None

    async def start(self) -> None:
        """Probe (or recall) the server and take the lease if needed. `LeaseHeld` refuses
        the mount; an unreachable storage leaves the mode unknown until `run` finds out."""
        if self.kind == READ_ONLY:
            return
        try:
            await self._establish()
        except LeaseHeld:
            raise
        except StorageError as exc:
            log.warning("cannot check the server's conditional writes yet: %s", exc)

    async def _establish(self) -> None:
        self.probe = await server_honours_conditions(self.store, self.settings)
        if self.probe.conditional:
            self.kind = CONDITIONAL
            return
        self.kind = SINGLE_WRITER
        await self.lease.acquire(self.why_single())

    async def run(self) -> None:
        """Find the mode if it is still unknown; renew the lease while mounted."""
        while True:
            await trio.sleep(1.0 if self.kind == UNKNOWN else RENEW_EVERY)
            try:
                if self.kind == UNKNOWN:
                    await self._establish()
                    for ready in self.on_ready:
                        ready()
                elif self.kind == SINGLE_WRITER:
                    await self.lease.renew(self.why_single())
                else:
                    return
            except LeaseHeld as exc:
                self.lease.lose(exc.holder)
            except StorageError as exc:
                log.log(logging.DEBUG if self.kind == UNKNOWN else logging.INFO,
                        "write mode: %s this round: %s", "not known" if self.kind == UNKNOWN
                        else "lease not renewed", exc)

    async def release(self) -> None:
        if self.kind == SINGLE_WRITER:
            await self.lease.release()

    def status(self) -> dict[str, Any]:
        text = self.kind
        if self.kind == SINGLE_WRITER:
            if self.lease.lost is not None:
                text += f" (lease LOST to {self.lease.lost.describe()}; not writing)"
            elif self.lease.held and self.lease.expires is not None:
                text += (f" (lease held by this mount since {clock(self.lease.since or 0)}, "
                         f"renewed until {clock(self.lease.expires)})")
            else:
                text += " (waiting for the writer lease)"
        return {"write_mode": text, "writes_refused": self.refusal()}


class WriteGate(Store):
    """The engine's store: reads pass through, writes only while `refusal()` says None."""

    def __init__(self, inner: Store, refusal: Callable[[], str | None]) -> None:
        self.inner = inner
        self.url = inner.url
        self.refusal = refusal

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)  # the guard's extras (status, on_online, ...)

    @property
    def online(self) -> bool:
        return self.inner.online

    def _check(self) -> None:
        why = self.refusal()
        if why is not None:
            raise WritesRefused(f"not writing to {self.url}: {why}")

    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject | NotModified:
        return await self.inner.get(key, if_none_match)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self.inner.get_range(key, start, end)

    async def download(self, key: str, dest: Path, start: int = 0,
                       on_chunk: Callable[[int], None] | None = None) -> None:
        await self.inner.download(key, dest, start, on_chunk)

    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: bool = False) -> str:
        self._check()
        return await self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)

    async def put_file(self, key: str, path: Path, sha256_hex: str) -> bool:
        self._check()
        return await self.inner.put_file(key, path, sha256_hex)

    async def head(self, key: str) -> int | None:
        return await self.inner.head(key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix):
            yield info

    async def delete(self, key: str) -> None:
        self._check()
        await self.inner.delete(key)

    async def aclose(self) -> None:
        await self.inner.aclose()
