"""The namespace: inodes, directory views and the operations that change them.

A directory's view is its last known manifest with the pending journal ops applied on top.
Every change goes through `_change`, which journals the ops durably and then applies them to
the in-memory views; the uploader later carries them to the bucket, and the refresher brings
other machines' changes in. This module knows nothing about FUSE: `Invalidator` is how it
tells the kernel that cached entries went stale.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .errors import FsError, ManifestError, ObjectNotFound, StorageError, errno_for
from .journal import Journal, Record
from .manifest import (
    ROOT_ID,
    DirEntry,
    Entry,
    FileEntry,
    SymlinkEntry,
    check_name,
    parse_manifest,
)
from .merge import Op, apply_ops, same_content
from .repository import manifest_key
from .state import StateDB
from .store.base import NOT_MODIFIED, Store, StoredObject

log = logging.getLogger(__name__)

ROOT_INO = 1
EMPTY_SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@dataclass
class Node:
    ino: int
    parent: int
    name: bytes
    dir_id: str | None  # set for directories
    lookups: int = 0
    is_link: bool = False
    opens: int = 0


@dataclass
class DirView:
    dir_id: str
    remote: dict[bytes, Entry]
    etag: str | None  # None: no manifest in the bucket yet (empty directory)
    checked: float
    entries: dict[bytes, Entry] = field(default_factory=dict)


class Invalidator:
    """Tells the kernel what went stale; the FUSE layer provides the real one."""

    def entry(self, parent_ino: int, name: bytes) -> None:
        pass

    def inode(self, ino: int) -> None:
        pass


class Namespace:
    def __init__(self, store: Store, db: StateDB, journal: Journal, *, host: str,
                 refresh: float, invalidator: Invalidator | None = None) -> None:
        self.store = store
        self.db = db
        self.journal = journal
        self.host = host
        self.refresh = refresh
        self.invalidator = invalidator or Invalidator()
        self.nodes: dict[int, Node] = {ROOT_INO: Node(ROOT_INO, ROOT_INO, b"", ROOT_ID, 1)}
        self._by_key: dict[tuple[int, bytes], int] = {}
        self._dir_ino: dict[str, int] = {ROOT_ID: ROOT_INO}
        self._next_ino = ROOT_INO + 1
        self.views: dict[str, DirView] = {}
        self._loading: dict[str, trio.Event] = {}
        self.on_remote_blobs: Callable[[set[str]], None] = lambda shas: None
        self.offline_until = 0.0
        # Whether a file inode is open for writing or has unsaved changes (set by the
        # FileManager): a remote change does not take it away from its name; saving merges.
        self.editing: Callable[[int], bool] = lambda ino: False

    # -- directory views ------------------------------------------------------------------
    def _compute(self, view: DirView) -> None:
        entries = dict(view.remote)
        apply_ops(entries, self.journal.ops_for(view.dir_id), self.host)
        view.entries = entries

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

    def _parse(self, dir_id: str, body: bytes | None) -> dict[bytes, Entry]:
        if body is None:
            return {}
        manifest, problems = parse_manifest(body, dir_id)
        for problem in problems:
            log.warning("%s", problem)
        self.on_remote_blobs({e.sha256 for e in manifest.entries.values()
                              if isinstance(e, FileEntry)})
        return manifest.entries

    async def view(self, dir_id: str) -> DirView:
        """The directory's view, loading it (local cache first, then the bucket)."""
        view = self.views.get(dir_id)
        if view is not None:
            return view
        while dir_id in self._loading:
            await self._loading[dir_id].wait()
            if dir_id in self.views:
                return self.views[dir_id]
        done = self._loading[dir_id] = trio.Event()
        try:
            cached = await self.db.run(self.db.state.load_manifest, dir_id)
            if cached is not None:
                etag, body, checked = cached
                view = DirView(dir_id, self._parse(dir_id, body), etag, checked)
                if time.time() - checked > self.refresh and time.time() > self.offline_until:
                    view = await self._fresher(view)
            else:
                try:
                    changed, obj = await self._fetch(dir_id, None)
                except StorageError as exc:
                    log.error("cannot read directory %s: %s", dir_id, exc)
                    raise FsError(errno_for(exc), f"cannot read directory {dir_id}") from None
                body = obj.data if obj else None
                view = DirView(dir_id, self._parse(dir_id, body), obj.etag if obj else None,
                               time.time())
                await self.db.run(self.db.state.save_manifest, dir_id, view.etag, body,
                                  view.checked)
            self._compute(view)
            self.views[dir_id] = view
            return view
        except ManifestError as exc:
            log.error("%s", exc)
            raise FsError(errno.EIO, str(exc)) from None
        finally:
            del self._loading[dir_id]
            done.set()

    async def _fresher(self, view: DirView) -> DirView:
        """A manifest cached by an earlier run, revalidated before first use (a
        conditional GET): other machines may have changed it since."""
        try:
            changed, obj = await self._fetch(view.dir_id, view.etag)
            if not changed:
                view.checked = time.time()
                return view
            body = obj.data if obj else None
            fresh = DirView(view.dir_id, self._parse(view.dir_id, body),
                            obj.etag if obj else None, time.time())
        except StorageError as exc:
            log.warning("cannot revalidate a directory, showing what is cached: %s", exc)
            self.offline_until = time.time() + self.refresh
            return view
        except ManifestError as exc:
            log.error("%s; keeping the last good version", exc)
            return view
        await self.db.run(self.db.state.save_manifest, view.dir_id, fresh.etag, body,
                          fresh.checked)
        return fresh

    async def revalidate(self, dir_id: str) -> bool:
        """Conditional GET; on change, recompute the view and invalidate the kernel's
        entries. Returns True if something changed."""
        view = self.views.get(dir_id)
        if view is None:
            return False
        changed, obj = await self._fetch(dir_id, view.etag)
        now = time.time()
        if not changed:
            view.checked = now
            return False
        body = obj.data if obj else None
        try:
            remote = self._parse(dir_id, body)
        except ManifestError as exc:
            log.error("%s; keeping the last good version", exc)
            return False
        await self.db.run(self.db.state.save_manifest, dir_id, obj.etag if obj else None,
                          body, now)
        self.set_remote(dir_id, remote, obj.etag if obj else None)
        return True

    def set_remote(self, dir_id: str, remote: dict[bytes, Entry], etag: str | None) -> None:
        """A newer manifest is known (fetched, or written by us): recompute, and tell the
        kernel about every name whose entry changed."""
        view = self.views.get(dir_id)
        if view is None:
            return
        old = view.entries
        view.remote, view.etag, view.checked = remote, etag, time.time()
        self._compute(view)
        self._announce(dir_id, old, view.entries)

    def _announce(self, dir_id: str, old: dict[bytes, Entry], new: dict[bytes, Entry]) -> None:
        parent = self._dir_ino.get(dir_id)
        if parent is None:
            return
        for name in old.keys() | new.keys():
            before, after = old.get(name), new.get(name)
            if before == after:
                continue
            self.invalidator.entry(parent, name)
            ino = self._by_key.get((parent, name))
            if ino is not None and not self.editing(ino) and (
                    not _same_object(before, after) or (
                        self.nodes[ino].opens > 0 and not same_content(before, after))):
                # The name now means something else, or other content while open handles
                # read the old: the old inode is detached and keeps what it had.
                self._detach(parent, name)
            elif ino is not None:  # (a file being edited stays: saving merges)
                self.invalidator.inode(ino)
            if isinstance(after, DirEntry) and not same_content(before, after):
                d = self._dir_ino.get(after.id)
                if d is not None and after.id not in self._ancestors(parent):
                    # A directory renamed or moved here elsewhere: its inode follows.
                    self.nodes[d].parent, self.nodes[d].name = parent, name
            if isinstance(before, DirEntry) and not isinstance(after, DirEntry):
                d = self._dir_ino.get(before.id)
                if d is not None and self.nodes[d].parent == parent and \
                        self.nodes[d].name == name:
                    self.invalidator.inode(d)

    # -- inodes ---------------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FsError(errno.ESTALE)
        return node

    def dir_node(self, ino: int) -> Node:
        node = self.node(ino)
        if node.dir_id is None:
            raise FsError(errno.ENOTDIR)
        return node

    def _node_for(self, parent: int, name: bytes, entry: Entry) -> Node:
        if isinstance(entry, DirEntry):
            ino = self._dir_ino.get(entry.id)
            if ino is not None:
                node = self.nodes[ino]
                node.parent, node.name = parent, name
                return node
        else:
            ino = self._by_key.get((parent, name))
            if ino is not None:
                if _same_object(_probe(self.nodes[ino]), entry):
                    return self.nodes[ino]
                self._detach(parent, name)
        ino = self._next_ino
        self._next_ino += 1
        node = Node(ino, parent, name, entry.id if isinstance(entry, DirEntry) else None,
                    is_link=isinstance(entry, SymlinkEntry))
        self.nodes[ino] = node
        if node.dir_id is not None:
            self._dir_ino[node.dir_id] = ino
        else:
            self._by_key[(parent, name)] = ino
        return node

    def _detach(self, parent: int, name: bytes) -> None:
        ino = self._by_key.pop((parent, name), None)
        if ino is not None:
            node = self.nodes[ino]
            node.parent = 0  # orphan: still valid for open handles and until forgotten
            self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups <= 0 and node.opens <= 0 and node.ino != ROOT_INO:
            self.nodes.pop(node.ino, None)
            if node.dir_id is not None:
                if self._dir_ino.get(node.dir_id) == node.ino:
                    del self._dir_ino[node.dir_id]
            elif self._by_key.get((node.parent, node.name)) == node.ino:
                del self._by_key[(node.parent, node.name)]

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.lookups -= count
            self._maybe_drop(node)

    def _ancestors(self, ino: int) -> set[str]:
        seen: set[str] = set()
        while True:
            node = self.nodes.get(ino)
            if node is None or node.dir_id is None or node.dir_id in seen:
                return seen
            seen.add(node.dir_id)
            if node.ino == ROOT_INO or node.parent == 0:
                return seen
            ino = node.parent

    async def lookup(self, parent: int, name: bytes, count: bool = True) -> tuple[Node, Entry]:
        pnode = self.dir_node(parent)
        view = await self.view(pnode.dir_id)  # type: ignore[arg-type]
        node, entry = self.lookup_loaded(parent, view, name, self._ancestors(parent))
        if count:
            node.lookups += 1
        return node, entry

    def lookup_loaded(self, parent: int, view: DirView, name: bytes,
                      ancestors: set[str]) -> tuple[Node, Entry]:
        """lookup in a view already in memory (readdirplus: no await per entry)."""
        entry = view.entries.get(name)
        if entry is None:
            raise FsError(errno.ENOENT)
        if isinstance(entry, DirEntry) and entry.id in ancestors:
            log.error("directory %s lists its own ancestor %s as %r: refused (a cycle)",
                      view.dir_id, entry.id, name)
            raise FsError(errno.EIO)
        return self._node_for(parent, name, entry), entry

    async def loaded_view(self, ino: int) -> tuple[DirView, set[str]]:
        """A directory's view and its ancestors' ids, for lookup_loaded."""
        node = self.dir_node(ino)
        return await self.view(node.dir_id), self._ancestors(ino)  # type: ignore[arg-type]

    def entry_of(self, node: Node) -> Entry | None:
        """The node's current entry, or None if its name is gone (orphan)."""
        if node.ino == ROOT_INO:
            return DirEntry(ROOT_ID, 0, 0o755)
        pnode = self.nodes.get(node.parent)
        if pnode is None or pnode.dir_id is None:
            return None
        view = self.views.get(pnode.dir_id)
        if view is None:
            return None
        entry = view.entries.get(node.name)
        if entry is None or not _same_object(entry, _probe(node)):
            return None
        return entry

    async def listing(self, ino: int) -> list[tuple[bytes, Entry]]:
        node = self.dir_node(ino)
        view = await self.view(node.dir_id)  # type: ignore[arg-type]
        if time.time() - view.checked > self.refresh and time.time() > self.offline_until:
            try:
                await self.revalidate(view.dir_id)
            except StorageError as exc:
                log.warning("cannot revalidate a directory, showing what is cached: %s", exc)
                self.offline_until = time.time() + self.refresh
        return sorted(view.entries.items())

    # -- changes --------------------------------------------------------------------------
    # Each change loads what it needs first (awaits), then checks and records synchronously
    # (no await in between, so no lock is needed), then waits until the journal is durable.
    def _record(self, ops: list[tuple[str, Op, int | None]],
                new_blobs: list[tuple[str, int]] | tuple = (), dedup_bytes: int = 0,
                durable: bool = True) -> Record:
        """Put ops into the journal's order and apply them to the views, now."""
        rec = self.journal.record(ops, new_blobs, dedup_bytes, durable)
        for dir_id, op, _ in ops:
            view = self.views.get(dir_id)
            if view is not None:
                # The kernel made this change itself: nothing of its cache is stale, unless
                # the name changed elsewhere meanwhile and ours went to a conflict copy.
                diverted = apply_ops(view.entries, [op], self.host)
                if diverted:
                    self._diverted(dir_id, diverted)
        return rec

    def _diverted(self, dir_id: str, diverted: dict[bytes, bytes]) -> None:
        """Our version of a name went to a conflict copy: what the kernel caches for the
        name (our own content) is stale."""
        parent = self._dir_ino.get(dir_id)
        if parent is None:
            return
        for name, copy in diverted.items():
            self.invalidator.entry(parent, name)
            self.invalidator.entry(parent, copy)
            ino = self._by_key.get((parent, name))
            if ino is not None:
                self.invalidator.inode(ino)

    async def settle(self, rec: Record) -> None:
        """Wait until recorded ops are durable; if that fails they are undone (EIO)."""
        try:
            await self.journal.make_durable(rec)
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot write the local journal: %s", exc)
            for dir_id in rec.dirs:
                view = self.views.get(dir_id)
                if view is not None:
                    old = view.entries
                    self._compute(view)
                    self._announce(dir_id, old, view.entries)
            raise FsError(errno_for(exc)) from None

    async def undo(self, rec: Record) -> None:
        """Take back recorded ops whose other half (the file's data) could not be kept."""
        self.journal.forget(rec.pending)
        await self.db.run(self.db.state.drop_ops, [p.seq for p in rec.pending])
        for dir_id in rec.dirs:
            view = self.views.get(dir_id)
            if view is not None:
                old = view.entries
                self._compute(view)
                self._announce(dir_id, old, view.entries)

    async def load_parent(self, node: Node) -> None:
        """Load the view of the node's directory (record_replace needs it in memory)."""
        pnode = self.nodes.get(node.parent)
        if pnode is not None and pnode.dir_id is not None and node.parent != 0:
            await self.view(pnode.dir_id)

    async def _change(self, ops: list[tuple[str, Op, int | None]],
                      new_blobs: list[tuple[str, int]] | tuple = (), dedup_bytes: int = 0,
                      durable: bool = True) -> None:
        await self.settle(self._record(ops, new_blobs, dedup_bytes, durable))

    async def _parent_view(self, parent: int, name: bytes) -> tuple[Node, DirView]:
        try:
            check_name(name)
        except ValueError:
            raise FsError(errno.ENAMETOOLONG if len(name) > 255 else errno.EINVAL) from None
        pnode = self.dir_node(parent)
        if pnode.parent == 0:
            raise FsError(errno.ENOENT)  # the directory was removed
        return pnode, await self.view(pnode.dir_id)  # type: ignore[arg-type]

    async def create(self, parent: int, name: bytes, entry: Entry, durable: bool = True) -> Node:
        """Create a name that must not exist (create, mkdir, symlink)."""
        pnode, view = await self._parent_view(parent, name)
        if name in view.entries:
            raise FsError(errno.EEXIST)
        rec = self._record([(view.dir_id, Op(name, entry, None), None)], durable=durable)
        node = self._node_for(parent, name, entry)
        node.lookups += 1
        if durable:
            await self.settle(rec)
        # else: written by the next durable change (the file's close) or by write_behind
        return node

    async def mkdir(self, parent: int, name: bytes, mode: int) -> tuple[Node, Entry]:
        entry = DirEntry(uuid.uuid4().hex, time.time_ns(), mode & 0o7777)
        # A new directory has no manifest anywhere yet: it is known to be empty without
        # asking the bucket (so it can be filled offline, and costs no GET online).
        now = time.time()
        await self.db.run(self.db.state.save_manifest, entry.id, None, None, now)
        view = DirView(entry.id, {}, None, now)
        self._compute(view)
        self.views.setdefault(entry.id, view)
        try:
            return await self.create(parent, name, entry), entry
        except BaseException:
            if self.views.get(entry.id) is view:
                del self.views[entry.id]
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
        pnode = self.nodes.get(node.parent)
        if pnode is None or pnode.dir_id is None or node.parent == 0:
            return None
        view = self.views.get(pnode.dir_id)
        if view is None:
            return None
        current = view.entries.get(node.name)
        if base is None and current is not None and not _same_object(current, entry):
            return None
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
        pnode, view = await self._parent_view(parent, name)
        entry = view.entries.get(name)
        if isinstance(entry, DirEntry) and is_dir:
            await self.view(entry.id)
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
        ino = self._dir_ino.get(entry.id) if isinstance(entry, DirEntry) else \
            self._by_key.get((parent, name))
        node = self.nodes.get(ino) if ino else None
        if node is not None:
            if node.dir_id is None:
                self._by_key.pop((parent, name), None)
            node.parent = 0
            self._maybe_drop(node)
        await self.settle(rec)
        return node

    def _require_empty(self, entry: DirEntry) -> None:
        """rmdir and rename-over-a-directory: the directory (loaded) must be empty."""
        view = self.views.get(entry.id)
        if view is None or view.entries:
            raise FsError(errno.ENOTEMPTY)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     noreplace: bool = False) -> None:
        _, src = await self._parent_view(old_parent, old_name)
        _, dst = await self._parent_view(new_parent, new_name)
        target = dst.entries.get(new_name)
        if isinstance(target, DirEntry):
            await self.view(target.id)
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
        if isinstance(entry, DirEntry) and entry.id in self._ancestors(new_parent):
            raise FsError(errno.EINVAL)
        put = Op(new_name, entry, target)
        delete = Op(old_name, None, entry)
        if src is dst:
            ops = [(dst.dir_id, put, None), (src.dir_id, delete, None)]
        else:  # the add must reach the bucket before the removal
            ops = [(dst.dir_id, put, None), (src.dir_id, delete, -1)]
        rec = self._record(ops)
        # move the inode
        if target is not None:
            self._detach(new_parent, new_name)
        if isinstance(entry, DirEntry):
            ino = self._dir_ino.get(entry.id)
            if ino is not None:
                self.nodes[ino].parent, self.nodes[ino].name = new_parent, new_name
        else:
            ino = self._by_key.pop((old_parent, old_name), None)
            if ino is not None:
                self.nodes[ino].parent, self.nodes[ino].name = new_parent, new_name
                self._by_key[(new_parent, new_name)] = ino
        await self.settle(rec)


def _same_object(a: Entry | None, b: Entry | None) -> bool:
    """Whether two entries denote the same inode: same directory id, or both non-dirs."""
    if a is None or b is None:
        return False
    if isinstance(a, DirEntry) or isinstance(b, DirEntry):
        return isinstance(a, DirEntry) and isinstance(b, DirEntry) and a.id == b.id
    return type(a) is type(b)


def _probe(node: Node) -> Entry:
    if node.dir_id is not None:
        return DirEntry(node.dir_id, 0)
    if node.is_link:
        return SymlinkEntry(b"?", 0)
    return FileEntry(EMPTY_SHA, 0, 0)

