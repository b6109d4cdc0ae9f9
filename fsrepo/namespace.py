"""The namespace: lookups and the changes to names (create, mkdir, symlink, remove, rename,
replace), over the inode table (`inodes`) and the directory-view cache (`dirviews`).

Every change is recorded into the journal's order and applied to the loaded views at once
(`_record`), then made durable (`settle`); the uploader later carries it to the bucket, and
revalidation brings other machines' changes in. This module knows nothing about FUSE:
`Invalidator` is how the kernel is told that cached entries went stale.
"""

from __future__ import annotations

import errno
import gc
import logging
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from .announce import Announcer, EditTracker, Invalidator
from .dirviews import DirView, DirViews
from .errors import FsError, errno_for
from .heap import Heap
from .inodes import ROOT_INO, InodeTable, Node, is_same_object
from .journal import Journal, Record
from .manifest import (
    MAX_ENTRIES,
    MAX_NAME,
    ROOT_ID,
    DirEntry,
    Entry,
    FileEntry,
    SymlinkEntry,
    check_name,
)
from .merge import Op, same_object
from .paths import entry_path
from .prefetch import ManifestPrefetcher
from .state import StateDB
from .store.base import Store

log = logging.getLogger(__name__)

EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
# After this many inodes forgotten by the kernel, the views they pinned are let go (down to
# a tenth of the bound: an idle mount gives its memory back).
FORGETS_PER_TRIM = 4096
IDLE_AFTER = 30.0  # seconds without a lookup or listing: the mount is idle, memory goes back
IDLE_CHECK = 5.0  # how often the idle release looks
FORGET_WAIT = 5.0  # after asking the kernel to forget, how long its forgets take to arrive
SHED_TO = 0.4  # a shed asks the kernel to forget files down to this share of the cap
SHED_AGAIN = 0.05  # the next shed once the table grew this share of the cap past the last
# While the kernel holds more inodes than the cap and the last shed asked it to forget some,
# each lookup and listing first waits this long with the GIL released. pyfuse3 sends the
# invalidations from a thread of its own, one per hand-over of the GIL, and a walk that
# keeps the loop busy starves it: a warm `find` over 1M files left the kernel holding 420k
# inodes, 890k after the third (RSS 285, then 557 MiB), with a cap of 100k.
CROWDED_PAUSE = 0.0005  # seconds


