"""Manifests fetched ahead of a walk through the mount (find, ls -R, rsync, a photo
manager's scan): when a directory is opened, its subdirectories' manifests are brought
into the local state database, many at a time, so their first lookups cost no round trip
each. Nothing is held in memory: the views load from the local state when needed.

Order: what the walk asked for last comes first (a depth-first walk wants the children of
the directory it just opened next; asking again moves a waiting wish to the front). Each
fetched manifest's own subdirectories are wished for too, `depth` levels below what was
asked, at the back: the fetchers keep busy while the walk is still inside the folder it
opened, and the next folder's children are often there before it gets to them. Where the
depth ends, the subdirectories found are remembered: when the walk opens the parent of
such a directory, they are wished for next (the walk is about to go there). Every
manifest is still fetched at most once; when too many wait, the newest wishes at the
back are dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import trio

log = logging.getLogger(__name__)

PREFETCH_PARALLEL = 48  # manifests fetched at once (the S3 store runs 48 small requests at once)
PREFETCH_QUEUE = 10_000  # directories waiting at most
PREFETCH_DEPTH = 1  # levels below an opened directory's children fetched ahead as well
FOUND_KEPT = 4096  # fetched directories whose subdirectories are remembered for later


class ManifestPrefetcher:
    def __init__(self, fetch_ahead: Callable[[str], Awaitable[list[str]]], *,
                 parallel: int = PREFETCH_PARALLEL, limit: int = PREFETCH_QUEUE,
                 depth: int = PREFETCH_DEPTH) -> None:
        self._fetch_ahead = fetch_ahead
        self.parallel = parallel
        self.limit = limit
        self.depth = depth
        self.running = False  # wishes are only taken while `run` runs
        # (dir id, levels below it still wanted, ticket); a wish whose ticket is no longer
        # the directory's in `_queued` was moved to the front since, and is skipped
        self._wanted: deque[tuple[str, int, int]] = deque()
        self._queued: dict[str, int] = {}  # dir id -> ticket of its live wish
        self._tickets = 0
        # subdirectories of fetched manifests not wished for (the depth ended there), by
        # directory: wished for when a walk opens the directory's parent (oldest go first)
        self._found: dict[str, list[str]] = {}
        self._wake = trio.Event()
        self._fetching = 0  # fetches under way (a wish taken off the queue, not done yet)

    def want(self, dir_ids: Iterable[str], cached: Iterable[str] = ()) -> None:
        """Fetch these directories' manifests soon, the first given first, before anything
        wished for earlier. `cached`: subdirectories of the same listing already here; the
        subdirectories their fetch found (if it ended the fetching ahead there) come next."""
        if not self.running:
            return
        wishes = [(dir_id, self.depth) for dir_id in dir_ids]
        for dir_id in cached:
            wishes += [(sub, self.depth - 1) for sub in self._found.pop(dir_id, ())]
        for dir_id, depth in reversed(wishes):
            self._tickets += 1
            self._queued[dir_id] = self._tickets
            self._wanted.appendleft((dir_id, depth, self._tickets))
        self._bound()
        self._wake.set()

    def _later(self, dir_ids: list[str], depth: int) -> None:
        """Wishes derived from a fetched manifest: after everything asked for."""
        for dir_id in dir_ids:
            if dir_id not in self._queued:
                self._tickets += 1
                self._queued[dir_id] = self._tickets
                self._wanted.append((dir_id, depth, self._tickets))
        self._bound()
        self._wake.set()

    def _bound(self) -> None:
        while len(self._wanted) > self.limit:
            dir_id, _, ticket = self._wanted.pop()
            if self._queued.get(dir_id) == ticket:
                del self._queued[dir_id]

    def forget_found(self) -> None:
        """Drop the remembered subdirectories (an idle mount: the walk is over)."""
        self._found = {}

    def __len__(self) -> int:
        """Directories waiting to be fetched."""
        return len(self._queued)

    @property
    def idle(self) -> bool:
        """Nothing waits and no fetch is under way (a fetch that ends may wish for more)."""
        return not self._queued and not self._fetching

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
            dir_id, depth, ticket = self._wanted.popleft()
            if self._queued.get(dir_id) != ticket:
                continue  # moved to the front since, and taken from there
            del self._queued[dir_id]
            self._fetching += 1
            try:
                subdirs = await self._fetch_ahead(dir_id)
            except Exception as exc:  # a wish: the directory's own load reports errors
                log.debug("prefetch of directory %s failed: %s", dir_id, exc)
                continue
            finally:
                self._fetching -= 1
            if depth > 0 and subdirs:
                self._later(subdirs, depth - 1)
            elif subdirs:
                self._found[dir_id] = subdirs
                if len(self._found) > FOUND_KEPT:
                    del self._found[next(iter(self._found))]
