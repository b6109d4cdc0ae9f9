"""Getting one blob into the bucket: HEAD or PUT, a check of blobs an earlier run left, and
giving up on blobs whose only copy is gone.

HEAD first: content another machine already stored costs no upload bandwidth (an
If-None-Match PUT would send the whole body only to hear 412).
"""

from __future__ import annotations

import enum
import logging

import trio

from .cache_index import CacheIndex
from .errors import ImgrepoError
from .hashing import hash_file
from .journal import Journal
from .manifest import FileEntry
from .namespace import Namespace
from .remote_index import RemoteIndex
from .repository import blob_key
from .state import StateDB
from .store.base import Store

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    SENT = "sent"  # this upload created the object
    ALREADY_THERE = "already there"  # dedup: the bucket had it
    ABANDONED = "abandoned"  # the content is gone; the ops naming it were dropped


class BlobUploader:
    """Sends blobs from the cache to the bucket and records them as there."""

    def __init__(self, store: Store, db: StateDB, journal: Journal, cache: CacheIndex,
                 namespace: Namespace, remote: RemoteIndex) -> None:
        self.store = store
        self.db = db
        self.journal = journal
        self.cache = cache
        self.ns = namespace
        self.remote = remote

    def can_start(self, sha: str) -> bool:
        """Whether an upload of `sha` can start: its close() has stored it in the cache, or
        it is a lost blob (its upload then finds out whether the bucket has it)."""
        return self.cache.has(sha) or sha in self.remote.lost

    async def upload(self, sha: str) -> Outcome:
        key = blob_key(sha)
        if await self.store.head(key) is None:
            path = self.cache.path(sha)
            if not self.cache.has(sha):
                if sha in self.remote.lost:
                    await self._abandon(sha)
                    return Outcome.ABANDONED
                raise ImgrepoError(f"blob {sha} is pending upload but missing from the cache")
            if sha in self.remote.unverified:
                actual = await trio.to_thread.run_sync(hash_file, path)
                if actual != sha:
                    log.error("blob %s in the local cache is damaged (it hashes to %s), "
                              "probably by a power loss before its close() returned",
                              sha[:12], actual[:12])
                    self.cache.discard(sha)
                    self.remote.lost.add(sha)
                    await self._abandon(sha)
                    return Outcome.ABANDONED
                self.remote.unverified.discard(sha)
            created = await self.store.put_file(key, path, sha)
            outcome = Outcome.SENT if created else Outcome.ALREADY_THERE
        else:
            outcome = Outcome.ALREADY_THERE
        await self.db.run(self.db.state.mark_uploaded, [sha])
        self.remote.seen_in_bucket(sha)
        self.cache.uploaded(sha)
        return outcome

    async def _abandon(self, sha: str) -> None:
        """A blob the journal names was missing from the cache at startup and is not in the
        bucket: its file was never closed (a crash between journaling and storing it), or
        the cache was damaged.
        The ops naming it can never be carried out, and waiting for them would hold up every
        later op of their directories: drop them, loudly."""
        doomed = [p for p in self.journal.by_seq.values()
                  if isinstance(p.op.entry, FileEntry) and p.op.entry.sha256 == sha]
        names = ", ".join(repr(p.op.name) for p in doomed[:5])
        log.error("the content of %s (blob %s) is neither in the local cache nor in the "
                  "bucket; dropping %d pending change(s) that need it", names or "nothing",
                  sha[:12], len(doomed))
        await self.db.run(self.db.state.drop_ops, [p.seq for p in doomed])
        self.journal.forget(doomed)
        self.cache.uploaded(sha)
        for dir_id in {p.dir_id for p in doomed}:
            view = self.ns.views.get(dir_id)
            if view is not None:
                self.ns.views.set_remote(dir_id, view.remote, view.etag)
