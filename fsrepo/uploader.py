"""Carries the journal to the bucket: blob uploads, then batched manifest commits.

- Blobs referenced by pending ops are uploaded several at a time, unless the hash index (or
  a HEAD) says the bucket has them already: identical content costs one upload, ever.
- A directory's pending ops are committed together, in one read-modify-write of its
  manifest (If-Match). On 412 the manifest is re-read and the ops re-applied: a merge.
- An op is committed only when the blob it references is in the bucket, and a rename's
  removal only after its addition, so the bucket never references a missing blob and never
  loses a name in between.
- Failures are retried with backoff, forever: nothing in the journal is ever dropped
  because the network was down.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import trio

from .blobcache import BlobCache
from .errors import (
    ImgrepoError,
    ManifestError,
    ObjectNotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageError,
)
from .journal import Journal, PendingOp
from .manifest import DirEntry, Entry, FileEntry, Manifest, parse_manifest, serialise_manifest
from .merge import apply_ops, coalesce
from .namespace import Namespace
from .repository import blob_key, manifest_key
from .state import StateDB
from .store.base import Store, StoredObject

log = logging.getLogger(__name__)


@dataclass
class UploadStatus:
    uploads_in_flight: set[str] = field(default_factory=set)
    bytes_in_flight: int = 0
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    skipped_blobs: int = 0  # already in the bucket: dedup
    commits: int = 0
    conflicts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_success_at: float | None = None
    login_required: bool = False


class Uploader:
    def __init__(self, store: Store, db: StateDB, journal: Journal, cache: BlobCache,
                 namespace: Namespace, *, host: str, parallel: int = 8,
                 batch_delay: float = 0.2) -> None:
        self.store = store
        self.db = db
        self.journal = journal
        self.cache = cache
        self.ns = namespace
        self.host = host
        self.parallel = parallel
        self.batch_delay = batch_delay
        self.remote: set[str] = set()  # blobs known to be in the bucket
        self.status = UploadStatus()
        self._slots = trio.Semaphore(parallel)
        self._committing: set[str] = set()
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (count, retry at)
        self.idle = trio.Event()
        self._kick = trio.Event()

    # -- bookkeeping ----------------------------------------------------------------------
    def known_remote(self, shas: set[str]) -> None:
        new = shas - self.remote
        if new:
            self.remote |= new

    def kick(self) -> None:
        self._kick.set()

    def pending_blobs(self) -> dict[str, int]:
        """Blobs the journal needs that are not yet in the bucket: sha -> size."""
        out: dict[str, int] = {}
        for p in self.journal.by_seq.values():
            e = p.op.entry
            if isinstance(e, FileEntry) and e.sha256 not in self.remote:
                out[e.sha256] = e.size
        return out

    def _error(self, what: str, exc: BaseException) -> None:
        self.status.last_error = f"{what}: {exc}"
        self.status.last_error_at = time.time()
        self.status.login_required = isinstance(exc, StorageAccessDenied)
        log.warning("%s failed (will retry): %s", what, exc)

    def _backoff(self, key: str) -> None:
        count = self._failures.get(key, (0, 0.0))[0] + 1
        delay = min(60.0, 0.5 * 2 ** min(count, 7)) * (0.5 + random.random())
        self._failures[key] = (count, time.time() + delay)

    def _ready(self, key: str) -> bool:
        return self._failures.get(key, (0, 0.0))[1] <= time.time()

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                self._kick = trio.Event()
                started = self._schedule(nursery)
                if not self.journal.by_seq and not self.status.uploads_in_flight \
                        and not self._committing:
                    self.idle.set()
                else:
                    self.idle = trio.Event() if self.idle.is_set() else self.idle
                with trio.move_on_after(0.5 if not started else 5):
                    changed = self.journal.changed
                    async with trio.open_nursery() as waiter:
                        async def on(event: trio.Event) -> None:
                            await event.wait()
                            waiter.cancel_scope.cancel()
                        waiter.start_soon(on, changed)
                        waiter.start_soon(on, self._kick)
                if self.batch_delay:
                    await trio.sleep(self.batch_delay)

    def _schedule(self, nursery: trio.Nursery) -> bool:
        started = False
        pending = self.pending_blobs()
        for sha, size in pending.items():
            if sha in self.status.uploads_in_flight or not self._ready("blob:" + sha):
                continue
            if self._slots.value == 0:
                break
            self.status.uploads_in_flight.add(sha)
            self.status.bytes_in_flight += size
            nursery.start_soon(self._upload, sha, size)
            started = True
        for dir_id in list(self.journal.by_dir):
            if dir_id in self._committing or not self._ready("dir:" + dir_id):
                continue
            batch = self._committable(dir_id)
            if batch:
                self._committing.add(dir_id)
                nursery.start_soon(self._commit, dir_id, batch)
                started = True
        return started

    def _committable(self, dir_id: str) -> list[PendingOp]:
        """The longest prefix of the directory's ops that can go now."""
        out = []
        for p in self.journal.by_dir.get(dir_id, ()):
            if not p.written:  # not yet in the local database: not ours to send
                break
            e = p.op.entry
            if isinstance(e, FileEntry) and e.sha256 not in self.remote:
                break
            if p.requires is not None and p.requires in self.journal.by_seq:
                break
            out.append(p)
        return out

    # -- blobs ----------------------------------------------------------------------------
    async def _upload(self, sha: str, size: int) -> None:
        async with self._slots:
            try:
                await self._upload_one(sha, size)
                self._failures.pop("blob:" + sha, None)
                self.status.last_success_at = time.time()
                self.status.login_required = False
            except (ImgrepoError, OSError) as exc:
                self._error(f"upload of blob {sha[:12]}", exc)
                self._backoff("blob:" + sha)
            finally:
                self.status.uploads_in_flight.discard(sha)
                self.status.bytes_in_flight -= size
                self._kick.set()

    async def _upload_one(self, sha: str, size: int) -> None:
        key = blob_key(sha)
        if await self.store.head(key) is None:
            path = self.cache.path(sha)
            if not self.cache.has(sha):
                raise ImgrepoError(f"blob {sha} is pending upload but missing from the cache")
            created = await self.store.put_file(key, path, sha)
            if created:
                self.status.uploaded_blobs += 1
                self.status.uploaded_bytes += size
            else:
                self.status.skipped_blobs += 1
        else:
            self.status.skipped_blobs += 1
        await self.db.run(self.db.state.mark_uploaded, [sha])
        self.remote.add(sha)
        self.cache.uploaded(sha)

    # -- manifests ------------------------------------------------------------------------
    async def _commit(self, dir_id: str, batch: list[PendingOp]) -> None:
        try:
            await self._commit_one(dir_id, batch)
            self._failures.pop("dir:" + dir_id, None)
            self.status.commits += 1
            self.status.last_success_at = time.time()
            self.status.login_required = False
        except (ImgrepoError, OSError) as exc:
            self._error(f"update of directory {dir_id}", exc)
            self._backoff("dir:" + dir_id)
        finally:
            self._committing.discard(dir_id)
            self._kick.set()
            await self.cache.evict()

    async def _read_manifest(self, dir_id: str) -> tuple[dict[bytes, Entry], str | None]:
        try:
            obj = await self.store.get(manifest_key(dir_id))
        except ObjectNotFound:
            return {}, None
        assert isinstance(obj, StoredObject)
        manifest, problems = parse_manifest(obj.data, dir_id)
        for p in problems:
            log.warning("%s", p)
        return manifest.entries, obj.etag

    async def _commit_one(self, dir_id: str, batch: list[PendingOp]) -> None:
        view = self.ns.views.get(dir_id)
        cached = None if view is None else (dict(view.remote), view.etag)
        if cached is None:
            row = await self.db.run(self.db.state.load_manifest, dir_id)
            if row is not None and (row[1] is not None or row[0] is None):
                try:
                    entries = (parse_manifest(row[1], dir_id)[0].entries if row[1] else {})
                    cached = (entries, row[0])
                except ManifestError:
                    cached = None
        remote, etag = cached if cached is not None else await self._read_manifest(dir_id)
        ops = [p.op for p in batch]
        for attempt in range(1, 100):
            entries = dict(remote)
            ops_now = await self._drop_unsafe_dir_removals(remote, ops)
            diverted = apply_ops(entries, ops_now, self.host)
            body = serialise_manifest(Manifest(dir_id, entries))
            try:
                if etag is None:
                    new_etag = await self.store.put(manifest_key(dir_id), body,
                                                    if_none_match=True)
                else:
                    new_etag = await self.store.put(manifest_key(dir_id), body, if_match=etag)
                break
            except (PreconditionFailed, ObjectNotFound):
                # Someone else wrote it: merge onto their version.
                remote, etag = await self._read_manifest(dir_id)
                await trio.sleep(min(1.0, 0.01 * attempt * random.random()))
        else:
            raise StorageError(f"directory {dir_id}: too many concurrent writers")
        if diverted:
            self.status.conflicts += len(diverted)
            for name, where in diverted.items():
                log.warning("conflict in directory %s: %r was changed elsewhere; this "
                            "machine's version is kept as %r", dir_id, name, where)
        seqs = [p.seq for p in batch]
        await self.db.run(self.db.state.commit_dir, dir_id, new_etag, body, seqs)
        self.journal.retire(dir_id, seqs)
        self.known_remote({e.sha256 for e in entries.values() if isinstance(e, FileEntry)})
        self.ns.set_remote(dir_id, entries, new_etag)

    async def _drop_unsafe_dir_removals(self, remote: dict[bytes, Entry], ops: list):
        """A directory removed here may have gained files on another machine meanwhile:
        then the removal is dropped, so their files stay reachable."""
        out = []
        for op in coalesce(ops):
            base = op.base
            if op.entry is None and isinstance(base, DirEntry) and remote.get(op.name) == base:
                if op.name not in {o.name for o in ops if o.entry is not None}:
                    try:
                        child, _ = await self._read_manifest(base.id)
                    except ManifestError:
                        child = {}
                    if child:
                        # What this machine itself still has to take out of it (files
                        # deleted or moved away, not yet committed) does not count.
                        child = dict(child)
                        apply_ops(child, self.journal.ops_for(base.id), self.host)
                    if child:
                        log.warning("directory %r was removed here but another machine added "
                                    "files to it; keeping it", op.name)
                        continue
            out.append(op)
        return out

    # -- waiting --------------------------------------------------------------------------
    def pending_summary(self) -> dict[str, int]:
        blobs = self.pending_blobs()
        return {"ops": len(self.journal), "blobs": len(blobs), "bytes": sum(blobs.values())}

    async def wait_idle(self) -> None:
        while self.journal.by_seq or self.status.uploads_in_flight or self._committing:
            self._kick.set()
            await trio.sleep(0.05)
