"""The filesystem core without FUSE: store, local state, journal, cache, namespace, files,
uploader and syncer, assembled and brought back from the last run.

`mount.Mount` builds on it and adds the kernel side (pyfuse3, control socket, signals);
tests and tools use it directly, so they exercise exactly the code a mount runs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from .announce import Invalidator
from .blobcache import BlobCache
from .chunking import ChunkLists
from .config import Settings
from .errors import ImgrepoError, NoSuchBucket, StorageError
from .files import FileManager
from .group_commit import Disk, GroupCommitter
from .journal import Journal
from .namespace import EMPTY_SHA, Namespace
from .remote_index import RemoteIndex
from .repository import open_repository
from .salvage import salvage_advice
from .snapshot_diff import current_tree, difference
from .snapshot_views import SnapshotTree
from .snapshots import Snapshot, Snapshots
from .staging import STAGING_DIR
from .state import LocalState, StateDB
from .store.base import Store
from .sync import Syncer
from .uploader import Uploader

log = logging.getLogger(__name__)


class StateLock:
    """One process per local state dir: two processes racing on one cache would corrupt it."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        # Private: it holds cached copies of the files and their names, like the mount.
        os.chmod(state_dir, 0o700)
        self.path = state_dir / "lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise ImgrepoError(f"the local cache {state_dir} is in use by another imgrepo "
                               f"process (pid {other or '?'}); unmount it first") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        os.close(self.fd)