class KnownBlobs(Protocol):
    """Told of blobs an op carries from a manifest read from the bucket: they are there."""

    def note_known(self, shas: set[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class DirStat:
    """What stat shows of a directory beyond its entry: links and times."""

    nlink: int  # 2 + its subdirectories
    mtime_ns: int
    ctime_ns: int


def dir_times(entry: DirEntry, names_changed_ns: int | None) -> tuple[int, int]:
    """A directory's (mtime, ctime): the last change of its names (its manifest's time, or
    a pending op's) unless its attributes were set later (chmod, utimens: the entry's
    ctime); `cp -a` and `rsync -a` set a directory's time after filling it, and keep it."""
    set_at = entry.mtime_ns if entry.ctime_ns is None else entry.ctime_ns
    if names_changed_ns is not None and names_changed_ns > set_at:
        return names_changed_ns, names_changed_ns
    return entry.mtime_ns, set_at


class Namespace:
    def __init__(self, store: Store, db: StateDB, journal: Journal, *, host: str,
                 refresh: float, known_blobs: KnownBlobs, view_cache_entries: int,
                 idle_after: float = IDLE_AFTER, invalidator: Invalidator | None = None) -> None:
        self.db = db
        self.journal = journal
        self.invalidator = invalidator or Invalidator()
        self.inodes = InodeTable()
        self._announcer = Announcer(self.inodes, self.invalidator)
        self.known_blobs = known_blobs
        self.views = DirViews(store, db, journal, host=host, refresh=refresh,
                              changes=self._announcer, max_entries=view_cache_entries)
        self.views.needed = self
        self.prefetcher = ManifestPrefetcher(self.views.fetch_ahead)  # run by the mount
        self._forgotten = 0  # inodes forgotten since the views were last trimmed
        self.idle_after = idle_after  # 0: never
        self.idle_check = min(IDLE_CHECK, idle_after / 2) if idle_after > 0 else IDLE_CHECK
        self.forget_wait = FORGET_WAIT
        self.heap = Heap()
        self._last_used = 0.0  # trio time of the last lookup or listing
        self._used_since_release = False  # a walk since the last idle release
        self._evicted_since_release = False  # views let go that the heap has not given back
        # Files the kernel may keep while a walk goes on (each costs an inode and pins its
        # folder's view): above this, the least recently loaded folders' files are asked
        # to be forgotten at once (`shed`), not only when the mount is idle.
        self.kernel_files = view_cache_entries
        self._shed_above = 0  # after a shed: its table size and SHED_AGAIN of the cap
        self._last_shed_asked = 0  # forgets the last shed asked for (0 after an idle release)
        self.pause: Callable[[float], None] = time.sleep  # (blocking: releases the GIL)
        # Folders whose files the kernel was asked to forget, not used since: not asked
        # again (its forgets arrive over seconds; asking again would only flood it).
        self._shed_dirs: set[str] = set()
        self._over_cap = trio.Event()
        # The file layer's: a file closed and not named yet is named before its name is
        # removed or renamed (the closed-file log holds the name: commit.py).
        self.before_name_change: Callable[[int, bytes], Awaitable[None]] | None = None
        # The layers above's caches of what a walk saw (readdirplus's kept attributes),
        # emptied at the idle release with the views and inodes.
        self.on_idle_release: list[Callable[[], None]] = []

    async def _before_name_change(self, parent: int, name: bytes) -> None:
        if self.before_name_change is not None:
            await self.before_name_change(parent, name)

    def track_edits(self, tracker: EditTracker) -> None:
        """Which file inodes are being edited (the file layer, built after us): a remote
        change does not take those away from their name."""
        self._announcer.track_edits(tracker)

    # -- lookups --------------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        return self.inodes.node(ino)

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)
        self._forgotten += 1
        if self._forgotten >= FORGETS_PER_TRIM:
            self._forgotten = 0
            if self.views.trim(self.views.max_entries // 10):
                self._evicted_since_release = True

    def _used(self) -> None:
        if self._last_shed_asked and len(self.inodes.nodes) > self.kernel_files:
            self.pause(CROWDED_PAUSE)  # the shed's invalidations go meanwhile: see above
        self._last_used = trio.current_time()
        self._used_since_release = True
        if len(self.inodes.nodes) > max(self.kernel_files, self._shed_above):
            self._over_cap.set()

    async def release_when_idle(self) -> None:
        """Run by the mount: once nothing has been looked up or listed for `idle_after`
        seconds after a walk, ask the kernel to forget the files it caches (`forget_files`),
        let go of the views nothing needs any more, and give the freed heap back to the OS.
        The next walk looks names up again, from the views or the local state. Meanwhile,
        whenever the kernel holds more than `kernel_files` inodes, shed the oldest."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._shed_when_over)
            if self.idle_after > 0:
                await self._release_when_idle()
            else:
                await trio.sleep_forever()

    async def _shed_when_over(self) -> None:
        while True:
            await self._over_cap.wait()
            self._over_cap = trio.Event()
            await self.shed()

    async def shed(self) -> int:
        """Ask the kernel to forget the files of the least recently loaded folders, down to
        SHED_TO of `kernel_files` inodes: a walk over a million files keeps memory for a
        few hundred thousand, not for all. The folders being listed and the last few loaded
        keep theirs (a walk's `ls -l` there needs no lookup again). Returns how many were
        asked; the next shed waits until the table grows SHED_AGAIN of the cap more (the
        kernel's forgets arrive meanwhile: at 1M files a tenth let the peak pass 200 MiB)."""
        goal = len(self.inodes.nodes) - int(self.kernel_files * SHED_TO)
        asked = yielded = 0
        order = list(self.views)
        for dir_id in order[:max(0, len(order) - self.views.recent_kept)]:
            if asked >= goal:
                break
            dnode = self.inodes.of_dir(dir_id)
            if dnode is None or dnode.opens > 0 or dir_id in self._shed_dirs:
                continue
            self._shed_dirs.add(dir_id)
            for node in self.inodes.files_in(dnode.ino):
                if node.opens <= 0 and node.lookups > 0:
                    self.invalidator.entry(node.parent, node.name)
                    asked += 1
            if asked - yielded >= 4096:
                yielded = asked
                await trio.sleep(0)  # let requests through
        self._shed_above = len(self.inodes.nodes) + int(self.kernel_files * SHED_AGAIN)
        self._last_shed_asked = asked
        log.debug("the kernel holds %d inodes: asked it to forget %d files",
                  len(self.inodes.nodes), asked)
        return asked

    async def _release_when_idle(self) -> None:
        while True:
            await trio.sleep(self.idle_check)
            if trio.current_time() - self._last_used < self.idle_after:
                continue
            if self._used_since_release:
                self._used_since_release = False
                asked = await self.forget_files()
                await trio.sleep(self.forget_wait)
                if self._used_since_release:
                    continue  # in use again: the next idle period
                evicted = self.views.trim(0)
                self._evicted_since_release = False
                self.inodes.compact()
                self._shed_dirs = set()
                self._last_shed_asked = 0
                self.views.compact()
                self.prefetcher.forget_found()
                for release in self.on_idle_release:
                    release()
                gc.collect()  # (a full collection empties CPython's free lists too)
                self.heap.give_back()
                log.debug("idle release: the kernel was asked to forget %d files, %d views "
                          "went; %d inodes and %d views (%d entries) left", asked, evicted,
                          len(self.inodes.nodes), len(self.views), self.views.entries_held)
            elif self._evicted_since_release:  # the kernel forgot more meanwhile
                self._evicted_since_release = False
                self.heap.give_back()

    async def forget_files(self) -> int:
        """Ask the kernel to drop its cached entries of the files (and symlinks) it knows
        and no handle has open: the bulk of a walk's inodes, and what pins the folders'
        views. Directories are left alone: invalidating one a process has as its working
        directory would make its getcwd() fail. Returns how many were named."""
        asked = 0
        for node in list(self.inodes.nodes.values()):
            if node.dir_id is None and node.parent != 0 and node.opens <= 0 \
                    and node.lookups > 0:
                self.invalidator.entry(node.parent, node.name)
                asked += 1
                if asked % 4096 == 0:
                    await trio.sleep(0)  # a million of them: let requests through
        return asked

    def view_needed(self, dir_id: str) -> bool:
        """A view stays in memory while an inode named in it exists (the kernel knows it,
        or a handle is open: its entry is read from the view) or its directory is open."""
        node = self.inodes.of_dir(dir_id)
        return node is not None and (node.opens > 0 or self.inodes.has_children(node.ino))

    @staticmethod
    def looked_up(node: Node) -> None:
        """The kernel was handed the node (a lookup, or a readdirplus entry it accepted):
        it holds one more reference, given back by `forget`."""
        node.lookups += 1

    async def lookup(self, parent: int, name: bytes, count: bool = True) -> tuple[Node, Entry]:
        self._used()
        if len(name) > MAX_NAME:
            raise FsError(errno.ENAMETOOLONG)
        pnode = self.inodes.dir_node(parent)
        self._shed_dirs.discard(pnode.dir_id)  # type: ignore[arg-type]
        view = await self.views.load(pnode.dir_id)  # type: ignore[arg-type]
        node, entry = self.lookup_loaded(parent, view, name, self.inodes.ancestors(parent))
        if count:
            self.looked_up(node)
        return node, entry

    async def know_dir(self, entry: Entry) -> None:
        """Load a directory's view if it can be (its stat needs it: `dir_stat`); one that
        cannot be read now (offline and not cached) is shown without it. Lookups do not
        load it: a path walk needs no stat, and the kernel asks `getattr` for what it was
        told expires at once."""
        if isinstance(entry, DirEntry) and self.views.get(entry.id) is None:
            try:
                await self.views.load(entry.id, cached_only=not self.views.store.online)
            except FsError:
                pass

    def dir_stat(self, entry: DirEntry) -> DirStat | None:
        """A directory's link count and times; None while its view is not in memory."""
        view = self.views.get(entry.id)
        if view is None:
            return None
        mtime, ctime = dir_times(entry, view.mtime_ns)
        return DirStat(2 + view.subdirs, mtime, ctime)

    def lookup_loaded(self, parent: int, view: DirView, name: bytes,
                      ancestors: set[str]) -> tuple[Node, Entry]:
        """lookup in a view already in memory (readdirplus: no await per entry)."""
        entry = view.entries.get(name)
        if entry is None:
            raise FsError(errno.ENOENT)
        if isinstance(entry, DirEntry) and entry.id in ancestors:
            log.error("%s refused: it is one of the folders above it (a cycle in the "
                      "listings)", entry_path(self.inodes, view.dir_id, name))
            raise FsError(errno.EIO)
        return self.inodes.node_for(parent, name, entry), entry

    async def loaded_view(self, ino: int) -> tuple[DirView, set[str]]:
        """A directory's view and its ancestors' ids, for lookup_loaded."""
        node = self.inodes.dir_node(ino)
        view = await self.views.load(node.dir_id)  # type: ignore[arg-type]
        return view, self.inodes.ancestors(ino)

    def entry_of(self, node: Node) -> Entry | None:
        """The node's current entry, or None if its name is gone (orphan)."""
        if node.ino == ROOT_INO:
            return DirEntry(ROOT_ID, 0, 0o755)
        view = self._parent_loaded(node)
        if view is None:
            return None
        entry = view.entries.get(node.name)
        return entry if is_same_object(node, entry) else None

    def folder_of(self, node: Node) -> DirView | None:
        """The view of the folder a file is in, if in memory (reads follow its order)."""
        return self._parent_loaded(node)

    def _parent_loaded(self, node: Node) -> DirView | None:
        """The view of the node's directory if it is in memory (None for an orphan)."""
        pnode = self.inodes.get(node.parent)
        if pnode is None or pnode.dir_id is None:
            return None
        return self.views.get(pnode.dir_id)

    async def listing(self, ino: int) -> list[tuple[bytes, Entry]]:
        node = self.inodes.dir_node(ino)
        view = await self.views.load_fresh(node.dir_id)  # type: ignore[arg-type]
        return sorted(view.entries.items())

    async def open_listing(self, ino: int) -> list[tuple[bytes, Entry]]:
        """`listing` for an opened directory handle: the view stays in memory (readdir
        reads it) until `close_listing`. The subdirectories' manifests are fetched ahead:
        a walk opens them next."""
        self._used()
        names = await self.listing(ino)
        views = self.views
        subdirs = [e.id for _, e in names if isinstance(e, DirEntry) and views.get(e.id) is None]
        if subdirs and self.prefetcher.running:  # one query for all, not a look each
            cached = await self.db.run(self.db.state.cached_manifests, subdirs)
            self.prefetcher.want([d for d in subdirs if d not in cached],
                                 [d for d in subdirs if d in cached])
        dnode = self.inodes.dir_node(ino)
        dnode.opens += 1
        self._shed_dirs.discard(dnode.dir_id)  # type: ignore[arg-type]
        return names

    def close_listing(self, ino: int) -> None:
        node = self.inodes.get(ino)
        if node is not None:
            node.opens -= 1
            self.inodes.drop_if_unused(node)

    # -- changes --------------------------------------------------------------------------
    # Each change loads what it needs first (awaits), then checks and records synchronously
    # (no await in between, so no lock is needed), then waits until the journal has it written.
    def _record(self, ops: list[tuple[str, Op, int | None]],
                new_blobs: list[tuple[str, int]] | tuple = (), dedup_bytes: int = 0) -> Record:
        """Put ops into the journal's order and apply them to the views, now."""
        rec = self.journal.record(ops, new_blobs, dedup_bytes)
        for dir_id, op, _ in ops:
            self.views.apply(dir_id, op)
        return rec

    def _carried(self, view: DirView, name: bytes, entry: Entry) -> None:
        """An op carries the entry of a file the view's manifest names (a rename, a chmod
        of a file another machine wrote): its blob is in the bucket, and the commit must
        know it, or it would wait for an upload that cannot start (the content may be only
        in the bucket). Noted here, per op, not for every manifest read: a walk over a
        million photos, a blob each, adds nothing to the index (it held ~40 MB of ids)."""
        there = view.remote.get(name)
        if isinstance(entry, FileEntry) and isinstance(there, FileEntry) \
                and there.sha256 == entry.sha256:
            self.known_blobs.note_known({sha for sha, _ in there.blobs()})

    def _names_changed(self, rec: Record) -> None:
        """The recorded ops created, removed or renamed names: their directories' mtime is
        now (and travels with the ops into the manifests: `PendingOp.names_at`)."""
        now = time.time_ns()
        for pending in rec.pending:
            pending.names_at = now
            self.views.names_changed(pending.dir_id, now)

    async def settle(self, rec: Record) -> None:
        """Wait until recorded ops are written (they survive a crash of the process; the
        group commit makes them survive a power loss); if that fails they are undone
        (FsError with the disk's errno)."""
        try:
            await self.journal.write(rec)
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot write the local journal: %s", exc)
            self.views.recompute(rec.dirs)
            raise FsError(errno_for(exc)) from None

    async def undo(self, rec: Record) -> None:
        """Take back recorded ops whose other half (the file's data) could not be kept."""
        self.journal.forget(rec.pending)
        await self.db.run(self.db.state.drop_ops, [p.seq for p in rec.pending])
        self.views.recompute(rec.dirs)

    async def load_parent(self, node: Node) -> None:
        """Load the view of the node's directory (record_replace needs it in memory)."""
        pnode = self.inodes.get(node.parent)
        if pnode is not None and pnode.dir_id is not None and node.parent != 0:
            await self.views.load(pnode.dir_id)

    async def _parent_view(self, parent: int, name: bytes) -> tuple[Node, DirView]:
        try:
            check_name(name)
        except ValueError:
            raise FsError(errno.ENAMETOOLONG if len(name) > 255 else errno.EINVAL) from None
        pnode = self.inodes.dir_node(parent)
        if pnode.parent == 0:
            raise FsError(errno.ENOENT)  # the directory was removed
        return pnode, await self.views.load(pnode.dir_id)  # type: ignore[arg-type]

    async def create(self, parent: int, name: bytes, entry: Entry, wait: bool = True) -> Node:
        """Create a name that must not exist (create, mkdir, symlink); `wait`: until the
        journal has it written."""
        pnode, view = await self._parent_view(parent, name)
        if name in view.entries:
            raise FsError(errno.EEXIST)
        _room_for_one_more(view)
        rec = self._record([(view.dir_id, Op(name, entry, None), None)])
        self._names_changed(rec)
        node = self.inodes.node_for(parent, name, entry)
        self.looked_up(node)
        if wait:
            await self.settle(rec)
        # else: written with the next change (the file's close) or by write_behind
        return node

    async def mkdir(self, parent: int, name: bytes, mode: int) -> tuple[Node, Entry]:
        entry = DirEntry(uuid.uuid4().hex, time.time_ns(), mode & 0o7777)
        # A new directory has no manifest anywhere yet: it is known to be empty without
        # asking the bucket (so it can be filled offline, and costs no GET online).
        now = time.time()
        await self.db.run(self.db.state.save_manifest, entry.id, None, None, now)
        view = self.views.add_empty(entry.id, now)
        try:
            return await self.create(parent, name, entry), entry
        except BaseException:
            self.views.discard(view)
            raise

    async def symlink(self, parent: int, name: bytes, target: bytes) -> tuple[Node, Entry]:
        if not target or b"\0" in target or len(target) > 4095:
            raise FsError(errno.EINVAL)
        entry = SymlinkEntry(target, time.time_ns())
        return await self.create(parent, name, entry), entry

    def record_replace(self, node: Node, entry: Entry,
                       new_blobs: list[tuple[str, int]] | tuple = (),
                       dedup_bytes: int = 0, base: Entry | None = None) -> Record | None:
        """Record a file's new entry (content or attributes); None if the node is orphaned
        or its directory is not loaded. `base`: the entry the new content was made from
        (if the name holds something else now, the merge keeps both). `settle` the result."""
        view = self._parent_loaded(node) if node.parent != 0 else None
        if view is None:
            return None
        current = view.entries.get(node.name)
        if base is None and current is not None and not same_object(current, entry):
            return None
        if not new_blobs:  # the same content, or content the bucket was seen to have
            self._carried(view, node.name, entry)
        return self._record([(view.dir_id, Op(node.name, entry, base or current), None)],
                            new_blobs, dedup_bytes)

    async def replace(self, node: Node, entry: Entry,
                      new_blobs: list[tuple[str, int]] | tuple = (),
                      dedup_bytes: int = 0) -> bool:
        """Set a file's entry durably. False if the node is orphaned."""
        await self.load_parent(node)
        rec = self.record_replace(node, entry, new_blobs, dedup_bytes)
        if rec is None:
            return False
        await self.settle(rec)
        return True

    async def remove(self, parent: int, name: bytes, is_dir: bool) -> Node | None:
        await self._before_name_change(parent, name)
        pnode, view = await self._parent_view(parent, name)
        entry = view.entries.get(name)
        if isinstance(entry, DirEntry) and is_dir:
            await self.views.load(entry.id)
            entry = view.entries.get(name)  # it may have changed meanwhile
        if entry is None:
            raise FsError(errno.ENOENT)
        if is_dir:
            if not isinstance(entry, DirEntry):
                raise FsError(errno.ENOTDIR)
            self._require_empty(entry)
        elif isinstance(entry, DirEntry):
            raise FsError(errno.EISDIR)
        rec = self._record([(view.dir_id, Op(name, None, entry), None)])
        self._names_changed(rec)
        node = self.inodes.of_dir(entry.id) if isinstance(entry, DirEntry) else \
            self.inodes.of_name(parent, name)
        if node is not None:
            self.inodes.orphan(node)
        await self.settle(rec)
        return node

    def record_fix(self, dir_id: str, op: Op, requires: int | None) -> Record:
        """Record an op the manifest commit decides on, not the kernel: a rename taken
        back because another machine's landed first (recorded as a rename's source side,
        `requires` seq 0: nothing to wait for, and not a removal of the directory itself),
        or a directory put back because another machine added to it while this one
        removed it. No inode is orphaned; the kernel's entry for the name goes (`settle`
        the result)."""
        rec = self._record([(dir_id, op, requires)])
        pnode = self.inodes.of_dir(dir_id)
        if pnode is not None:
            self.invalidator.entry(pnode.ino, op.name)
        return rec

    def _require_empty(self, entry: DirEntry) -> None:
        """rmdir and rename-over-a-directory: the directory (loaded) must be empty."""
        view = self.views.get(entry.id)
        if view is None or view.entries:
            raise FsError(errno.ENOTEMPTY)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     noreplace: bool = False) -> None:
        await self._before_name_change(old_parent, old_name)
        await self._before_name_change(new_parent, new_name)
        _, src = await self._parent_view(old_parent, old_name)
        _, dst = await self._parent_view(new_parent, new_name)
        target = dst.entries.get(new_name)
        if isinstance(target, DirEntry):
            await self.views.load(target.id)
        # Everything needed is loaded: from here on, no awaits until the ops are recorded.
        entry = src.entries.get(old_name)
        target = dst.entries.get(new_name)
        if entry is None:
            raise FsError(errno.ENOENT)
        if src is dst and old_name == new_name:
            return
        if target is not None:
            if noreplace:
                raise FsError(errno.EEXIST)
            if isinstance(target, DirEntry):
                if not isinstance(entry, DirEntry):
                    raise FsError(errno.EISDIR)
                self._require_empty(target)
            elif isinstance(entry, DirEntry):
                raise FsError(errno.ENOTDIR)
        if isinstance(entry, DirEntry) and entry.id in self.inodes.ancestors(new_parent):
            raise FsError(errno.EINVAL)
        if target is None and src is not dst:
            _room_for_one_more(dst)
        self._carried(src, old_name, entry)
        put = Op(new_name, entry, target)
        delete = Op(old_name, None, entry)
        if src is dst:
            ops = [(dst.dir_id, put, None), (src.dir_id, delete, None)]
        else:  # the add must reach the bucket before the removal
            ops = [(dst.dir_id, put, None), (src.dir_id, delete, -1)]
        rec = self._record(ops)
        self._names_changed(rec)
        # move the inode
        if target is not None:
            self.inodes.detach(new_parent, new_name)
        node = self.inodes.of_dir(entry.id) if isinstance(entry, DirEntry) else \
            self.inodes.of_name(old_parent, old_name)
        if node is not None:
            self.inodes.move(node, new_parent, new_name)
        await self.settle(rec)


def _room_for_one_more(view: DirView) -> None:
    """ENOSPC for a new name in a directory at the entry limit: a manifest beyond it would
    be refused by every machine that reads it (this one included)."""
    if len(view.entries) >= MAX_ENTRIES:
        log.error("directory %s holds %d entries, the limit of one directory: new names "
                  "are refused", view.dir_id, len(view.entries))
        raise FsError(errno.ENOSPC)
