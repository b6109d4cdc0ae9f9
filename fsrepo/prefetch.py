"""Manifests fetched ahead of a walk through the mount (find, ls -R, rsync, a photo
manager's scan): when a directory is opened, its subdirectories' manifests are brought
into the local state database, several at a time, so their first lookups cost no round
trip each. Nothing is held in memory: the views load from the local state when needed.

The most recently asked-for come first (a depth-first walk wants the children of the
directory it just opened next); when too many wait, the oldest wishes are dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import trio

log = logging.getLogger(__name__)

PREFETCH_PARALLEL = 8  # manifests fetched at once
PREFETCH_QUEUE = 10_000  # directories waiting at most


class ManifestPrefetcher:
    def __init__(self, fetch_ahead: Callable[[str], Awaitable[None]], *,
                 parallel: int = PREFETCH_PARALLEL, limit: int = PREFETCH_QUEUE) -> None:
        self._fetch_ahead = fetch_ahead
        self.parallel = parallel
        self.limit = limit
        self.running = False  # wishes are only taken while `run` runs
        self._wanted: deque[str] = deque()  # next first
        self._queued: set[str] = set()
        self._wake = trio.Event()

    def want(self, dir_ids: Iterable[str]) -> None:
        """Fetch these directories' manifests soon, the first given first."""
        if not self.running:
            return
        for dir_id in reversed(list(dir_ids)):
            if dir_id in self._queued:
                continue
            self._wanted.appendleft(dir_id)
            self._queued.add(dir_id)
            if len(self._wanted) > self.limit:
                self._queued.discard(self._wanted.pop())
        self._wake.set()

    def __len__(self) -> int:
        return len(self._wanted)

    async def run(self) -> None:
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.parallel):
                    nursery.start_soon(self._fetcher)
        finally:
            self.running = False

    async def _fetcher(self) -> None:
        while True:
            if not self._wanted:
                if self._wake.is_set():
                    self._wake = trio.Event()
                await self._wake.wait()
                continue
            dir_id = self._wanted.popleft()
            try:
                await self._fetch_ahead(dir_id)
            except Exception as exc:  # a wish: the directory's own load reports errors
                log.debug("prefetch of directory %s failed: %s", dir_id, exc)
            finally:
                self._queued.discard(dir_id)