class Engine:
    """Everything a mount runs except the kernel binding."""

    def __init__(self, settings: Settings, store: Store,
                 invalidator: Invalidator | None = None, host: str | None = None,
                 disk: Disk | None = None) -> None:
        self.settings = settings
        self.store = store
        self.state_dir = settings.state_dir()
        self.host = host or socket.gethostname() or "unknown"
        self.db = StateDB(LocalState(self.state_dir / "state.db"))
        self.journal = Journal(self.db)
        self.chunk_lists = ChunkLists(self.state_dir / "chunklists")
        self.cache = BlobCache(self.state_dir / "blobs", self.db, store, settings.cache_size,
                               self.chunk_lists)
        self.invalidator = invalidator or Invalidator()
        self.remote_index = RemoteIndex()
        self.ns = Namespace(store, self.db, self.journal, host=self.host,
                            refresh=settings.refresh, known_blobs=self.remote_index,
                            view_cache_entries=settings.view_cache_entries,
                            idle_after=settings.idle_release, invalidator=self.invalidator)
        self.durable = GroupCommitter(self.db, self.journal, settings.commit_interval, disk)
        self.files = FileManager(self.ns, self.cache, self.state_dir / STAGING_DIR,
                                 self.remote_index, self.durable, settings.read_ahead_files)
        self.uploader = Uploader(store, self.db, self.journal, self.cache, self.ns,
                                 self.remote_index, self.files, self.chunk_lists,
                                 host=self.host,
                                 parallel=settings.uploads)
        self.files.write_observer = self.uploader.early  # chunks sent while files are written
        self.syncer = Syncer(self.ns, self.cache)
        self.snapshots = Snapshots(store, self.state_dir / "snapshots", self.host)
        self.snapshot_tree = SnapshotTree(self.snapshots, self.cache, self.invalidator)
        self.started = time.time()
        self.online = True
        self.format_version: int | None = None  # the descriptor's, once read

    def load_state(self) -> None:
        """Bring back what the last run left: journal, cache index, remote index."""
        state = self.db.state
        closed = self.files.closed_log.trusted()  # (those of an earlier boot: absent)
        if self.files.staging.recover_synced(state, self.cache, closed):
            # What was recovered is the only copy of fsync'd content: on disk before the
            # staging copies go (clear_leftovers, below).
            self.durable.disk.sync_filesystem(self.state_dir)
            self.durable.disk.sync_files(state.files())
        self.files.closed_log.remove()  # (its copies are named now, or absent)
        self.journal.load(state.pending_ops())
        missing = self.cache.load(state.cached_blobs())
        for sha in missing:
            log.warning("blob %s was pending upload but its cache file is gone; unless the "
                        "bucket has it, the changes that need it will be dropped", sha)
        self.remote_index.lost |= set(missing)
        self.remote_index.unverified |= self.cache.pending - {EMPTY_SHA}
        # What this machine uploaded in earlier runs, as far as it matters now: the blobs
        # the pending ops need (not every blob it ever sent: new content that re-uses an
        # older one is checked with a HEAD anyway, see remote_index).
        needed = self.journal.blobs_needed()
        self.remote_index.remote |= state.remote_blobs(needed | {EMPTY_SHA})
        # A pending op whose content is neither here nor known to be uploaded: a name moved
        # (a rename's entry, from a manifest) of a file only the bucket has. The uploader
        # asks the bucket for it (one HEAD), as for a cache file gone missing, instead of
        # holding the op for a close that will never store it.
        self.remote_index.lost |= {sha for sha in needed - {EMPTY_SHA}
                                   if sha not in self.remote_index.remote
                                   and not self.cache.has(sha)}
        self.files.clear_leftovers()
        empty = self.cache.path(EMPTY_SHA)
        if not empty.exists():
            empty.parent.mkdir(parents=True, exist_ok=True)
            empty.touch()
        self.cache.register(EMPTY_SHA, 0, pending=EMPTY_SHA not in self.remote_index.remote)
        if self.journal.by_seq:
            log.info("resuming %d journaled operations from the last run", len(self.journal))

    async def check_repository(self, create: bool = True, settle: float = 0.0) -> None:
        """Read (or create) the descriptor; start offline from local state if we must.
        (`create`, `settle`: see open_repository; a read-only mount creates nothing.)"""
        state = self.db.state
        known = await self.db.run(state.get_meta, "repo_id")
        try:
            desc = await open_repository(self.store, create=create, settle=settle)
        except StorageError as exc:
            if known is None:
                raise
            if isinstance(exc, NoSuchBucket):
                raise ImgrepoError(f"{exc}; the local cache {self.state_dir} belonged to it"
                                   f"{salvage_advice(self.settings)}") from None
            log.warning("storage unreachable, starting offline from local state: %s", exc)
            self.online = False
            return
        if known is not None and known != desc.repo_id:
            raise ImgrepoError(
                f"{self.settings.storage} now holds a different repository than the one "
                f"cached in {self.state_dir}{salvage_advice(self.settings)}")
        if known is None:
            await self.db.run(state.set_meta, "repo_id", desc.repo_id)
        self.chunk_lists.learn(desc.chunk_size)  # large files go as chunks (format 4)
        self.format_version = desc.version

    async def cached_manifest(self, dir_id: str, etag: str | None) -> bytes | None:
        """This machine's copy of a directory's manifest if it is the version with `etag`
        (a listing's: None when the listing gives none)."""
        if etag is None:
            return None
        row = await self.db.run(self.db.state.load_manifest, dir_id)
        return row[1] if row is not None and row[0] == etag else None

    async def take_snapshot(self, name: str, period: str | None = None) -> Snapshot | None:
        """Record a snapshot of the bucket (call it once this machine's changes landed).
        An automatic one (`period`) is not taken (None) if the newest snapshot holds the
        same tree: an idle repository costs a listing per period, not a snapshot."""
        return await self.snapshots.record(name, self.cached_manifest, period,
                                           skip_unchanged=period is not None)

    async def snapshot_rows(self) -> list[dict[str, Any]]:
        """Every snapshot with what differs from the current tree (None offline)."""
        now = await current_tree(self.store) if self.store.online else None
        rows = []
        for info in await self.snapshots.names():
            snap = await self.snapshots.load(info.name)
            diff = None if now is None else await difference(
                snap, self.snapshots, self.store, now, self.cached_manifest)
            rows.append({"name": snap.name, "created": snap.created, "machine": snap.machine,
                         "period": snap.period, "dirs": len(snap.dirs),
                         "files": None if diff is None else diff.files,
                         "bytes": None if diff is None else diff.bytes})
        return rows

    async def open(self) -> None:
        """check_repository + load_state: what a mount does before it serves anything."""
        await self.check_repository()
        await self.db.run(self.load_state)

    def close(self) -> None:
        """Close the local database and stop our threads (the downloads' checks, the
        staging copies' hash thread), after the trio loop using them has finished."""
        self.cache.close()
        self.files.staging.hashes.close()
        self.files.staging.blanks.close()
        self.files.closed_log.close()
        self.db.close()
