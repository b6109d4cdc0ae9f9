"""Open files: what the kernel's file requests do, over the handle table (`handles`), the
staging copies (`staging`), the blob reads (`reads`) and the commit pipeline (`commit`).

Writes go to the inode's staging copy; on flush it is recorded in the closed-file log as the
file's content and named later, by the group commit: moved into the blob cache under its
hash and the new entry journaled (commit.py; the group commit makes it power-safe within
its interval). fsync() makes the file's current content power-safe
before it returns, without turning a file still open into a blob (commit.keep_synced).
Reads of clean files go to the cached blob file, or to a download in progress.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from .blobcache import BlobCache
from .closed_log import LOG_NAME, ClosedLog
from .commit import Committer, RemoteBlobs
from .errors import FsError, ImgrepoError
from .folder_readahead import READ_AHEAD_FILES, FolderReadAhead
from .group_commit import GroupCommitter
from .handles import Handle, HandleTable
from .hashing import hash_file
from .inodes import ROOT_INO, Node
from .manifest import DirEntry, Entry, FileEntry, SymlinkEntry
from .namespace import EMPTY_SHA, Namespace
from .reads import BlobReads
from .staging import Staging, StagingArea

log = logging.getLogger(__name__)


class WriteObserver(Protocol):
    """Told after each write to a staging copy (uploads that start before close)."""

    def wrote(self, st: Staging) -> None: ...


@dataclass(frozen=True)
class AttrChange:
    """What a setattr request asks to change (None: leave as is)."""

    mode: int | None = None
    mtime_ns: int | None = None
    size: int | None = None
    uid: int | None = None
    gid: int | None = None


class FileManager:
    def __init__(self, ns: Namespace, cache: BlobCache, staging_dir: Path,
                 remote: RemoteBlobs, durable: GroupCommitter,
                 read_ahead_files: int = READ_AHEAD_FILES) -> None:
        self.ns = ns
        self.cache = cache
        self.staging = StagingArea(staging_dir)
        self.handles = HandleTable()
        self.ahead = FolderReadAhead(cache, read_ahead_files)
        self.reads = BlobReads(cache, ns.invalidator, ns.inodes, self.ahead)
        self.durable = durable
        self.closed_log = ClosedLog(staging_dir.parent / LOG_NAME)
        self.commits = Committer(ns, cache, self.staging, self.handles, self.reads, remote,
                                 durable, self.closed_log)
        durable.name_closed = self.commits.name_closed
        ns.before_name_change = self.name_first
        self.last_activity = 0.0  # monotonic time of the last write: uploads yield to writes
        self.write_observer: WriteObserver | None = None  # told of every write (early chunks)
        self.remote = remote
        self.uid, self.gid = os.getuid(), os.getgid()  # who owns everything in the mount
        ns.track_edits(self)

    def is_editing(self, ino: int) -> bool:
        """Open for writing, or with unsaved changes (the namespace's `EditTracker`)."""
        return ino in self.staging.staged or ino in self.commits.committing or \
            self.handles.is_writing(ino)

    def clear_leftovers(self) -> None:
        self.staging.clear_leftovers()

    # -- attributes -----------------------------------------------------------------------
    def current(self, ino: int) -> tuple[Node, Entry]:
        """An inode and its entry; for a file removed while still open, what its handles
        read (ENOENT if nothing is left of it)."""
        node = self.ns.node(ino)
        entry = self.ns.entry_of(node)
        if entry is None:
            handle = next(self.handles.of(node), None)
            if handle is not None and handle.sha is not None:
                return node, FileEntry(handle.sha, handle.size, 0)
            raise FsError(errno.ENOENT)
        return node, entry

    async def stat(self, ino: int) -> tuple[Node, Entry]:
        """`current`, with a directory's own view loaded if it can be (its link count and
        times come from it)."""
        node, entry = self.current(ino)
        if isinstance(entry, DirEntry) and self.ns.dir_stat(entry) is None:
            await self.ns.know_dir(entry)
            return self.current(ino)
        return node, entry

    async def setattr(self, ino: int, change: AttrChange, fh: int | None) -> tuple[Node, Entry]:
        """Change attributes: ownership cannot change (EPERM: everything belongs to the
        mount's owner), the root's mode and time are not kept, a file being written keeps
        them with its staging copy. Returns the inode and its entry afterwards."""
        await self.commits.wait(ino)  # a closed copy being named: its entry first
        node, entry = self.current(ino)
        if change.uid is not None and change.uid not in (self.uid, -1, 0xFFFFFFFF):
            raise FsError(errno.EPERM)
        if change.gid is not None and change.gid not in (self.gid, -1, 0xFFFFFFFF):
            raise FsError(errno.EPERM)
        mode, mtime = change.mode, change.mtime_ns
        if mode is not None:
            mode &= 0o7777
        if change.size is not None:
            if not isinstance(entry, FileEntry):
                raise FsError(errno.EISDIR if isinstance(entry, DirEntry) else errno.EINVAL)
            await self.truncate(node, change.size, self.handles.find(fh))
        if mode is not None or mtime is not None:
            if isinstance(entry, FileEntry):
                if not self.set_attrs(node, mode, mtime):
                    await self.ns.replace(node, entry.with_attrs(  # (chunks kept)
                        mtime_ns=mtime, mode=mode))
            elif isinstance(entry, DirEntry) and node.ino != ROOT_INO:
                shown = self.ns.dir_stat(entry)  # (a chmod keeps the mtime it shows)
                kept = entry.mtime_ns if shown is None else shown.mtime_ns
                await self.ns.replace(node, DirEntry(
                    entry.id, kept if mtime is None else mtime,
                    entry.mode if mode is None else mode, time.time_ns()))
            elif isinstance(entry, SymlinkEntry) and mtime is not None:
                await self.ns.replace(node, SymlinkEntry(entry.target, mtime))
        return self.current(ino)

    def readlink(self, ino: int) -> bytes:
        _, entry = self.current(ino)
        if not isinstance(entry, SymlinkEntry):
            raise FsError(errno.EINVAL)
        return entry.target

    def overlay(self, node: Node, entry: Entry) -> Entry:
        """The entry as the user sees it now, with unflushed writes."""
        st = self.staging.staged.get(node.ino) or self.commits.sealed.get(node.ino)
        if st is None or not isinstance(entry, FileEntry):
            return entry
        return FileEntry(entry.sha256, st.size, st.mtime_ns, st.mode)

    # -- open / create --------------------------------------------------------------------
    def _new_handle(self, node: Node, writable: bool) -> Handle:
        handle = self.handles.open(node, writable)
        if writable:
            st = self.staging.staged.get(node.ino)
            if st is not None:
                st.writers += 1
        return handle

    async def open(self, node: Node, flags: int) -> Handle:
        staged = node.ino in self.staging.staged
        entry = self.ns.entry_of(node)
        if entry is None and not staged:
            raise FsError(errno.ENOENT)
        if isinstance(entry, DirEntry):
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if isinstance(entry, FileEntry) and entry.size and not self.cache.has_content(entry) \
                and not staged and not (writable and flags & os.O_TRUNC) \
                and not self.cache.store.online:
            raise FsError(errno.ENETDOWN)  # its content is not cached, the storage unreachable
        if isinstance(entry, FileEntry) and entry.sha256 in self.remote.unverified \
                and self.cache.has(entry.sha256) and not staged:
            await self._verify(entry.sha256)
        handle = self._new_handle(node, writable)
        try:
            if flags & os.O_TRUNC and writable:
                await self.truncate(node, 0, handle)  # first: no download of what goes
            if isinstance(entry, FileEntry) and node.ino not in self.staging.staged:
                cold = not self.cache.has(entry.sha256) or self.ahead.guessed(entry.sha256)
                self.reads.attach(handle, entry)  # (with a staging copy, reads go there)
                if not writable:
                    self._follow_folder(node, entry, cold)
        except BaseException:
            await self.release(handle.fh)
            raise
        return handle

    def _follow_folder(self, node: Node, entry: FileEntry, cold: bool) -> None:
        """Tell the folder read-ahead which file of its folder was opened."""
        view = self.ns.folder_of(node)
        if view is not None and view.entries.get(node.name) is entry:
            self.ahead.opened(view.dir_id, view.entries, node.name, entry, cold)

    async def _verify(self, sha: str) -> None:
        """A blob an earlier run left pending may have been torn by a power loss: hashed
        before anything reads it (EIO if torn; the uploader then drops its change)."""
        actual = await trio.to_thread.run_sync(hash_file, self.cache.path(sha))
        if sha not in self.remote.unverified:
            return  # verified (or replaced by a close) meanwhile
        if actual != sha:
            log.error("blob %s in the local cache is damaged (it hashes to %s), probably by "
                      "a power loss before it was committed: not served", sha[:12], actual[:12])
            raise FsError(errno.EIO)
        self.remote.unverified.discard(sha)

    async def create(self, parent: int, name: bytes, mode: int) -> tuple[Handle, Node]:
        entry = FileEntry(EMPTY_SHA, 0, time.time_ns(), mode & 0o7777)
        # Written behind: the file's content is promised at close, which writes it too.
        node = await self.ns.create(parent, name, entry, wait=False)
        handle = self._new_handle(node, True)
        self.reads.attach_empty(handle, EMPTY_SHA)
        st = self.staging.new(node.ino, entry)
        st.writers += 1
        # Dirty from the start: closing a new file journals it even if nothing was written
        # (its name alone was only written behind; a kill -9 could lose it).
        st.dirty = True
        return handle, node

    async def mknod(self, parent: int, name: bytes, mode: int) -> tuple[Node, Entry]:
        """A new empty file, closed at once (only regular files: EPERM for devices,
        fifos and sockets)."""
        if not stat.S_ISREG(mode):
            raise FsError(errno.EPERM)
        handle, node = await self.create(parent, name, mode)
        await self.release(handle.fh)
        return self.current(node.ino)

    # -- staging --------------------------------------------------------------------------
    async def _stage(self, node: Node) -> Staging:
        """The node's staging copy, made from its current content if needed."""
        await self.commits.wait(node.ino)
        st = self.staging.staged.get(node.ino)
        if st is not None:
            return st
        entry = self._content_of(node)
        if not isinstance(entry, FileEntry):
            raise FsError(errno.ENOENT)
        st = self.staging.new(node.ino, entry)
        st.writers = self.handles.writers(node)
        if entry.size > 0:
            try:
                source = await self.cache.ensure_file(entry)
            except (ImgrepoError, OSError) as exc:
                self.staging.drop(node.ino)
                log.error("cannot modify a file whose content is not available: %s", exc)
                raise FsError(errno.EIO) from None
            await self.staging.fill(st, source, entry.size)
        return st

    def _content_of(self, node: Node) -> Entry | None:
        """The node's entry; for a file unlinked (or renamed over) while open, what its
        handles still read, so that writing and truncating through them keep working."""
        entry = self.ns.entry_of(node)
        if entry is None:
            h = self.handles.reading(node)
            if h is not None:
                return FileEntry(h.sha, h.size, time.time_ns())  # type: ignore[arg-type]
        return entry

    # -- data -----------------------------------------------------------------------------
    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        committing = self.commits.committing
        while handle.node.ino in committing:  # its handles then read the new blob
            await committing[handle.node.ino].wait()
        st = self.staging.staged.get(handle.node.ino)
        if st is not None:
            return os.pread(st.fd, size, offset)
        return await self.reads.read(handle, offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self.last_activity = time.monotonic()
        handle = self.handles.get(fh)
        if not data:
            return 0  # POSIX: a write of nothing has no other result (no size, no mtime)
        ino = handle.node.ino
        st = self.staging.staged.get(ino)
        if st is not None and st.closed:  # named first: its log line promises this content
            await self.commits.name_first(handle.node)
            st = None
        if st is None or ino in self.commits.committing:
            st = await self._stage(handle.node)
        written = st.write(offset, data)
        if self.write_observer is not None:
            self.write_observer.wrote(st)
        if st.hashes.too_far_behind:  # the hash threads are far behind: let them catch up
            await st.hashes.catch_up()
        return written

    async def truncate(self, node: Node, size: int, handle: Handle | None = None) -> None:
        await self.commits.name_first(node)
        st = self.staging.staged.get(node.ino)
        if st is None and size == 0:
            entry = self._content_of(node)
            if not isinstance(entry, FileEntry):
                raise FsError(errno.ENOENT)
            if entry.size == 0:
                return
            st = self.staging.new(node.ino, entry)
            st.writers = self.handles.writers(node)
        elif st is None:
            st = await self._stage(node)
        try:
            await st.truncate(size)
        except FsError:  # refused (too large): a copy made only for it goes again
            if st.writers == 0 and not st.dirty:
                self.staging.drop(node.ino)
            raise
        if handle is None and st.writers == 0:
            await self.commits.commit(node)

    def set_attrs(self, node: Node, mode: int | None, mtime_ns: int | None) -> bool:
        """Attribute changes on a file being written: kept with its staging copy."""
        st = self.staging.staged.get(node.ino)
        if st is None:
            return False
        st.set_attrs(mode, mtime_ns)
        if st.closed:
            self.commits.record_closed(node, st)  # the log's last line of the copy counts
        return True

    # -- closing --------------------------------------------------------------------------
    async def flush(self, fh: int) -> None:
        await self.commits.close(self.handles.get(fh).node)

    async def name_first(self, parent: int, name: bytes) -> None:
        """Before a rename or unlink of the name (the namespace asks): a closed copy under
        it is named (its log line holds the name, and must not bring the content back
        under it)."""
        node = self.ns.inodes.of_name(parent, name)
        if node is not None:
            await self.commits.name_first(node)

    async def name_closed(self) -> None:
        """Every closed copy named: before someone waits for the bucket."""
        await self.commits.name_closed()

    async def fsync(self, fh: int) -> None:
        """fsync()/fdatasync(): returns once the file's current content survives a power
        loss. A file still open stays a staging copy (a database fsyncs at every
        transaction: a blob each time would fill the cache with versions); the one at
        close becomes its blob, and is uploaded."""
        node = self.handles.get(fh).node
        await self.commits.wait(node.ino)
        st = self.staging.staged.get(node.ino)
        if st is not None and st.dirty and not st.closed:  # (closed: the commit names it)
            self.commits.keep_synced(node, st)
        await self.durable.commit()

    async def fsyncdir(self) -> None:
        """fsyncdir(): every change journaled so far survives a power loss."""
        await self.durable.commit()

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if handle is None:
            return
        node = handle.node
        st = self.staging.staged.get(node.ino)
        if handle.writable and st is not None:
            st.writers -= 1
        try:
            if st is not None and not self.handles.is_open(node):
                await self.commits.close(node)
                if st.closed or self.staging.staged.get(node.ino) is not st \
                        or self.handles.is_open(node):
                    # Recorded (the copy stays until it is named), or named; or opened
                    # again meanwhile, perhaps with a copy of its own: not ours to drop.
                    return
                synced = self.staging.drop(node.ino)
                if synced is not None:  # unlinked while open, and fsync'd
                    self.durable.retire_copy(synced)
        finally:
            self.reads.detach(handle)
            node.opens -= 1
            self.ns.inodes.drop_if_unused(node)
            if self.cache.used > self.cache.limit:  # what was open may go now
                try:
                    await self.cache.evict()
                except OSError as exc:
                    log.warning("cache eviction failed: %s", exc)
