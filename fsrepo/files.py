"""Open files: staging copies for writes, blob file descriptors for reads.

Writes go to one staging file per inode, shared by all its write handles. Sequential
writes (the common case: cp, rsync, cameras) are hashed as they arrive, so closing a file
costs no re-read. On flush the staging file is fsync'd, moved into the blob cache under its
hash and the new entry journaled (fsync'd): only then does close() return.

Reads of clean files go to the cached blob file, or to a download in progress, waiting
only for the byte range asked for.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .blobcache import BlobCache, Download
from .errors import ImgrepoError, IntegrityError, StorageOffline
from .manifest import DirEntry, Entry, FileEntry
from .namespace import EMPTY_SHA, FsError, Namespace, Node

log = logging.getLogger(__name__)


@dataclass
class Staging:
    """The working copy of a file being written."""

    path: Path
    fd: int
    size: int
    mode: int
    mtime_ns: int
    hasher: hashlib._Hash | None  # valid while writes were sequential from offset 0
    hashed: int = 0
    dirty: bool = False
    writers: int = 0
    base: FileEntry | None = None  # the version this copy started from (for the merge)
    written_back: int = 0  # bytes whose writeback to disk has been started


@dataclass
class Handle:
    fh: int
    node: Node
    writable: bool
    sha: str | None = None  # the blob this handle reads when the file is clean
    size: int = 0
    fd: int | None = None
    download: Download | None = None


class FileManager:
    def __init__(self, ns: Namespace, cache: BlobCache, staging_dir: Path,
                 is_remote: callable) -> None:  # type: ignore[valid-type]
        self.ns = ns
        self.cache = cache
        self.staging_dir = staging_dir
        staging_dir.mkdir(parents=True, exist_ok=True)
        self.is_remote = is_remote
        self.staged: dict[int, Staging] = {}
        self.last_activity = 0.0  # monotonic time of the last write: uploads yield to writes
        self._committing: dict[int, trio.Event] = {}  # ino -> set when its commit is done
        self._sealed: dict[int, Staging] = {}  # ino -> the staging copy being committed
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._run_id = uuid.uuid4().hex[:12]  # staging names: unique without a syscall each
        self._staged_count = 0
        ns.editing = lambda ino: ino in self.staged or ino in self._committing or any(
            h.writable and h.node.ino == ino for h in self.handles.values())

    def clear_leftovers(self) -> None:
        """Staging files of a crashed run: their content was never closed, so never
        promised; remove them."""
        for path in self.staging_dir.iterdir():
            path.unlink(missing_ok=True)

    # -- attributes -----------------------------------------------------------------------
    def overlay(self, node: Node, entry: Entry) -> Entry:
        """The entry as the user sees it now, with unflushed writes."""
        st = self.staged.get(node.ino) or self._sealed.get(node.ino)
        if st is None or not isinstance(entry, FileEntry):
            return entry
        return FileEntry(entry.sha256, st.size, st.mtime_ns, st.mode)

    # -- open / create --------------------------------------------------------------------
    def _new_handle(self, node: Node, writable: bool) -> Handle:
        fh = self._next_fh
        self._next_fh += 1
        handle = Handle(fh, node, writable)
        self.handles[fh] = handle
        node.opens += 1
        if writable:
            st = self.staged.get(node.ino)
            if st is not None:
                st.writers += 1
        return handle

    def _attach_blob(self, handle: Handle, entry: FileEntry) -> None:
        """Point a handle at the blob of `entry` (cached, or downloading)."""
        self._detach_blob(handle)
        handle.sha, handle.size = entry.sha256, entry.size
        self.cache.acquire(entry.sha256)
        if entry.size == 0:
            return
        if self.cache.has(entry.sha256):
            self.cache.touch(entry.sha256)
            handle.fd = os.open(self.cache.path(entry.sha256), os.O_RDONLY)
        else:
            dl = self.cache.start_download(entry.sha256, entry.size)
            handle.download = dl
            handle.fd = self.cache.open_fd(dl)

    def _detach_blob(self, handle: Handle) -> None:
        if handle.fd is not None:
            os.close(handle.fd)
            handle.fd = None
        if handle.sha is not None:
            self.cache.release(handle.sha)
            handle.sha = None
        handle.download = None

    async def open(self, node: Node, flags: int) -> Handle:
        entry = self.ns.entry_of(node)
        if entry is None and node.ino not in self.staged:
            raise FsError(errno.ENOENT)
        if isinstance(entry, DirEntry):
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if isinstance(entry, FileEntry) and entry.size and not self.cache.has(entry.sha256) \
                and node.ino not in self.staged and not (writable and flags & os.O_TRUNC) \
                and not self.cache.store.online:
            raise FsError(errno.ENETDOWN)  # its content is not cached, the storage unreachable
        handle = self._new_handle(node, writable)
        try:
            if flags & os.O_TRUNC and writable:
                await self.truncate(node, 0, handle)  # first: no download of what goes
            if isinstance(entry, FileEntry) and node.ino not in self.staged:
                self._attach_blob(handle, entry)  # (with a staging copy, reads go there)
        except BaseException:
            await self.release(handle.fh)
            raise
        return handle

    async def create(self, parent: int, name: bytes, mode: int) -> tuple[Handle, Node]:
        entry = FileEntry(EMPTY_SHA, 0, time.time_ns(), mode & 0o7777)
        # Not fsync'd: the file's content is promised at close, which journals durably.
        node = await self.ns.create(parent, name, entry, durable=False)
        handle = self._new_handle(node, True)
        handle.sha, handle.size = EMPTY_SHA, 0
        self.cache.acquire(EMPTY_SHA)
        self._stage_empty(node, entry)
        self.staged[node.ino].writers += 1
        # Dirty from the start: closing a new file commits it durably even if nothing was
        # written (its name alone was only written behind; a kill -9 could lose it).
        self.staged[node.ino].dirty = True
        return handle, node

    # -- staging --------------------------------------------------------------------------
    def _stage_empty(self, node: Node, entry: FileEntry) -> Staging:
        self._staged_count += 1
        path = self.staging_dir / f"{self._run_id}-{self._staged_count}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        st = Staging(path, fd, 0, entry.mode, entry.mtime_ns, hashlib.sha256(), base=entry)
        self.staged[node.ino] = st
        return st

    async def _stage(self, node: Node, handle: Handle | None) -> Staging:
        """The node's staging copy, made from its current content if needed."""
        while node.ino in self._committing:
            await self._committing[node.ino].wait()
        st = self.staged.get(node.ino)
        if st is not None:
            return st
        entry = self._content_of(node)
        if not isinstance(entry, FileEntry):
            raise FsError(errno.ENOENT)
        st = self._stage_empty(node, entry)
        st.writers = sum(1 for h in self.handles.values() if h.node is node and h.writable)
        if entry.size > 0:
            try:
                source = await self.cache.ensure(entry.sha256, entry.size)
            except (ImgrepoError, OSError) as exc:
                self._drop_staging(node.ino)
                log.error("cannot modify a file whose content is not available: %s", exc)
                raise FsError(errno.EIO) from None

            def copy() -> None:
                with open(source, "rb") as src:
                    os.lseek(st.fd, 0, os.SEEK_SET)
                    while chunk := src.read(1 << 20):
                        os.write(st.fd, chunk)
            await trio.to_thread.run_sync(copy)
            st.size = entry.size
            st.hasher = None
        return st

    def _content_of(self, node: Node) -> Entry | None:
        """The node's entry; for a file unlinked (or renamed over) while open, what its
        handles still read, so that writing and truncating through them keep working."""
        entry = self.ns.entry_of(node)
        if entry is None:
            h = next((h for h in self.handles.values() if h.node is node and h.sha), None)
            if h is not None:
                return FileEntry(h.sha, h.size, time.time_ns())  # type: ignore[arg-type]
        return entry

    def _drop_staging(self, ino: int) -> None:
        st = self.staged.pop(ino, None)
        if st is not None:
            os.close(st.fd)
            st.path.unlink(missing_ok=True)

    # -- data -----------------------------------------------------------------------------
    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        while handle.node.ino in self._committing:  # its handles then read the new blob
            await self._committing[handle.node.ino].wait()
        st = self.staged.get(handle.node.ino)
        if st is not None:
            return os.pread(st.fd, size, offset)
        if handle.sha is None or handle.size == 0 or offset >= handle.size:
            return b""
        if handle.download is not None:
            dl = handle.download
            try:
                await dl.wait_for(offset + size)
            except (ImgrepoError, OSError) as exc:
                log.error("read failed: %s", exc)
                if isinstance(exc, IntegrityError):  # drop pages the kernel kept of it
                    self.ns.invalidator.inode(handle.node.ino)
                raise FsError(errno.ENETDOWN if isinstance(exc, StorageOffline)
                              else errno.EIO) from None
            if dl.done:
                handle.download = None
        assert handle.fd is not None
        return os.pread(handle.fd, size, offset)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self.last_activity = time.monotonic()
        handle = self._handle(fh)
        st = await self._stage(handle.node, handle)
        written = os.pwrite(st.fd, data, offset)
        if st.hasher is not None:
            if offset == st.hashed:
                st.hasher.update(data[:written])
                st.hashed += written
            else:
                st.hasher = None
        st.size = max(st.size, offset + written)
        st.mtime_ns = time.time_ns()
        st.dirty = True
        if st.size - st.written_back >= WRITEBACK_CHUNK:
            # Start writing a big file to disk while it arrives, so the fsync at close()
            # has little left to do.
            start, st.written_back = st.written_back, st.size
            start_writeback(st.fd, start, st.size - start)
        return written

    async def truncate(self, node: Node, size: int, handle: Handle | None = None) -> None:
        st = self.staged.get(node.ino)
        if st is None and size == 0:
            entry = self._content_of(node)
            if not isinstance(entry, FileEntry):
                raise FsError(errno.ENOENT)
            if entry.size == 0:
                return
            st = self._stage_empty(node, entry)
            st.writers = sum(1 for h in self.handles.values() if h.node is node and h.writable)
        elif st is None:
            st = await self._stage(node, handle)
        await trio.to_thread.run_sync(os.ftruncate, st.fd, size)
        if size < st.hashed or size > st.size:
            st.hasher = None if size != 0 else hashlib.sha256()
            st.hashed = 0
        st.size = size
        st.mtime_ns = time.time_ns()
        st.dirty = True
        if handle is None and st.writers == 0:
            await self.commit(node)

    def set_attrs(self, node: Node, mode: int | None, mtime_ns: int | None) -> bool:
        """Attribute changes on a file being written: kept with its staging copy."""
        st = self.staged.get(node.ino)
        if st is None:
            return False
        if mode is not None:
            st.mode = mode & 0o7777
        if mtime_ns is not None:
            st.mtime_ns = mtime_ns
        st.dirty = True
        return True

    # -- commit ---------------------------------------------------------------------------
    async def commit(self, node: Node) -> None:
        """Make the node's staged content durable and journaled (flush, fsync, close).

        The staging file's fsync and the journal's fsync run at the same time: close()
        returns only when both are done. After a crash in between, the journal may name a
        blob whose file is incomplete; recovery checks pending blobs and drops such ops,
        which is right because their close() never returned."""
        while node.ino in self._committing:
            await self._committing[node.ino].wait()
        st = self.staged.get(node.ino)
        if st is None or not st.dirty:
            return
        if node.parent == 0 and any(h.node is node for h in self.handles.values()):
            return  # unlinked: its data lives in the staging copy while descriptors remain
        st.dirty = False
        size, mode, mtime_ns = st.size, st.mode, st.mtime_ns
        # The staging file becomes the blob; a later write starts a new copy from it.
        del self.staged[node.ino]
        self._sealed[node.ino] = st
        done = self._committing[node.ino] = trio.Event()
        try:
            if st.hasher is not None and st.hashed == size:
                digest = st.hasher.hexdigest()
            else:
                digest = await trio.to_thread.run_sync(_hash_fd, st.fd)
            await self.ns.load_parent(node)
            entry = await self._store_and_record(node, st, digest, FileEntry(
                digest, size, mtime_ns, mode))
        finally:
            del self._committing[node.ino]
            del self._sealed[node.ino]
            done.set()
        if entry is not None:
            for h in self.handles.values():
                if h.node is node:
                    self._attach_blob(h, entry)

    async def _store_and_record(self, node: Node, st: Staging, digest: str,
                                entry: FileEntry) -> FileEntry | None:
        remote = self.is_remote(digest)
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
            code = exc.errno if isinstance(exc, OSError | FsError) and exc.errno else errno.EIO
            log.error("cannot store a closed file locally: %s", exc)
            raise FsError(code)
        self.cache.register(digest, entry.size, pending=need_upload)
        return entry

    async def flush(self, fh: int) -> None:
        await self.commit(self._handle(fh).node)

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh, None)
        if handle is None:
            return
        node = handle.node
        st = self.staged.get(node.ino)
        if handle.writable and st is not None:
            st.writers -= 1
        try:
            if st is not None and not any(h.node is node for h in self.handles.values()):
                await self.commit(node)
                self._drop_staging(node.ino)
        finally:
            self._detach_blob(handle)
            node.opens -= 1
            self.ns._maybe_drop(node)
            if self.cache.used > self.cache.limit:  # what was open may go now
                try:
                    await self.cache.evict()
                except OSError as exc:
                    log.warning("cache eviction failed: %s", exc)

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    def pinned_blobs(self) -> set[str]:
        return {h.sha for h in self.handles.values() if h.sha}


WRITEBACK_CHUNK = 32 << 20
INLINE_DISCARD = 4 << 20  # staging copies up to this size are dropped on the trio thread
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk, without waiting (a worker thread
    makes the call, which can block briefly on a busy disk)."""
    if _sync_file_range is None:
        return

    def call() -> None:
        _sync_file_range(ctypes.c_int(fd), ctypes.c_longlong(offset),
                         ctypes.c_longlong(length), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))

    trio.lowlevel.start_thread_soon(call, lambda outcome: None)


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


__all__ = ["FileManager", "Handle", "Staging"]
