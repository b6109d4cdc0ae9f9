"""Staging copies: the working copy of each file being written, hashed as it is written.

One staging file per inode, shared by all its write handles. Sequential writes (the common
case: cp, rsync, cameras) are hashed as they arrive past a file's first MiB, which is read
back and hashed when the file is named after close (from the page cache);
a big file's pages are handed to the disk while it arrives, so the group commit that follows
its close has little left to do.

A copy fsync'd while its file stays open (a database) is not turned into a blob: the group
commit syncs it and journals it as the file's content (`synced`); if the run ends before
the file is closed, `recover_synced` turns it into a blob at the next start.
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

import trio

from .blank_files import BlankFiles
from .cache_index import CacheIndex
from .errors import FsError
from .hashing import HashThread, RunningHash, hash_file
from .manifest import MAX_SIZE, FileEntry
from .state import LocalState, SyncedCopy

log = logging.getLogger(__name__)

STAGING_DIR = "staging"  # the staging folder's name in a repository's state folder
WRITEBACK_CHUNK = 32 << 20
# A file's first INLINE_PREFIX bytes are hashed when it is named, after close (read back
# from the page cache: a small file's hash is off the writer's path); past them, a write
# smaller than INLINE_HASH is hashed at once on the trio thread when nothing is queued (the
# hand-off to the hash thread would cost more CPU than it moves: measured, perf-log).
INLINE_HASH = 64 << 10
INLINE_PREFIX = 1 << 20
FILL_CHUNK = 1 << 20
_ZEROS = bytes(FILL_CHUNK)
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)


@dataclass
class Staging:
    """The working copy of a file being written."""

    path: Path
    fd: int
    size: int
    mode: int
    mtime_ns: int
    hasher: RunningHash | None  # valid while writes were sequential from offset 0
    hashes: HashThread  # where the running hash is computed
    hashed: int = 0  # the end of the sequential run written from offset 0
    # Of that run, the bytes from 0 not fed to the hasher yet: a file's first INLINE_PREFIX
    # bytes are hashed when it is named (`digest`, after close), not while it is written.
    unhashed: int = 0
    dirty: bool = False
    writers: int = 0
    base: FileEntry | None = None  # the version this copy started from (for the merge)
    written_back: int = 0  # bytes whose writeback to disk has been started
    synced: bool = False  # fsync'd while open: journaled as the file's content (see above)
    synced_as: tuple[str, bytes, int] | None = None  # (dir_id, name, mode) of that record
    # Closed and recorded in the closed-file log, not named yet (commit.Committer.defer):
    # read like an open file's copy; a write or a rename names it first.
    closed: bool = False

    def write(self, offset: int, data: bytes) -> int:
        """Write through to the staging file, hashing what extends the sequential run."""
        end = offset + len(data)
        if end > MAX_SIZE:
            raise refused("write", end)
        try:
            written = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            if exc.errno != errno.EFBIG:
                raise
            raise refused("write", end, exc) from None
        if self.hasher is not None:
            if offset == self.hashed:
                if self.unhashed == self.hashed and self.hashed + written <= INLINE_PREFIX:
                    self.unhashed += written  # hashed after close, off the writer's path
                else:
                    self._catch_up()
                    if self.hashes.backlog == 0 and written < INLINE_HASH:
                        self.hasher.update(data if written == len(data) else data[:written])
                    else:  # (read back from the copy, where they are now: nothing held)
                        self.hashes.update_range(self.hasher, self.fd, offset, written)
                self.hashed += written
            else:
                self.hasher, self.unhashed = None, 0
        self.size = max(self.size, offset + written)
        self.mtime_ns = time.time_ns()
        self.dirty = True
        if self.size - self.written_back >= WRITEBACK_CHUNK:
            start, self.written_back = self.written_back, self.size
            start_writeback(self.fd, start, self.size - start)
        return written

    async def truncate(self, size: int) -> None:
        if size > MAX_SIZE:
            raise refused("truncate", size)
        try:
            await trio.to_thread.run_sync(os.ftruncate, self.fd, size)
        except OSError as exc:
            if exc.errno not in (errno.EFBIG, errno.ENOSPC):
                raise
            raise refused("truncate", size, exc) from None
        if size < self.hashed or size > self.size:
            self.hasher = None if size != 0 else RunningHash()
            self.hashed = self.unhashed = 0
        self.size = size
        self.mtime_ns = time.time_ns()
        self.dirty = True

    def set_attrs(self, mode: int | None, mtime_ns: int | None) -> None:
        if mode is not None:
            self.mode = mode & 0o7777
        if mtime_ns is not None:
            self.mtime_ns = mtime_ns
        self.dirty = True

    def _catch_up(self) -> None:
        """Feed the hasher the run's first bytes, read back from the copy (page cache)."""
        if self.unhashed and self.hasher is not None:
            if self.hashes.backlog == 0:  # (at most INLINE_PREFIX bytes)
                self.hasher.update(os.pread(self.fd, self.unhashed, 0))
            else:
                self.hashes.update_range(self.hasher, self.fd, 0, self.unhashed)
        self.unhashed = 0

    async def digest(self) -> str:
        """The content's SHA-256: from the running hash, or by reading the copy again."""
        if self.hasher is not None and self.hashed == self.size:
            if self.unhashed:  # (a small file: nothing went to the hash thread)
                self._catch_up()
            if self.hashes.backlog == 0:
                return self.hasher.hexdigest()
            return await self.hashes.hexdigest(self.hasher)
        return await trio.to_thread.run_sync(_hash_fd, self.fd)


