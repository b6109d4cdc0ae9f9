"""The group commit: what close() and namespace changes left in the page cache is made to
survive a power loss in one batch, once per interval or when an fsync() asks (like a
journaling filesystem's `commit=`), never once per file.

close() returns once the file's blob is named in the cache and its journal entry written to
the WAL, without an fsync: both survive a kill -9 of the mount, since the kernel holds them.
A commit puts them on the disk in order: the data first (the files named since the last
commit: writeback started on all of them, then an fsync of each, which a journaling
filesystem commits together), then the journal that names it (the transaction
`mark_committed`, then an fsync of the database's files). Not syncfs: that would flush
everything anyone wrote on the filesystem, once a second, and wait for it. A power loss before a commit leaves the journal naming blobs that may be
torn, or not naming them at all: recovery hashes every pending blob of an earlier run
before upload and drops the changes whose blob is damaged (blob_upload.py), so what was not
committed is absent, never wrong.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol

import trio

from .journal import Journal
from .state import StateDB, SyncedCopy

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0  # seconds: at most this long after close() until power-safe
# A commit that only syncs the data of files fsync'd before (a database's fsync at every
# transaction) does it on the loop's thread while such syncs take less than this: handing
# an fdatasync to a worker thread and back costs 2-4 x the fdatasync itself on this
# machine (docs/perf-log.md), and the loop waits for it either way; a slower one (a disk
# busy with other writeback) sends the next to a worker thread, where it cannot hold up
# other requests, until one there is fast again.
INLINE_SYNC_LIMIT = 0.002  # seconds
INLINE_SYNC_FILES = 4
_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
_sync_file_range = getattr(_libc, "sync_file_range", None)
_SYNC_FILE_RANGE_WRITE = 2


class Disk(Protocol):
    """How data is forced onto the disk (tests record it to simulate a power loss)."""

    def sync_filesystem(self, root: Path) -> None:
        """Everything written on the filesystem holding `root` (syncfs)."""
        ...

    def sync_files(self, paths: Iterable[Path]) -> None:
        """These files, data and name (fsync each; a file gone meanwhile is skipped)."""
        ...

    def sync_data(self, paths: Iterable[Path]) -> None:
        """These files' data and size, not their names or times (fdatasync each; a file
        gone meanwhile is skipped): files synced whole before, written again since."""
        ...


class LocalDisk:
    """The real thing: syncfs(2) and sync_file_range(2) through libc, fsync(2)."""

    def sync_filesystem(self, root: Path) -> None:
        if _syncfs is None:  # a libc without it: sync(2) covers every filesystem
            os.sync()
            return
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs of {root} failed: {os.strerror(err)}")
        finally:
            os.close(fd)

    def sync_files(self, paths: Iterable[Path]) -> None:
        _sync_each(paths, os.fsync)

    def sync_data(self, paths: Iterable[Path]) -> None:
        # A database's fsync() at every transaction rewrites its WAL in place: on ext4 an
        # fdatasync of that costs a quarter of an fsync, which also journals the new mtime.
        _sync_each(paths, os.fdatasync)


def _sync_each(paths: Iterable[Path], sync: Callable[[int], None]) -> None:
    paths = list(paths)
    fds = []
    try:
        for path in paths:
            try:
                fds.append(os.open(path, os.O_RDONLY))
            except FileNotFoundError:
                continue
            if _sync_file_range is not None and len(paths) > 1:  # all their writeback at once
                _sync_file_range(ctypes.c_int(fds[-1]), ctypes.c_longlong(0),
                                 ctypes.c_longlong(0), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))
        for fd in fds:
            sync(fd)
    finally:
        for fd in fds:
            os.close(fd)


class GroupCommitter:
    """Collects what needs the disk (`blob_named`, `keep_copy`, `retire_copy`) and commits
    it in batches (`commit`, `run`)."""

    def __init__(self, db: StateDB, journal: Journal, interval: float = DEFAULT_INTERVAL,
                 disk: Disk | None = None) -> None:
        self.db = db
        self.journal = journal
        self.interval = interval
        self.disk: Disk = disk or LocalDisk()
        self._lock = trio.Lock()
        self._noted = 0  # notes so far: each names something the next commit must cover
        self._covered = (0, 0)  # (journal writes, notes) the last commit covered
        self._data: dict[str, Path] = {}  # blobs named since the last commit
        # fsync'd open files (with their record when it is new or changed)
        self._copies: dict[str, tuple[Path, SyncedCopy | None]] = {}
        self._retired: dict[str, Path] = {}  # synced copies closed or dropped since
        self.commits = 0  # commits done by this run
        # Names the files closed since (commit.Committer.name_closed): first in a commit.
        self.name_closed: Callable[[], Awaitable[None]] | None = None
        self.last_commit_at: float | None = None
        self._inline_sync = True  # whether the last data-only sync was fast (see above)

    # -- notes ----------------------------------------------------------------------------
    def blob_named(self, path: Path) -> None:
        """A close() named a new blob in the cache (its data is in the page cache)."""
        self._data[path.name] = path
        self._noted += 1

    def closed_noted(self) -> None:
        """A close() recorded a copy in the closed-file log: the next commit names it."""
        self._noted += 1

    def keep_copy(self, path: Path, copy: SyncedCopy | None) -> None:
        """An fsync() of a file still open: its staging copy is its content from now on
        (`copy`: its record, new or changed; None: recorded already, only its data)."""
        if copy is not None or path.name not in self._copies:
            self._copies[path.name] = (path, copy)
        self._noted += 1

    def retire_copy(self, path: Path) -> None:
        """A synced copy is done with (its file closed: the blob is a hard link to it; or
        dropped): its record goes at the next commit, the file after that."""
        self._retired[path.name] = path
        self._noted += 1

    def _ticket(self) -> tuple[int, int]:
        return self.journal.writes + (1 if self.journal.unwritten else 0), self._noted

    @property
    def dirty(self) -> bool:
        """Whether anything written since the last commit is not power-safe yet."""
        writes, noted = self._ticket()
        return writes > self._covered[0] or noted > self._covered[1]

    # -- committing -----------------------------------------------------------------------
    async def commit(self) -> None:
        """Return once everything written or noted before the call survives a power loss
        (callers that arrive during a commit share the next one)."""
        want = self._ticket()
        # Not `async with`: its checkpoint passes through the scheduler even when the lock
        # is free, ~8 us of a database's ~40 us of work per commit on this machine.
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            if self._covered[0] >= want[0] and self._covered[1] >= want[1]:
                return
            if self.name_closed is not None:
                await self.name_closed()
            # What this commit covers of the notes: a close() recorded after the naming
            # (while the journal is written, below) is not named by it, and stays due.
            noted = self._noted
            await self.journal.write_queued()
            covered = (self.journal.writes, noted)
            journal = covered[0] > self._covered[0]
            data, self._data = self._data, {}
            copies, self._copies = self._copies, {}
            retired, self._retired = self._retired, {}
            try:
                # A copy recorded before (None) was synced whole then: its data is enough.
                files = [*data.values(), *(p for p, c in copies.values() if c is not None),
                         *retired.values()]
                rewritten = [p for p, c in copies.values() if c is None]
                if not files and 0 < len(rewritten) <= INLINE_SYNC_FILES and self._inline_sync:
                    took = self._sync(files, rewritten)
                    self._inline_sync = took < INLINE_SYNC_LIMIT
                elif files or rewritten:
                    took = await trio.to_thread.run_sync(self._sync, files, rewritten)
                    if not files:
                        self._inline_sync = took < INLINE_SYNC_LIMIT
                kept = [c for _, c in copies.values() if c is not None and c.path not in retired]
                if kept or retired:
                    await self.db.run(self.db.state.mark_committed, kept, list(retired))
                if kept or retired or journal:
                    # Off the database's thread: the close()s waiting for it go on meanwhile
                    # (what they write after the fsync started goes with the next commit).
                    await trio.to_thread.run_sync(self.disk.sync_files, self.db.state.files())
            except BaseException:
                self._data = data | self._data
                for name, (path, record) in copies.items():  # a record not written yet wins
                    if record is not None or name not in self._copies:
                        self._copies[name] = (path, record)
                self._retired = retired | self._retired
                raise
            self._covered = covered
            self.commits += 1
            self.last_commit_at = time.time()
        finally:
            self._lock.release()
        if retired:
            await trio.to_thread.run_sync(_unlink_all, list(retired.values()))

    def _sync(self, files: list[Path], rewritten: list[Path]) -> float:
        """Both in one call (one hand-off when in a worker thread); returns its seconds."""
        t0 = time.perf_counter()
        if files:
            self.disk.sync_files(files)
        if rewritten:
            self.disk.sync_data(rewritten)
        return time.perf_counter() - t0

    async def run(self) -> None:
        """Commit once per interval while anything is waiting for it."""
        while True:
            await trio.sleep(self.interval)
            if self.dirty:
                try:
                    await self.commit()
                except OSError as exc:
                    log.error("cannot commit to the local disk (trying again in %.0f s): %s",
                              self.interval, exc)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
