"""Committing a closed file: its staging copy is hashed, named in the blob cache under its
hash and its new entry journaled. close() returns then, without an fsync: the page cache
and the written WAL transaction survive a crash of the process, and the group commit
(group_commit.py) makes them survive a power loss within its interval.

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
from .errors import FsError, errno_for
from .group_commit import GroupCommitter
from .handles import HandleTable
from .inodes import Node
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
                 durable: GroupCommitter) -> None:
        self.ns = ns
        self.cache = cache
        self.staging = staging
        self.handles = handles
        self.reads = reads
        self.remote = remote
        self.durable = durable
        self.committing: dict[int, trio.Event] = {}  # ino -> set when its commit is done
        self.sealed: dict[int, Staging] = {}  # ino -> the staging copy being committed

    async def wait(self, ino: int) -> None:
        """Until no commit of the inode is in progress."""
        while ino in self.committing:
            await self.committing[ino].wait()

    async def commit(self, node: Node) -> None:
        """Turn the node's staged content into a blob and journal it (flush, close)."""
        while node.ino in self.committing:
            await self.committing[node.ino].wait()
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
        rec = self.ns.record_replace(node, entry, [(digest, entry.size)] if need_upload else [],
                                     entry.size if (remote or cached) else 0, base=st.base)
        keep = rec is not None and not cached  # new content to keep
        on_disk: int | None = None
        try:
            # On the trio thread: a rename (or link) and a close cost less than the hand-off
            # to a worker thread, and nothing here waits for the disk.
            try:
                if keep:
                    on_disk = os.fstat(st.fd).st_blocks * 512  # (no stat of the name later)
                if st.synced:
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
            return None  # deleted while open: POSIX says the data goes with the last close
        # A failure is logged and undone there; a synced copy then stays for the recovery.
        await self.ns.settle(rec)
        self.remote.unverified.discard(digest)
        if st.synced:  # the journal names the blob now: the copy's record may go
            self.durable.retire_copy(st.path)
        self.cache.register(digest, entry.size, pending=need_upload, on_disk=on_disk)
        return entry
