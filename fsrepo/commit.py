"""Committing a closed file: its staging copy is hashed, named in the blob cache under its
hash and its new entry journaled.

close() of a file with a name does none of that on the writer's path (`close`): it appends
"this staging copy is the file's content" to the closed-file log (closed_log.py, one
write(), no fsync) and returns; the copy stays the file's content, read like an open
file's, until the group commit names it (`name_closed`, before it syncs: what it covers is
then blobs and journal entries, as before) or something needs the name first (a write, a
rename, an unlink, someone waiting for the bucket). The page cache holds the copy and the
log line through a crash of the process, and recovery names the copy then.

The blob is named before its journal entry is written, so a commit that covers the entry
covers the blob's data too. A copy fsync'd while open (`Staging.synced`) is hard-linked into
the cache instead of moved: its journal record must outlive it until the group commit has
the blob's data on disk (`retire_copy`).
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import trio

from .blobcache import BlobCache
from .closed_log import ClosedLog
from .errors import FsError, errno_for
from .fdlimit import unnamed_copies_cap
from .group_commit import GroupCommitter
from .handles import HandleTable
from .inodes import Node
from .journal import Record
from .manifest import FileEntry
from .namespace import Namespace
from .reads import BlobReads
from .staging import Staging, StagingArea
from .state import SyncedCopy

log = logging.getLogger(__name__)


class RemoteBlobs(Protocol):
    """Whether the bucket holds a blob, so that a file with that content needs no upload
    (asking the bucket again if the last answer is too old to trust)."""

    def reuse_or_recheck(self, sha: str) -> bool: ...

    # Cached blobs an earlier run left pending: a power loss may have torn them.
    unverified: set[str]


class Committer:
    def __init__(self, ns: Namespace, cache: BlobCache, staging: StagingArea,
                 handles: HandleTable, reads: BlobReads, remote: RemoteBlobs,
                 durable: GroupCommitter, closed_log: ClosedLog,
                 max_unnamed: int | None = None) -> None:
        self.ns = ns
        self.cache = cache
        self.staging = staging
        self.handles = handles
        self.reads = reads
        self.remote = remote
        self.durable = durable
        self.committing: dict[int, trio.Event] = {}  # ino -> set when its commit is done
        self.sealed: dict[int, Staging] = {}  # ino -> the staging copy being committed
        self.closed_log = closed_log
        self.closed: dict[int, Node] = {}  # ino -> a file closed, its copy not named yet
        # Each keeps its copy's descriptor open: past this many, close() names at once.
        self.max_unnamed = unnamed_copies_cap() if max_unnamed is None else max_unnamed
        self._folders: dict[int, list[Node]] = {}  # ino -> its folders' inodes, pinned
        self.unnamed_failures = 0  # copies that could not be named: their log lines stay
        self._lines: dict[int, SyncedCopy] = {}  # ino -> the last log line of its closed copy
        # Lines of copies whose naming failed, kept through each emptying of the log, so a
        # restart still finds their content (and the log does not grow after one failure).
        self._unnamed: dict[str, SyncedCopy] = {}
        self._naming = 0  # closed copies being named now (their log lines still count)
        # content being stored by a commit in progress -> how many: closed copies are named
        # concurrently, and a duplicate among them counts as one (dedup) like a later close
        self._storing: dict[str, int] = {}

    async def wait(self, ino: int) -> None:
        """Until no commit of the inode is in progress."""
        while ino in self.committing:
            await self.committing[ino].wait()

    async def close(self, node: Node) -> None:
        """flush, close: a file with a name, not fsync'd while open, is recorded in the
        closed-file log and named later; any other is named now (`commit`)."""
        await self.wait(node.ino)
        st = self.staging.staged.get(node.ino)
        if st is None or not st.dirty or st.closed:
            return
        if node.parent == 0 and self.handles.is_open(node):
            return  # unlinked: its data lives in the staging copy while descriptors remain
        if st.synced or len(self.closed) >= self.max_unnamed \
                or not self.record_closed(node, st):
            await self.commit(node)

    def record_closed(self, node: Node, st: Staging) -> bool:
        """Append the copy's line to the closed-file log (again after a chmod or utimens
        of a closed copy: the last line counts). False for a file whose folder is not
        known by id (then it is named at once)."""
        pnode = self.ns.inodes.get(node.parent) if node.parent != 0 else None
        if pnode is None or pnode.dir_id is None:
            return False
        line = SyncedCopy(st.path.name, pnode.dir_id, node.name, st.base, st.mode, st.mtime_ns)
        try:
            self.closed_log.append(line)
        except OSError as exc:
            log.warning("cannot append to the closed-file log (naming the file now): %s", exc)
            return False
        st.closed = True
        if node.ino not in self.closed:
            # Pinned like an open file (whose folder the kernel pins): the inode and its
            # folder's stay known, whatever the kernel forgets, until it is named.
            node.opens += 1
            chain = []
            folder: Node | None = pnode
            while folder is not None:
                folder.opens += 1
                chain.append(folder)
                up = folder.parent
                folder = self.ns.inodes.get(up) if up not in (0, folder.ino) else None
            self._folders[node.ino] = chain
        self.closed[node.ino] = node
        self._lines[node.ino] = line
        self.durable.closed_noted()
        return True

    def is_closed(self, ino: int) -> bool:
        """Closed and not named yet."""
        return ino in self.closed

    async def name_first(self, node: Node) -> None:
        """A closed copy is named before its name changes or goes (a rename, an unlink: its
        log line holds the old name) or the copy is written again (a copy being named
        meanwhile is waited for)."""
        await self.wait(node.ino)
        if node.ino in self.closed:
            await self.commit(node)

    async def name_closed(self) -> None:
        """Name every closed copy (the group commit, before it syncs; a waiter for the
        bucket), concurrently: their journal entries go in one transaction."""
        while self.closed or self._naming:
            if not self.closed:  # (named by someone else meanwhile: done when they are)
                for done in list(self.committing.values()):
                    await done.wait()
                continue
            batch = list(self.closed.values())
            async with trio.open_nursery() as nursery:
                for node in batch:
                    nursery.start_soon(self._name_one, node)
        # Every line's copy is named (gone from staging) but those that failed.
        try:
            self.closed_log.clear(keep=list(self._unnamed.values()))
        except OSError as exc:  # (the lines stay: their copies are gone, a restart skips them)
            log.warning("cannot empty the closed-file log: %s", exc)

    async def _name_one(self, node: Node) -> None:
        chain = self._folders.get(node.ino, [])
        try:
            await self.commit(node)
        except FsError:
            pass  # (logged and counted: the copy and its line stay for the recovery)
        except OSError as exc:  # (reading the copy back to hash it)
            log.error("cannot name a closed file (it stays for the next start): %s", exc)
        finally:  # unpinned: forgotten if nothing refers to them (children first)
            self.ns.inodes.drop_if_unused(node)
            for folder in chain:
                if self.ns.inodes.has_children(folder.ino):
                    break
                self.ns.inodes.drop_if_unused(folder)

    async def commit(self, node: Node) -> None:
        """Turn the node's staged content into a blob and journal it (flush, close)."""
        while node.ino in self.committing:
            await self.committing[node.ino].wait()
        if self.closed.pop(node.ino, None) is None:
            await self._commit(node)
            return
        chain = self._folders.pop(node.ino)
        line = self._lines.pop(node.ino)
        self._naming += 1
        try:
            # Begun, a naming is finished (local work: a hash, a link, a journal write): one
            # cut short by a cancellation (an unmount, a stopping uploader) would leave a
            # copy no longer closed and not named, whose log line the next emptying drops.
            with trio.CancelScope(shield=True):
                await self._commit(node)
        except BaseException:
            self.unnamed_failures += 1  # its copy and log line stay for the recovery
            self._unnamed[line.path] = line
            raise
        finally:
            self._naming -= 1
            node.opens -= 1  # (the pins of `record_closed`; a caller may hold the node still)
            for folder in chain:
                folder.opens -= 1

    async def _commit(self, node: Node) -> None:
        st = self.staging.staged.get(node.ino)
        if st is None or not st.dirty:
            return
        if node.parent == 0 and self.handles.is_open(node):
            return  # unlinked: its data lives in the staging copy while descriptors remain
        st.dirty = False
        size, mode, mtime_ns = st.size, st.mode, st.mtime_ns
        self.sealed[node.ino] = self.staging.seal(node.ino)
        done = self.committing[node.ino] = trio.Event()
        try:
            digest = await st.digest()
            await self.ns.load_parent(node)
            entry = await self._store_and_record(node, st, digest, FileEntry(
                digest, size, mtime_ns, mode))
        finally:
            del self.committing[node.ino]
            del self.sealed[node.ino]
            done.set()
        if entry is not None:
            for h in self.handles.of(node):
                self.reads.attach(h, entry)

    def keep_synced(self, node: Node, st: Staging) -> bool:
        """fsync() of a file still open: its staging copy becomes what the group commit
        syncs and journals as the file's content (no blob). False for a file without a
        name (unlinked while open: its content goes with the last close)."""
        pnode = self.ns.inodes.get(node.parent) if node.parent != 0 else None
        if pnode is None or pnode.dir_id is None:
            return False
        st.synced = True
        record = (pnode.dir_id, node.name, st.mode)
        if record == st.synced_as:  # recorded: only its data to sync (a database's fsyncs)
            self.durable.keep_copy(st.path, None)
        else:
            st.synced_as = record
            self.durable.keep_copy(st.path, SyncedCopy(st.path.name, *record[:2], st.base,
                                                      st.mode, st.mtime_ns))
        return True

    async def _store_and_record(self, node: Node, st: Staging, digest: str,
                                entry: FileEntry) -> FileEntry | None:
        remote = self.remote.reuse_or_recheck(digest)
        # A cached copy a power loss may have torn is replaced by this one, known good.
        suspect = digest in self.remote.unverified
        cached = self.cache.has(digest) and not suspect
        need_upload = not remote
        twin = digest in self._storing  # stored meanwhile by a concurrent commit
        rec = self.ns.record_replace(node, entry, [(digest, entry.size)] if need_upload else [],
                                     entry.size if (remote or cached or twin) else 0,
                                     base=st.base)
        self._storing[digest] = self._storing.get(digest, 0) + 1
        try:
            return await self._keep(node, st, digest, entry, rec, remote, suspect, cached,
                                    need_upload)
        finally:
            left = self._storing.pop(digest) - 1
            if left:
                self._storing[digest] = left

    async def _keep(self, node: Node, st: Staging, digest: str, entry: FileEntry,
                    rec: Record | None, remote: bool, suspect: bool, cached: bool,
                    need_upload: bool) -> FileEntry | None:
        """The blob named in the cache and the entry settled in the journal."""
        keep = rec is not None and not cached  # new content to keep
        on_disk: int | None = None
        try:
            # On the trio thread: a rename (or link) and a close cost less than the hand-off
            # to a worker thread, and nothing here waits for the disk.
            try:
                if keep:
                    on_disk = os.fstat(st.fd).st_blocks * 512  # (no stat of the name later)
                if st.synced or st.closed:  # the copy stays until the journal names the blob
                    if keep:
                        self.cache.link_in(st.path, digest, replace=suspect)
                        self.durable.blob_named(self.cache.path(digest))
                        self.remote.unverified.discard(digest)  # the cached copy is this one
                elif keep:
                    # The index lacks it (or it is suspect): whatever file may be under the
                    # name is replaced by this known-good copy, without a look first.
                    self.durable.blob_named(self.cache.place(st.path, digest))
                    self.remote.unverified.discard(digest)  # the cached copy is this one
                else:
                    st.path.unlink(missing_ok=True)  # a duplicate, or deleted meanwhile
            finally:
                os.close(st.fd)
        except OSError as exc:
            if rec is not None:
                await self.ns.undo(rec)
            log.error("cannot store a closed file locally: %s", exc)
            raise FsError(errno_for(exc)) from None
        if rec is None:
            if st.synced:
                self.durable.retire_copy(st.path)
            elif st.closed:
                st.path.unlink(missing_ok=True)
            return None  # deleted while open: POSIX says the data goes with the last close
        if keep:  # indexed with its entry, not after its write: a reader of the folder
            # meanwhile (the read-ahead) finds it here and never asks the bucket for it
            self.cache.register(digest, entry.size, pending=need_upload, on_disk=on_disk)
        # A failure is logged and undone there; a synced copy then stays for the recovery.
        await self.ns.settle(rec)
        self.remote.unverified.discard(digest)
        if st.synced:  # the journal names the blob now: the copy's record may go
            self.durable.retire_copy(st.path)
        elif st.closed:  # (its log line is dead without it)
            st.path.unlink(missing_ok=True)
        self.cache.register(digest, entry.size, pending=need_upload, on_disk=on_disk)
        return entry
