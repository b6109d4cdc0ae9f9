"""The safety net under the change records: every loaded view checked against the bucket
now and then, whatever the heads say (a writer that crashed between a manifest PUT and its
head PUT, and never came back, announced nothing).

One LIST of `dirs/<prefix>` gives the etag of every manifest under that key prefix; the
loaded views among them whose etag differs are revalidated (a conditional GET each), the
rest cost nothing more. Directory ids are random, so a prefix of P characters splits the
loaded views into up to 16^P groups: at 10,000 loaded folders one listing covers ~600 of
them and a whole sweep is 16 requests, not 10,000 conditional GETs. The prefix length
adapts so that a listing stays one page (it grows after a listing of more than a page,
shrinks while the shorter prefix would still fit in one). A store whose listing has no
etags (file://, where a request costs nothing) is swept one conditional GET a view.

Pace: the whole sweep at least once per SWEEP_PERIOD, but on average at most one request
per SWEEP_SPREAD intervals; at the default --refresh a sweep of 16 listings is one request
per ~540 intervals, so an idle mount sends ~1 request an interval: the change-record poll.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .dir_listing import listed_manifests
from .dirviews import DirViews
from .store.base import Store

SWEEP_PERIOD = 86400.0  # every loaded view checked at least this often...
SWEEP_SPREAD = 4  # ...but at most one sweep request per this many intervals on average
PAGE_ROWS = 1000  # rows in one listing page (S3's maximum)
DEPTH_LIMIT = 8  # prefix characters at most (16^8 groups: more than any mount loads)


class ViewSweep:
    """Checks the loaded views a listing at a time; `revalidate` re-reads one view."""

    def __init__(self, store: Store, views: DirViews, refresh: float,
                 revalidate: Callable[[str], Awaitable[None]]) -> None:
        self.store = store
        self.views = views
        self.refresh = refresh
        self.revalidate = revalidate
        self.depth = 1  # prefix length of a listing's group
        self.lists_etags = True  # until a listing comes without them
        self._credit = 0.0  # requests the pace allows now
        self._swept: set[str] = set()  # checked in the current round of the sweep

    def groups(self, loaded: list[str]) -> int:
        """Requests one whole sweep of these views costs (when nothing changed)."""
        if not self.lists_etags:
            return len(loaded)
        return len({dir_id[:self.depth] for dir_id in loaded})

    async def step(self) -> int:
        """One interval's share of the sweep; returns the requests it sent."""
        loaded = list(self.views)
        if not loaded:
            return 0
        groups = self.groups(loaded)
        period = max(SWEEP_PERIOD, SWEEP_SPREAD * groups * self.refresh)
        # At most one request's worth per interval: never a burst after a long pause. A
        # listing of several pages (or revalidations) leaves a debt paid back by waiting.
        self._credit = min(self._credit + groups * self.refresh / period, 1.0)
        if self._credit < 1:
            return 0
        todo = [d for d in loaded if d not in self._swept]
        if not todo:
            self._swept.clear()
            todo = loaded
        sent = await self._check_group(todo[0], loaded)
        self._credit -= sent
        return sent

    async def _check_group(self, first: str, loaded: list[str]) -> int:
        if not self.lists_etags:
            self._swept.add(first)
            await self.revalidate(first)
            return 1
        prefix = first[:self.depth]
        listed = await listed_manifests(self.store, prefix=prefix)
        rows = len(listed)  # (keys that are not manifests are not counted: close enough)
        sent = max(1, -(-rows // PAGE_ROWS))
        self._adapt(rows)
        if any(info.etag is None for info in listed.values()):
            self.lists_etags = False  # this store's listings never carry them
            self._swept.add(first)
            await self.revalidate(first)
            return sent + 1
        for dir_id in loaded:
            if not dir_id.startswith(prefix):
                continue
            self._swept.add(dir_id)
            view = self.views.get(dir_id)
            if view is None:
                continue  # evicted meanwhile: checked when next loaded
            info = listed.get(dir_id)
            if (None if info is None else info.etag) != view.etag:
                await self.revalidate(dir_id)
                sent += 1
        return sent

    def _adapt(self, rows: int) -> None:
        """A listing should be one page and cover as many views as one page can."""
        if rows > PAGE_ROWS and self.depth < DEPTH_LIMIT:
            self.depth += 1
        elif rows * 16 <= PAGE_ROWS and self.depth > 0:
            self.depth -= 1