class StagingArea:
    """The staging directory and the copies in it, by inode."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.staged: dict[int, Staging] = {}
        self.hashes = HashThread("staging-hash")
        self._run_id = uuid.uuid4().hex[:12]  # staging names: unique without a syscall each
        self._count = 0
        self.blanks = BlankFiles(directory, self._run_id)  # made ahead, off the trio thread

    def clear_leftovers(self) -> None:
        """Staging files of a crashed run: their content was never closed, so never
        promised; remove them."""
        for path in self.directory.iterdir():
            path.unlink(missing_ok=True)

    def copies_on_disk(self) -> set[str]:
        """The staging files holding a copy (those made ahead and not taken left out)."""
        return {path.name for path in self.directory.iterdir()} - self.blanks.waiting()

    def new(self, ino: int, entry: FileEntry) -> Staging:
        """An empty staging copy for the inode, with `entry`'s attributes as its base."""
        blank = self.blanks.take()
        if blank is None:
            self._count += 1
            path = self.directory / f"{self._run_id}-{self._count}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        else:
            path, fd = blank
        st = Staging(path, fd, 0, entry.mode, entry.mtime_ns, RunningHash(), self.hashes,
                     base=entry)
        self.staged[ino] = st
        return st

    async def fill(self, st: Staging, source: Path, size: int) -> None:
        """Copy a file's current content into its new staging copy."""
        def copy() -> None:
            with open(source, "rb") as src:
                offset = 0
                while chunk := src.read(FILL_CHUNK):
                    if chunk != _ZEROS[:len(chunk)]:  # a hole stays a hole (sparse files)
                        os.pwrite(st.fd, chunk, offset)
                    offset += len(chunk)
                os.ftruncate(st.fd, offset)
        await trio.to_thread.run_sync(copy)
        st.size = size
        st.hasher, st.unhashed = None, 0

    def seal(self, ino: int) -> Staging:
        """Take the copy out of the area: it is becoming a blob (a later write starts a
        new copy from it)."""
        return self.staged.pop(ino)

    def drop(self, ino: int) -> Path | None:
        """Forget the inode's copy; a synced one is returned, not removed (its journal
        record goes first: GroupCommitter.retire_copy)."""
        st = self.staged.pop(ino, None)
        if st is None:
            return None
        os.close(st.fd)
        if st.synced:
            return st.path
        st.path.unlink(missing_ok=True)
        return None

    def recover_synced(self, state: LocalState, cache: CacheIndex,
                       closed: list[SyncedCopy] | None = None) -> int:
        """Copies an earlier run fsync'd while their file stayed open, and never closed, and
        copies closed but not named yet (`closed`, from the closed-file log: their content
        is the file's mtime and mode as recorded), become the file's content: linked into
        the cache under their hash and journaled, one transaction each (database thread,
        before the journal is loaded). The copies go with `clear_leftovers`; the caller
        makes the result durable. Returns how many."""
        count = 0
        for copy in state.synced_copies():
            count += self._recover(copy, state, cache, closed=False)
        for copy in closed or []:
            count += self._recover(copy, state, cache, closed=True)
        return count

    def _recover(self, copy: SyncedCopy, state: LocalState, cache: CacheIndex,
                 closed: bool) -> int:
        path = self.directory / copy.path
        entry = recovered_entry(path, copy, state, closed)
        if entry is not None:
            cache.link_in(path, entry.sha256)
        state.recover_synced_copy(copy, entry)
        if entry is None:
            return 0
        log.info("the content of %r %s before the last run ended was kept (%d bytes)",
                 copy.name, "closed" if closed else "fsync'd", entry.size)
        return 1


def recovered_entry(path: Path, copy: SyncedCopy, state: LocalState,
                    closed: bool) -> FileEntry | None:
    """What a staging copy an earlier run left (fsync'd while open, or `closed` and not
    named yet) becomes at the next start: the file's entry, or None if there is nothing to
    recover. Recovery journals it; --salvage copies it out."""
    try:
        st = path.stat()
        sha = hash_file(path)
    except FileNotFoundError:
        log.info("staging copy %s is gone (its file was named): skipped", copy.path)
        return None
    # A synced copy's close() journaled it (later ops may have renamed or removed the name
    # since); a closed copy is gone once named, so only a naming cut short by the crash
    # leaves it with its op, the name's last (an earlier op of the name with this content
    # says nothing: X, Y, then X again).
    if state.journaled(copy.dir_id, copy.name, sha, last=closed):
        return None
    # (a closed copy's time is the file's at close, or a later utimens, as logged)
    return FileEntry(sha, st.st_size, copy.mtime_ns if closed else st.st_mtime_ns, copy.mode)


def refused(what: str, size: int, exc: OSError | None = None) -> FsError:
    """A size the repository (over `MAX_SIZE`) or the cache's disk (`exc`: EFBIG, or
    ENOSPC for a growth) cannot hold: the user's request is refused with that errno,
    logged at INFO (nothing went wrong in imgrepo)."""
    reason = exc.strerror if exc is not None else f"over the largest file size, {MAX_SIZE} bytes"
    log.info("%s to %d bytes refused: %s", what, size, reason)
    return FsError(exc.errno if exc is not None and exc.errno else errno.EFBIG)


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
