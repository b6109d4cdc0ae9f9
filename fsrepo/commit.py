"""Committing a closed file: its staging copy is hashed, kept in the blob cache under its
hash and its new entry journaled; close() returns only when both are on disk.

The staging file's fsync and the journal's fsync run at the same time. After a crash in
between, the journal may name a blob whose file is incomplete; recovery checks pending
blobs and drops such ops, which is right because their close() never returned.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

import trio

from .blobcache import BlobCache
from .errors import FsError, errno_for
from .handles import HandleTable
from .inodes import Node
from .manifest import FileEntry
from .namespace import Namespace
from .reads import BlobReads
from .staging import Staging, StagingArea

log = logging.getLogger(__name__)

INLINE_DISCARD = 4 << 20  # staging copies up to this size are dropped on the trio thread


class RemoteBlobs(Protocol):
    """Whether the bucket holds a blob, so that a file with that content needs no upload
    (asking the bucket again if the last answer is too old to trust)."""

    def reuse_or_recheck(self, sha: str) -> bool: ...


class Committer:
    def __init__(self, ns: Namespace, cache: BlobCache, staging: StagingArea,
                 handles: HandleTable, reads: BlobReads, remote: RemoteBlobs) -> None:
        self.ns = ns
        self.cache = cache
        self.staging = staging
        self.handles = handles
        self.reads = reads
        self.remote = remote
        self.committing: dict[int, trio.Event] = {}  # ino -> set when its commit is done
        self.sealed: dict[int, Staging] = {}  # ino -> the staging copy being committed

    async def wait(self, ino: int) -> None:
        """Until no commit of the inode is in progress."""
        while ino in self.committing:
            await self.committing[ino].wait()

    async def commit(self, node: Node) -> None:
        """Make the node's staged content durable and journaled (flush, fsync, close)."""
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

    async def _store_and_record(self, node: Node, st: Staging, digest: str,
                                entry: FileEntry) -> FileEntry | None:
        remote = self.remote.reuse_or_recheck(digest)
        cached = self.cache.has(digest)
        need_upload = not remote
        rec = self.ns.record_replace(node, entry, [(digest, entry.size)] if need_upload else [],
                                     entry.size if (remote or cached) else 0, base=st.base)
        cache = self.cache

        def discard() -> None:
            os.close(st.fd)
            st.path.unlink(missing_ok=True)

        def persist() -> None:
            if cached or rec is None:  # nothing new to keep
                discard()
                return
            # Named first, then fsync'd: the fsync of a file commits its data together with
            # the rename (and shard mkdir) that named it on journaling filesystems, so the
            # blob is durable under the name the journal's recovery looks for. A power loss
            # before the fsync leaves a torn blob, hashed before any upload (unverified).
            try:
                cache.adopt_sync(st.path, digest)
                os.fsync(st.fd)
            finally:
                os.close(st.fd)

        errors: list[BaseException] = []

        async def guarded(fn: Any, *args: Any) -> None:
            try:
                await fn(*args)
            except (OSError, FsError) as exc:
                errors.append(exc)

        if (cached or rec is None) and st.size <= INLINE_DISCARD:
            # A duplicate (or deleted) small file: dropping its copy is quicker than the
            # hand-off to a worker thread; only the journal has to reach the disk.
            try:
                discard()
            except OSError as exc:
                log.warning("cannot remove a staging copy: %s", exc)
            if rec is not None:
                await guarded(self.ns.settle, rec)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guarded, trio.to_thread.run_sync, persist)
                if rec is not None:
                    nursery.start_soon(guarded, self.ns.settle, rec)
        if rec is None:
            return None  # deleted while open: POSIX says the data goes with the last close
        if errors:
            await self.ns.undo(rec)
            exc = errors[0]
            if not isinstance(exc, FsError):  # (the journal's failure is logged already)
                log.error("cannot store a closed file locally: %s", exc)
            raise FsError(errno_for(exc))
        self.cache.register(digest, entry.size, pending=need_upload)
        return entry
