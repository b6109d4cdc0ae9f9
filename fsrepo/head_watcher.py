"""Sees other machines' changes through their change records (heads.py), at a cost that does
not grow with the directories this mount has loaded.

Every `--refresh` seconds: one conditional GET of `heads-touched.json` (304 while no writer
wrote a head). When it changed: one LIST of `heads/` and a conditional GET of each other
writer's head; the directories a head names with a seq above the last one applied from that
writer are marked stale (`DirViews.mark_stale`), and the loaded ones among them revalidated
at once (a conditional GET each, the kernel told what changed). A writer's ring that no
longer reaches back to what we last saw marks everything stale, once. The last seq applied
per writer is kept in the local state, so a remount revalidates only what changed while it
was away and trusts the rest of its cache without a request.

A safety net for a writer that crashed between a manifest PUT and its head PUT and never
came back: the loaded views are checked against listings of their manifests' etags in the
background (view_sweep.py), all of them at least once a day, at ~1 request a day per 600
loaded folders.
"""

from __future__ import annotations

import logging
import time

import trio

from .dirviews import DirViews
from .errors import ImgrepoError, ObjectNotFound, StorageError
from .heads import HEADS_PREFIX, TOUCH_KEY, HeadError, parse_head, writer_of
from .repository import DESCRIPTOR_KEY, HEADS_VERSION, parse_descriptor
from .state import StateDB
from .store.base import NOT_MODIFIED, Store, StoredObject
from .view_sweep import ViewSweep

log = logging.getLogger(__name__)

# A head listed with the mtime and size it had when we read it, and older than this, was not
# rewritten since (a rewrite gets a later mtime): its GET is skipped. Heads of writers gone
# for good (a cache deleted, a machine retired) then cost nothing but their LIST row.
SETTLED_AFTER = 600.0
TOUCH_ETAG = "heads_touched_etag"  # meta key: the touch object's etag when last read


class HeadWatcher:
    """Polls the change records and marks (and revalidates) what other machines changed."""

    def __init__(self, store: Store, db: StateDB, views: DirViews, refresh: float, *,
                 legacy: bool | None = None) -> None:
        self.store = store
        self.db = db
        self.views = views
        self.refresh = refresh
        # A repository still in format 1 (an old mount may write without heads): every
        # loaded view is revalidated every interval, as before heads existed. None: not
        # known yet (read from the descriptor at the first poll).
        self.legacy = legacy
        self.polls = 0  # rounds that reached the storage
        self._wake = trio.Event()
        self.sweep = ViewSweep(store, views, refresh, self._revalidate)
        self._read_at: dict[str, tuple[float, int]] = {}  # head key -> listed (mtime, size)

    def know_format(self, version: int) -> None:
        """The repository's format version (the mount read the descriptor when it opened
        the repository: the first poll does not ask for it again)."""
        self.legacy = version < HEADS_VERSION
        if self.legacy:
            log.warning("this repository is still in format 1 (not upgraded: read-only "
                        "mount?): every loaded folder is revalidated every %g s",
                        self.refresh)

    def wake(self) -> None:
        """The storage answers again: poll now, not at the end of the interval."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self.refresh):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.round()
            except StorageError as exc:
                log.debug("change records not read (will retry): %s", exc)
            except (ImgrepoError, OSError) as exc:
                log.warning("change records not read (will retry): %s", exc)

    async def round(self) -> None:
        """One interval's work: poll, revalidate what is marked, sweep a little."""
        await self.poll()
        await self.revalidate_marked()
        await self.sweep.step()

    # -- reading the change records -----------------------------------------------------
    async def poll(self) -> None:
        """Mark stale what other machines changed since we last looked."""
        if self.legacy is None:
            obj = await self.store.get(DESCRIPTOR_KEY)
            assert isinstance(obj, StoredObject)
            self.know_format(parse_descriptor(obj.data, self.store.url).version)
        if self.legacy:
            await self.views.mark_stale(None)
            self.polls += 1
            return
        state = self.db.state
        known = await self.db.run(state.get_meta, TOUCH_ETAG)
        try:
            got = await self.store.get(TOUCH_KEY, if_none_match=known)
        except ObjectNotFound:
            self.polls += 1
            return  # no machine wrote a head yet
        self.polls += 1
        if got is NOT_MODIFIED:
            return
        assert isinstance(got, StoredObject)
        await self._read_heads()
        # Only now: a round cut short reads the heads again next time.
        await self.db.run(state.set_meta, TOUCH_ETAG, got.etag)

    async def _read_heads(self) -> None:
        state = self.db.state
        me = await self.db.run(state.writer_id)
        seen = await self.db.run(state.heads_seen)
        listed = [info async for info in self.store.list(HEADS_PREFIX)]
        for info in listed:
            key, writer = info.key, writer_of(info.key)
            if writer is None or writer == me:
                continue
            stamp = (info.mtime, info.size)
            if self._read_at.get(key) == stamp and info.mtime < time.time() - SETTLED_AFTER:
                continue  # written long ago and not since: a writer no longer active
            last_seq, last_etag = seen.get(writer, (0, None))
            try:
                got = await self.store.get(key, if_none_match=last_etag)
            except ObjectNotFound:
                continue
            if got is NOT_MODIFIED:
                self._read_at[key] = stamp
                continue
            assert isinstance(got, StoredObject)
            try:
                head = parse_head(got.data, key)
            except HeadError as exc:
                log.warning("%s; revalidating every directory", exc)
                await self.views.mark_stale(None)
                await self.db.run(state.saw_head, writer, last_seq, got.etag)
                continue
            if head.seq > last_seq:
                changed = head.changed_since(last_seq)
                if changed is None:
                    log.info("missed changes of %s (its record no longer reaches back to "
                             "them): revalidating every directory", head.host or writer)
                    await self.views.mark_stale(None)
                elif changed:
                    await self.views.mark_stale(changed)
            # After the marks: a crash in between reads this head again.
            await self.db.run(state.saw_head, writer, max(head.seq, last_seq), got.etag)
            self._read_at[key] = stamp

    # -- revalidating -------------------------------------------------------------------
    async def revalidate_marked(self) -> None:
        """Revalidate the loaded views marked stale (the kernel is told what changed)."""
        for dir_id in self.views.marked():
            await self._revalidate(dir_id)

    async def _revalidate(self, dir_id: str) -> None:
        try:
            await self.views.revalidate(dir_id)
        except StorageError:
            raise
        except ImgrepoError as exc:
            log.warning("revalidation of %s failed: %s", dir_id, exc)
