"""The writer lease: one writing mount at a time on servers without conditional writes.

`lease.json` under the repository prefix names the mount that may write (host, pid, mount
id, since, expiry). Without conditional writes it cannot be taken atomically, so taking it
is write, wait, read back:

1. read the lease; a live lease of another mount refuses us;
2. write ours, but only if that read started less than `settle / 2` ago (a writer that
   stalled between its check and its write could overwrite a lease taken meanwhile);
3. wait `settle` seconds, read it back: ours means taken, anything else means we lost.

Two mounts doing this at once both read back the one written last, so exactly one wins,
as long as the server reads its own writes (S3 and every server we know do) and no PUT
lands at the server long after the client saw it finish. Renewals re-read before they
write; a mount whose lease ran out (suspended, offline) takes it again through the same
three steps, and a mount that finds another's lease stops writing for good (`lost`).
Validity is measured on CLOCK_BOOTTIME, which keeps counting while the machine sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

import trio

from .errors import ImgrepoError, ObjectNotFound, StorageError
from .processes import pid_alive
from .store.base import Store, StoredObject

log = logging.getLogger(__name__)

LEASE_KEY = "lease.json"
TTL = 60.0
RENEW_EVERY = 20.0
SETTLE = 2.0
MARGIN = 5.0  # stop writing this long before our lease would expire


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@dataclass(frozen=True)
class Lease:
    """Who holds the writer lease, and until when (wall clock of the holder)."""

    host: str
    pid: int
    mount_id: str
    since: float
    expires: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def describe(self) -> str:
        return (f"{self.host} (pid {self.pid}) since {clock(self.since)}, "
                f"expiring {clock(self.expires)} unless renewed")


def decode_lease(data: bytes) -> Lease | None:
    try:
        raw = json.loads(data)
        return Lease(str(raw["host"]), int(raw["pid"]), str(raw["mount_id"]),
                     float(raw["since"]), float(raw["expires"]))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        log.warning("%s is malformed; treating it as no lease", LEASE_KEY)
        return None


async def read_lease(store: Store) -> Lease | None:
    try:
        obj = await store.get(LEASE_KEY)
    except ObjectNotFound:
        return None
    assert isinstance(obj, StoredObject)
    return decode_lease(obj.data)



def is_live(lease: Lease, host: str, now: float | None = None) -> bool:
    """Unexpired, and not left behind by a dead process of this very host."""
    now = time.time() if now is None else now
    if lease.expires <= now:
        return False
    return not (lease.host == host and not pid_alive(lease.pid))


class LeaseHeld(ImgrepoError):
    """Another mount holds the writer lease."""

    def __init__(self, message: str, holder: Lease) -> None:
        super().__init__(message)
        self.holder = holder


class WriterLease:
    """This mount's claim on `lease.json`: take, renew, release."""

    def __init__(self, store: Store, host: str | None = None, *, ttl: float = TTL,
                 settle: float = SETTLE) -> None:
        self.store = store
        self.host = host or socket.gethostname() or "unknown"
        self.mount_id = uuid.uuid4().hex
        self.ttl = ttl
        self.settle = settle
        self.since: float | None = None
        self.expires: float | None = None  # wall clock, as written
        self._valid_until = 0.0  # CLOCK_BOOTTIME
        self.lost: Lease | None = None  # the lease that replaced ours

    @property
    def held(self) -> bool:
        return self.lost is None and _boottime() < self._valid_until

    def _mine(self) -> Lease:
        now = time.time()
        return Lease(self.host, os.getpid(), self.mount_id, self.since or now, now + self.ttl)

    async def _write(self) -> None:
        started = _boottime()
        lease = self._mine()
        await self.store.put(LEASE_KEY, lease.encode())
        self.expires = lease.expires
        self._valid_until = started + self.ttl - MARGIN

    async def acquire(self, refusal: str) -> None:
        """Take the lease (the three steps of the module doc); `LeaseHeld` if another has it.
        `refusal` starts the message: why a lease is needed at all."""
        for _ in range(5):
            started = _boottime()
            current = await read_lease(self.store)
            if current is not None and current.mount_id != self.mount_id \
                    and is_live(current, self.host):
                raise LeaseHeld(f"{refusal}; the writer lease is held by "
                                f"{current.describe()} (mount with --read-only to read)",
                                current)
            if _boottime() - started > self.settle / 2:
                continue  # too slow a read to act on: look again
            self.since = self.since or time.time()
            await self._write()
            if _boottime() - started > self.settle / 2:
                continue  # the write took long: whatever it raced with, look again
            await trio.sleep(self.settle)
            back = await read_lease(self.store)
            if back is not None and back.mount_id == self.mount_id:
                log.info("took the writer lease of %s (%s)", self.store.url, self.mount_id)
                return
            self._valid_until = 0.0
            if back is not None:
                raise LeaseHeld(f"{refusal}; another mount took the writer lease at the same "
                                f"moment: {back.describe()}", back)
        raise StorageError(f"cannot take the writer lease of {self.store.url}: the storage "
                           "answers too slowly to take it safely")

    async def renew(self, refusal: str) -> None:
        """Extend the lease, or notice (and remember in `lost`) that another took it."""
        if self.lost is not None:
            return
        if not self.held:
            try:
                await self.acquire(refusal)
            except LeaseHeld as exc:
                self.lose(exc.holder)
            return
        current = await read_lease(self.store)
        if current is not None and current.mount_id != self.mount_id:
            self.lose(current)
            return
        await self._write()

    def lose(self, holder: Lease) -> None:
        self.lost, self._valid_until = holder, 0.0
        log.error("the writer lease of %s was taken by %s; this mount stopped writing to "
                  "the bucket and keeps its pending changes in the local cache",
                  self.store.url, holder.describe())

    async def release(self) -> None:
        """Delete the lease if it is still ours (a plain delete: see docs/cross-machine.md)."""
        if self.lost is not None or self.since is None:
            return
        try:
            current = await read_lease(self.store)
            if current is not None and current.mount_id == self.mount_id:
                await self.store.delete(LEASE_KEY)
        except StorageError as exc:
            log.warning("could not release the writer lease (it expires by itself): %s", exc)
        self._valid_until = 0.0


async def refuse_while_leased(store: Store, host: str | None = None) -> None:
    """`--gc` on a single-writer repository: another machine's live lease means a mount
    there may be uploading blobs its manifests do not name yet."""
    host = host or socket.gethostname() or "unknown"
    current = await read_lease(store)
    if current is not None and current.host != host and is_live(current, host):
        raise ImgrepoError(f"gc refused: {store.url} is being written by another machine "
                           f"(writer lease held by {current.describe()}); run gc there, or "
                           "after that mount has unmounted")
