"""The directory-view cache: each directory's last known manifest with this machine's
pending journal ops applied on top.

Views come from the local state database first, else from the bucket. A view (and a cached
manifest) is trusted until it is marked stale (`mark_stale`: the head watcher read that
another machine changed the directory); a stale one is revalidated with a conditional GET
before its next listing or load, or by the watcher if it is in memory. The interface is
small on purpose: `get`/`load`/`revalidate` to read, `set_remote`/`recompute`/`apply`
when the manifest or the journal changes, `add_empty`/`discard` for new directories.
Nothing outside reaches the views but through it, so when a view is revalidated (`stale`,
`load_fresh`) or how many stay in memory can change here alone. What a change means for
inodes and the kernel is the `ViewChanges` listener's business.

Memory is bounded: a view without pending ops shares its manifest's dict as its entries
(copied at the first local op), and once the views hold more than `max_entries` entries
the least recently loaded ones go, unless `NeededViews` says something still needs them.
An evicted view comes back from the local state database, without a request.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .errors import FsError, ManifestError, ObjectNotFound, StorageError, errno_for
from .journal import Journal
from .manifest import DirEntry, Entry, manifest_subdirs, parse_manifest
from .merge import Op, apply_ops
from .repository import manifest_key
from .state import StateDB
from .store.base import NOT_MODIFIED, Store, StoredObject

log = logging.getLogger(__name__)


@dataclass
class DirView:
    dir_id: str
    remote: dict[bytes, Entry]
    etag: str | None  # None: no manifest in the bucket yet (empty directory)
    checked: float
    entries: dict[bytes, Entry] = field(default_factory=dict)
    stale: int = 0  # 0: trusted; else the mark (DirViews._marks) that made it stale
    remote_mtime_ns: int | None = None  # the manifest's: when its names last changed
    mtime_ns: int | None = None  # the same with this machine's pending ops (None: unknown)
    subdirs: int = 0  # directories among `entries` (its st_nlink is 2 + this)


class NeededViews(Protocol):
    """Says whether a view must stay in memory: an inode named in it is known to the kernel
    or open, or its directory is being listed."""

    def view_needed(self, dir_id: str) -> bool: ...


class _NoneNeeded:
    def view_needed(self, dir_id: str) -> bool:
        return False


RECENT_KEPT = 16  # the views loaded last stay: a change awaiting a second load holds them


class ViewChanges(Protocol):
    """Told when a loaded view's entries changed other than by the kernel's own request."""

    def view_changed(self, dir_id: str, old: dict[bytes, Entry],
                     new: dict[bytes, Entry]) -> None: ...

    def diverted(self, dir_id: str, diverted: dict[bytes, bytes]) -> None:
        """Our version of names went to conflict copies (name -> copy's name)."""


class DirViews:
    def __init__(self, store: Store, db: StateDB, journal: Journal, *, host: str,
                 refresh: float, changes: ViewChanges, max_entries: int) -> None:
        self.store = store
        self.db = db
        self.journal = journal
        self.host = host
        self.refresh = refresh
        self.changes = changes
        self.offline_until = 0.0  # no revalidation before this (the storage was down)
        self.max_entries = max_entries
        self.recent_kept = RECENT_KEPT
        self.evictions = 0  # views evicted since started
        self.needed: NeededViews = _NoneNeeded()
        self._views: OrderedDict[str, DirView] = OrderedDict()  # least recently loaded first
        self._sizes: dict[str, int] = {}  # entries each view in memory holds
        self._total = 0
        self._trim_above = max_entries  # no eviction pass below this many entries
        self._loading: dict[str, trio.Event] = {}
        self._marked_while_loading: set[str] = set()
        # Folders this machine committed (a manifest written, the ops it carried retired)
        # while their view was being read: what was read may predate the commit and the
        # journal no longer has its ops, so the view is read again (`_written_meanwhile`).
        self._written_while_loading: set[str] = set()
        self._marks = 0

    # -- reading --------------------------------------------------------------------------
    def get(self, dir_id: str) -> DirView | None:
        """The view if it is in memory (no I/O)."""
        return self._views.get(dir_id)

    def __len__(self) -> int:
        return len(self._views)

    @property
    def entries_held(self) -> int:
        """How many entries the views in memory hold (what the bound counts)."""
        return self._total

    def __iter__(self) -> Iterator[str]:
        """The ids of the views in memory (a snapshot: the cache may change meanwhile)."""
        return iter(list(self._views))

    def stale(self, view: DirView) -> bool:
        """Whether a view is due for revalidation (marked, and the storage not known down)."""
        return bool(view.stale) and time.time() > self.offline_until

    def marked(self) -> list[str]:
        """The loaded views marked stale."""
        return [d for d, v in self._views.items() if v.stale]

    async def mark_stale(self, dir_ids: set[str] | None) -> None:
        """Other machines changed these directories (None: maybe any): loaded views are
        revalidated before their next use, cached manifests when next loaded."""
        await self.db.run(self.db.state.mark_stale, dir_ids)
        self._marks += 1
        targets = list(self._views) if dir_ids is None else dir_ids
        for dir_id in targets:
            view = self._views.get(dir_id)
            if view is not None:
                view.stale = self._marks
        loading = set(self._loading) if dir_ids is None else dir_ids & set(self._loading)
        self._marked_while_loading |= loading

    def storage_back(self) -> None:
        """The storage answers again: revalidate when due, not after the offline pause."""
        self.offline_until = 0.0

    async def load(self, dir_id: str, cached_only: bool = False) -> DirView:
        """The directory's view, loading it (local cache first, then the bucket; not
        `cached_only`: FsError ENOENT if it is not in the local cache)."""
        view = self._views.get(dir_id)
        if view is not None:
            self._views.move_to_end(dir_id)
            return view
        while dir_id in self._loading:
            await self._loading[dir_id].wait()
            if dir_id in self._views:
                return self._views[dir_id]
        done = self._loading[dir_id] = trio.Event()
        try:
            while True:
                self._written_while_loading.discard(dir_id)
                read = await self._read(dir_id, cached_only)
                if read is not None:
                    view = read
                    break
            self._compute(view)
            if dir_id in self._marked_while_loading:
                # Marked while it was read: what we read may predate the change.
                self._marks += 1
                view.stale = self._marks
                await self.db.run(self.db.state.mark_stale, {dir_id})
            self._keep(view)
            return view
        except ManifestError as exc:
            log.error("%s", exc)
            raise FsError(errno.EIO, str(exc)) from None
        finally:
            del self._loading[dir_id]
            self._marked_while_loading.discard(dir_id)
            self._written_while_loading.discard(dir_id)
            done.set()

    async def _read(self, dir_id: str, cached_only: bool) -> DirView | None:
        """The directory's manifest as a view without the journal's ops (`load`); None if
        this machine committed the directory meanwhile (read again: the ops that commit
        retired are in its manifest only, and an older manifest is not saved over it)."""
        cached = await self.db.run(self.db.state.load_manifest, dir_id)
        if cached is not None:
            etag, body, stale = cached
            view = DirView(dir_id, {}, etag, time.time())
            view.remote, view.remote_mtime_ns = self._parse(dir_id, body)
            if stale:
                view = await self._fresher(view)
        elif cached_only:
            raise FsError(errno.ENOENT)
        else:
            try:
                changed, obj = await self._fetch(dir_id, None)
            except StorageError as exc:
                log.error("cannot read directory %s: %s", dir_id, exc)
                raise FsError(errno_for(exc), f"cannot read directory {dir_id}") from None
            body = obj.data if obj else None
            view = DirView(dir_id, {}, obj.etag if obj else None, time.time())
            view.remote, view.remote_mtime_ns = self._parse(dir_id, body)
            if dir_id in self._written_while_loading:
                return None
            await self.db.run(self.db.state.save_manifest, dir_id, view.etag, body,
                              view.checked)
        return None if dir_id in self._written_while_loading else view

    def _written_meanwhile(self, dir_id: str) -> None:
        """Our manifest write of a directory whose view is not in memory landed: a load
        of it under way reads it again (see `_read`)."""
        if dir_id in self._loading:
            self._written_while_loading.add(dir_id)

    async def fetch_ahead(self, dir_id: str, checked: bool = True) -> list[str]:
        """Bring a manifest the mount will probably need soon (a listed directory's
        subdirectory) from the bucket into the local state database, so its `load` costs
        no request. Nothing if it is in memory, being loaded or already cached; a manifest
        that does not parse is not kept (its load reports it). Not `checked`: kept as if
        from an earlier run, revalidated at first use when online (but there to use
        offline). Returns the subdirectories the fetched manifest names (a walk's next
        wishes), none if nothing was fetched."""
        if dir_id in self._views or dir_id in self._loading:
            return []
        done = self._loading[dir_id] = trio.Event()
        subdirs: list[str] = []
        try:
            if await self.db.run(self.db.state.cached_manifests, [dir_id]):
                return []
            changed, obj = await self._fetch(dir_id, None)
            body = obj.data if obj else None
            if body is not None:
                subdirs = manifest_subdirs(body, dir_id)  # raises ManifestError: not kept
            if dir_id in self._written_while_loading:
                return []  # (committed by us meanwhile: what was fetched may be older)
            await self.db.run(self.db.state.save_manifest, dir_id, obj.etag if obj else None,
                              body, time.time())
            if not checked:
                await self.db.run(self.db.state.mark_stale, {dir_id})
        finally:
            del self._loading[dir_id]
            self._written_while_loading.discard(dir_id)
            done.set()
        return subdirs

    async def load_fresh(self, dir_id: str) -> DirView:
        """The view, revalidated first if it is due (a listing shows what the bucket holds
        within the refresh interval); what is cached if the storage cannot be reached."""
        view = await self.load(dir_id)
        if self.stale(view):
            try:
                await self.revalidate(dir_id)
            except StorageError as exc:
                log.warning("cannot revalidate a directory, showing what is cached: %s", exc)
                self.offline_until = time.time() + self.refresh
        return view

    async def revalidate(self, dir_id: str) -> bool:
        """Conditional GET; on change, recompute the view and tell the listener. Returns
        True if something changed."""
        view = self._views.get(dir_id)
        if view is None:
            return False
        mark = view.stale
        changed, obj = await self._fetch(dir_id, view.etag)
        now = time.time()
        if not changed:
            view.checked = now
            await self.db.run(self.db.state.manifest_checked, dir_id, view.etag)
            await self._settled(view, mark)
            return False
        body = obj.data if obj else None
        try:
            remote, mtime_ns = self._parse(dir_id, body)
        except ManifestError as exc:
            log.error("%s; keeping the last good version", exc)
            await self._settled(view, mark)
            return False
        await self.db.run(self.db.state.save_manifest, dir_id, obj.etag if obj else None,
                          body, now)
        self.set_remote(dir_id, remote, obj.etag if obj else None, mtime_ns)
        await self._settled(view, mark)
        return True

    async def _settled(self, view: DirView, mark: int) -> None:
        """A revalidation that started at `mark` ended: the view is trusted again, unless
        it was marked meanwhile (then the cached manifest stays stale too)."""
        if view.stale == mark:
            view.stale = 0
        else:
            await self.db.run(self.db.state.mark_stale, {view.dir_id})

    # -- changing -------------------------------------------------------------------------
    def set_remote(self, dir_id: str, remote: dict[bytes, Entry], etag: str | None,
                   mtime_ns: int | None = None) -> None:
        """A newer manifest is known (fetched, or written by us): recompute, and tell the
        listener about it. `mtime_ns`: the manifest's, if it has one (else unchanged)."""
        view = self._views.get(dir_id)
        if view is None:
            self._written_meanwhile(dir_id)
            return
        old = view.entries
        view.remote, view.etag, view.checked = remote, etag, time.time()
        if mtime_ns is not None:
            view.remote_mtime_ns = mtime_ns
        self._compute(view)
        self._resize(view)
        self.changes.view_changed(dir_id, old, view.entries)

    def committed(self, dir_id: str, remote: dict[bytes, Entry], etag: str, mtime_ns: int | None,
                  based_on: str | None, names: set[bytes]) -> None:
        """Our own manifest write landed: `remote` is the version `based_on` with only
        `names` changed (nothing merged from elsewhere). The view is updated by those names
        and the pending ops' (a batch's cost, not the folder's); a view computed from
        another version is recomputed whole (`set_remote`)."""
        view = self._views.get(dir_id)
        if view is None:
            self._written_meanwhile(dir_id)
            return
        if view.etag != based_on or view.entries is view.remote:
            self.set_remote(dir_id, remote, etag, mtime_ns)
            return
        ops = self.journal.ops_for(dir_id)
        touched = names | {op.name for op in ops}
        now = {n: remote[n] for n in touched if n in remote}
        merged: dict[str, str] = {}
        if apply_ops(now, ops, self.host, merged=merged) or merged:
            self.set_remote(dir_id, remote, etag, mtime_ns)  # conflict names: not by name
            return
        entries = view.entries
        old = {n: entries[n] for n in touched if n in entries}
        for name in touched:
            if name in now:
                entries[name] = now[name]
            else:
                entries.pop(name, None)
        view.subdirs += sum(isinstance(e, DirEntry) for e in now.values()) \
            - sum(isinstance(e, DirEntry) for e in old.values())
        view.remote, view.etag, view.checked = remote, etag, time.time()
        if mtime_ns is not None:
            view.remote_mtime_ns = mtime_ns
        local = self.journal.names_changed_at(dir_id)
        view.mtime_ns = view.remote_mtime_ns if local is None else \
            max(local, view.remote_mtime_ns or local)
        if not ops:
            view.entries = remote  # shared again, as `_compute` leaves it
        self._resize(view)
        self.changes.view_changed(dir_id, old, now)

    def recompute(self, dirs: set[str]) -> None:
        """The journal's ops for these directories changed (taken back): recompute their
        views and tell the listener."""
        for dir_id in dirs:
            view = self._views.get(dir_id)
            if view is not None:
                old = view.entries
                self._compute(view)
                self.changes.view_changed(dir_id, old, view.entries)

    def apply(self, dir_id: str, op: Op) -> None:
        """A just-recorded op, applied to the loaded view. The kernel made this change
        itself: nothing of its cache is stale, unless the name changed elsewhere meanwhile
        and ours went to a conflict copy."""
        view = self._views.get(dir_id)
        if view is not None:
            if view.entries is view.remote:  # shared until the first local op
                view.entries = dict(view.remote)
            before = isinstance(view.entries.get(op.name), DirEntry)
            diverted = apply_ops(view.entries, [op], self.host)
            view.subdirs += isinstance(view.entries.get(op.name), DirEntry) - before + sum(
                isinstance(view.entries.get(copy), DirEntry) for copy in diverted.values())
            if diverted:
                self.changes.diverted(dir_id, diverted)

    def names_changed(self, dir_id: str, at_ns: int) -> None:
        """A name in the directory was just created, removed or renamed here."""
        view = self._views.get(dir_id)
        if view is not None:
            view.mtime_ns = max(view.mtime_ns or at_ns, at_ns)

    def add_empty(self, dir_id: str, checked: float) -> DirView:
        """The view of a directory just made here: empty, without asking the bucket."""
        view = DirView(dir_id, {}, None, checked)
        self._compute(view)
        if dir_id not in self._views:
            self._keep(view)
        return view

    def discard(self, view: DirView) -> None:
        """Drop a view added by `add_empty` whose directory was not created after all."""
        if self._views.get(view.dir_id) is view:
            self._drop(view.dir_id)

    # -- the bound ------------------------------------------------------------------------
    def _keep(self, view: DirView) -> None:
        """Hold a view just loaded (most recently used), then make room if over the bound."""
        self._views[view.dir_id] = view
        self._resize(view)
        if self._total > self._trim_above:
            self.trim()

    def _resize(self, view: DirView) -> None:
        size = len(view.remote)
        self._total += size - self._sizes.get(view.dir_id, 0)
        self._sizes[view.dir_id] = size

    def _drop(self, dir_id: str) -> DirView:
        view = self._views.pop(dir_id)
        self._total -= self._sizes.pop(dir_id)
        return view

    def evictable(self, dir_id: str) -> bool:
        """Whether nothing needs the view: no pending op for its directory and nothing
        the `needed` listener knows of."""
        return not self.journal.ops_for(dir_id) and not self.needed.view_needed(dir_id)

    def trim(self, goal: int | None = None) -> int:
        """Evict the least recently loaded views nothing needs until the views hold at
        most `goal` entries (default: a tenth below the bound); the last few loaded always
        stay. Returns how many went."""
        goal = self.max_entries * 9 // 10 if goal is None else goal
        if self._total <= goal:
            return 0
        evicted = 0
        candidates = list(self._views)[:len(self._views) - self.recent_kept]
        for dir_id in candidates:
            if self._total <= goal:
                break
            if self.evictable(dir_id):
                self._drop(dir_id)
                evicted += 1
        self.evictions += evicted
        # Whatever stays pinned, the next pass waits for a tenth of the bound more.
        self._trim_above = max(self.max_entries, self._total + self.max_entries // 10)
        return evicted

    def compact(self) -> None:
        """Re-size the cache's dicts to the views left (after a large eviction)."""
        self._views = OrderedDict(self._views)
        self._sizes = dict(self._sizes)

    # -- internals ------------------------------------------------------------------------
    def _compute(self, view: DirView) -> None:
        local = self.journal.names_changed_at(view.dir_id)
        view.mtime_ns = view.remote_mtime_ns if local is None else \
            max(local, view.remote_mtime_ns or local)
        ops = self.journal.ops_for(view.dir_id)
        if not ops:
            view.entries = view.remote  # shared: `apply` copies before the first change
        else:
            entries = dict(view.remote)
            apply_ops(entries, ops, self.host, merged={})
            view.entries = entries
        view.subdirs = sum(isinstance(e, DirEntry) for e in view.entries.values())

    async def _fetch(self, dir_id: str, etag: str | None) -> tuple[bool, StoredObject | None]:
        """Conditional GET of a manifest: (changed, object or None when absent)."""
        try:
            got = await self.store.get(manifest_key(dir_id), if_none_match=etag)
        except ObjectNotFound:
            return (etag is not None), None
        if got is NOT_MODIFIED:
            return False, None
        assert isinstance(got, StoredObject)
        return True, got

    def _parse(self, dir_id: str, body: bytes | None) -> tuple[dict[bytes, Entry], int | None]:
        """The manifest's entries and its `mtime_ns`."""
        if body is None:
            return {}, None
        manifest, problems = parse_manifest(body, dir_id)
        for problem in problems:
            log.warning("%s", problem)
        return manifest.entries, manifest.mtime_ns

    async def _fresher(self, view: DirView) -> DirView:
        """A cached manifest marked stale, revalidated before first use (a conditional
        GET); offline it is shown as cached and stays stale."""
        try:
            changed, obj = await self._fetch(view.dir_id, view.etag)
            if not changed:
                await self.db.run(self.db.state.manifest_checked, view.dir_id, view.etag)
                return view
            body = obj.data if obj else None
            fresh = DirView(view.dir_id, {}, obj.etag if obj else None, time.time())
            fresh.remote, fresh.remote_mtime_ns = self._parse(view.dir_id, body)
        except StorageError as exc:
            log.warning("cannot revalidate a directory, showing what is cached: %s", exc)
            self.offline_until = time.time() + self.refresh
            self._marks += 1
            view.stale = self._marks
            return view
        except ManifestError as exc:
            log.error("%s; keeping the last good version", exc)
            return view
        if view.dir_id in self._written_while_loading:
            return view  # (`_read` reads again: what was fetched may predate our commit)
        await self.db.run(self.db.state.save_manifest, view.dir_id, fresh.etag, body,
                          fresh.checked)
        return fresh
