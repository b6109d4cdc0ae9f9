"""Getting one blob into the bucket: HEAD or PUT, a check of blobs an earlier run left, and
giving up on blobs whose only copy is gone.

HEAD first: content another machine already stored costs no upload bandwidth (an
If-None-Match PUT would send the whole body only to hear 412).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import trio

from .cache_index import CacheIndex
from .chunking import ChunkLists, hash_range
from .errors import ImgrepoError
from .hashing import hash_file
from .journal import Journal
from .manifest import Chunks, FileEntry
from .namespace import Namespace
from .remote_index import RemoteIndex
from .repository import blob_key
from .state import StateDB
from .store.base import FileRange, Store

log = logging.getLogger(__name__)


async def stored_whole(store: Store, key: str, length: int, what: str) -> bool:
    """Whether the bucket holds `key` with `length` bytes. An object of another size under
    the content's name (a body cut short that a server kept) is not trusted by its name:
    it is deleted, to be sent again whole."""
    there = await store.head(key)
    if there is None:
        return False
    if there == length:
        return True
    log.warning("%s has %d bytes in the bucket instead of %d: sending it again",
                what, there, length)
    await store.delete(key)
    return False

CHUNKS_AT_ONCE = 4  # chunks of one file in flight


class Outcome(enum.Enum):
    SENT = "sent"  # this upload created the object
    ALREADY_THERE = "already there"  # dedup: the bucket had it
    ABANDONED = "abandoned"  # the content is gone; the ops naming it were dropped


class Uploaded(NamedTuple):
    """What an upload did, and the bytes it sent (a chunked file: only its new chunks)."""

    outcome: Outcome
    sent_bytes: int = 0


# chunks of a file hashed while it was written (early_chunks): (sha, size) -> index -> sha
HashedEarly = Callable[[str, int], dict[int, str]]


class BlobUploader:
    """Sends blobs from the cache to the bucket and records them as there."""

    def __init__(self, store: Store, db: StateDB, journal: Journal, cache: CacheIndex,
                 namespace: Namespace, remote: RemoteIndex, chunk_lists: ChunkLists,
                 hashed_early: HashedEarly | None = None) -> None:
        self.store = store
        self.chunk_lists = chunk_lists
        self.hashed_early = hashed_early
        self.db = db
        self.journal = journal
        self.cache = cache
        self.ns = namespace
        self.remote = remote

    def can_start(self, sha: str) -> bool:
        """Whether an upload of `sha` can start: its close() has stored it in the cache, or
        it is a lost blob (its upload then finds out whether the bucket has it)."""
        return self.cache.has(sha) or sha in self.remote.lost

    async def upload(self, sha: str) -> Uploaded:
        key = blob_key(sha)
        if not self.cache.has(sha):
            there = await self.store.head(key) is not None
        else:  # (a whole blob of an older format: dedup)
            there = await stored_whole(self.store, key, os.stat(self.cache.path(sha)).st_size,
                                       f"blob {sha[:12]}")
        if not there:
            path = self.cache.path(sha)
            known = self.chunk_lists.get(sha)
            if known is not None:  # cut before: its chunks may all be there still
                return await self._finish(sha, await self._put_chunks(
                    sha, path, known.size, list(known.shas)))
            if not self.cache.has(sha):
                if sha in self.remote.lost:
                    await self._abandon(sha)
                    return Uploaded(Outcome.ABANDONED)
                raise ImgrepoError(f"blob {sha} is pending upload but missing from the cache")
            if sha in self.remote.unverified:
                actual = await trio.to_thread.run_sync(hash_file, path)
                # A close of the same content may have replaced the torn copy while it was
                # hashed: the copy now cached is then the good one, not to be discarded.
                if actual != sha and sha in self.remote.unverified:
                    log.error("blob %s in the local cache is damaged (it hashes to %s), "
                              "probably by a power loss before its close() returned",
                              sha[:12], actual[:12])
                    self.cache.discard(sha)
                    self.remote.lost.add(sha)
                    await self._abandon(sha)
                    return Uploaded(Outcome.ABANDONED)
                self.remote.unverified.discard(sha)
            size = os.stat(path).st_size
            if self.chunk_lists.wants_chunks(size):
                chunk_size = self.chunk_lists.chunk_size
                assert chunk_size is not None
                # what was hashed while the file was written is not hashed again
                early = self.hashed_early(sha, size) if self.hashed_early else {}
                done = await self._put_chunks(sha, path, chunk_size, [
                    early.get(i) if (i + 1) * chunk_size <= size else None
                    for i in range(-(-size // chunk_size))])
            else:
                created = await self.store.put_file(key, path, sha)
                done = Uploaded(Outcome.SENT, size) if created \
                    else Uploaded(Outcome.ALREADY_THERE)
        else:
            done = Uploaded(Outcome.ALREADY_THERE)
        return await self._finish(sha, done)

    async def _put_chunks(self, sha: str, path: Path, chunk_size: int,
                          shas: list[str | None]) -> Uploaded:
        """Send a file's chunks that the bucket lacks (per chunk dedup: a chunk seen there
        lately is trusted, others cost a HEAD first; after a crash, finished chunks are
        found there and not sent again), then keep its chunk list. A chunk whose hash is
        not known yet (None) is hashed first, CHUNKS_AT_ONCE at a time, so hashing one
        chunk overlaps sending another; each PUT streams its byte range of the cached
        file (immutable: named by its content), with no copy of its own."""
        sent = 0  # bytes
        fd = os.open(path, os.O_RDONLY) if self.cache.has(sha) else None
        size = os.fstat(fd).st_size if fd is not None else None
        limit = trio.Semaphore(CHUNKS_AT_ONCE)
        errors: list[BaseException] = []

        async def one(index: int) -> None:
            try:
                async with limit:
                    if not errors:
                        await send(index)
            except (ImgrepoError, OSError) as exc:
                errors.append(exc)

        async def send(index: int) -> None:
            nonlocal sent
            chunk = shas[index]
            if chunk is None:
                chunk = shas[index] = await trio.to_thread.run_sync(
                    hash_range, *where(index))
            async with self.chunk_lists.sending(chunk):
                count = await send_unless_there(index, chunk)
            sent += count  # (not `sent += await ...`: that reads `sent` before the await)

        def missing(index: int) -> ImgrepoError:
            return ImgrepoError(f"chunk {index} of blob {sha} is missing from the bucket "
                                "and the file from the cache")

        def where(index: int) -> tuple[int, int, int]:
            """The chunk's descriptor, offset and length in the cached file."""
            if fd is None or size is None:
                raise missing(index)
            start = index * chunk_size
            return fd, start, min(chunk_size, size - start)

        async def send_unless_there(index: int, chunk: str) -> int:
            if size is None:  # not cached: its length is not known here, only whether it is there
                if self.remote.reuse_or_recheck(chunk) or \
                        await self.store.head(blob_key(chunk)) is not None:
                    self.remote.seen_in_bucket(chunk)
                    return 0
                raise missing(index)
            _, start, length = where(index)
            if self.remote.reuse_or_recheck(chunk) or await stored_whole(
                    self.store, blob_key(chunk), length, f"chunk {index} of blob {sha[:12]}"):
                self.remote.seen_in_bucket(chunk)
                return 0
            created = await self.store.put_file(blob_key(chunk), FileRange(*where(index)), chunk)
            self.remote.seen_in_bucket(chunk)
            return length if created else 0

        try:
            async with trio.open_nursery() as nursery:
                for index in range(len(shas)):
                    nursery.start_soon(one, index)
        finally:
            if fd is not None:
                os.close(fd)
        if errors:
            raise errors[0]
        chunks = Chunks(chunk_size, tuple(s for s in shas if s is not None))
        assert len(chunks.shas) == len(shas)
        await trio.to_thread.run_sync(self.chunk_lists.put, sha, chunks)
        return Uploaded(Outcome.SENT, sent) if sent else Uploaded(Outcome.ALREADY_THERE)

    async def _finish(self, sha: str, done: Uploaded) -> Uploaded:
        """Record the blob (or all of a chunked file's chunks) as in the bucket."""
        await self.db.run(self.db.state.mark_uploaded, [sha])
        self.remote.seen_in_bucket(sha)
        self.cache.uploaded(sha)
        return done

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
