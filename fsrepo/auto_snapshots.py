"""Automatic snapshots: whichever mount of the repository is running takes each period's
snapshot once, across all machines, and deletes those the policy no longer keeps.

Once a period, a mount that may write asks whether the period's snapshot exists (one
HEAD) and, if not, records it; the snapshot object is created with If-None-Match, so of
two machines recording the same period at once one succeeds and the other's attempt
changes nothing. On servers without conditional writes only the lease holder writes at
all, so only it takes them. A period in which nothing changed gets none (the newest
snapshot holds that tree already). After taking one, it deletes the automatic snapshots
the policy no longer keeps (their copies and blobs go through --gc).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from .errors import ImgrepoError, PreconditionFailed
from .snapshot_policy import Retention, auto_name, auto_time, kept
from .snapshots import Snapshots, snapshot_key

log = logging.getLogger(__name__)

CHECK_EVERY = 60.0  # seconds between looks at the clock


class AutoSnapshots:
    def __init__(self, snapshots: Snapshots, take: Callable[[str, str], Awaitable[object]],
                 policy: Retention, may_write: Callable[[], bool],
                 clock: Callable[[], float] = time.time) -> None:
        self.snapshots = snapshots
        self.take = take
        self.policy = policy
        self.may_write = may_write
        self.clock = clock
        self.done: str | None = None  # the period's snapshot known to exist
        self.expired: list[str] = []  # deleted by this mount (for --status and tests)

    async def tick(self) -> str | None:
        """Take this period's snapshot if nobody has; returns its name if this call did."""
        now = self.clock()
        name = auto_name(self.policy, now)
        if name == self.done or not self.may_write() or not self.snapshots.store.online:
            return None
        if await self.snapshots.store.head(snapshot_key(name)) is not None:
            self.done = name  # another machine took it
            return None
        try:
            taken = await self.take(name, self.policy.finest)
        except PreconditionFailed:
            self.done = name  # another machine took it at the same moment
            return None
        self.done = name
        if taken is None:
            log.info("automatic snapshot %s not taken: nothing changed since the last", name)
            return None
        log.info("automatic snapshot %s taken", name)
        await self.expire()
        return name

    async def expire(self) -> list[str]:
        """Delete the automatic snapshots the policy no longer keeps."""
        names = [s.name for s in await self.snapshots.names()]
        keep = kept(self.policy, names)
        gone = [n for n in names if auto_time(n) is not None and n not in keep]
        for name in gone:
            try:
                await self.snapshots.delete(name)
            except ImgrepoError as exc:  # deleted meanwhile by another machine
                log.debug("expired snapshot %s not deleted: %s", name, exc)
                continue
            log.info("automatic snapshot %s expired (policy %s)", name, self.policy)
            self.expired.append(name)
        return gone

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except (ImgrepoError, OSError) as exc:
                log.info("automatic snapshot not taken now (tried again later): %s", exc)
            await trio.sleep(CHECK_EVERY)
