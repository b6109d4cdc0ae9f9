"""Carries the journal to the bucket: blob uploads, then batched manifest commits.

- Blobs referenced by pending ops are uploaded several at a time, unless the hash index (or
  a HEAD) says the bucket has them already: identical content costs one upload, ever.
- A directory's pending ops are committed together, in one read-modify-write of its
  manifest (If-Match). On 412 the manifest is re-read and the ops re-applied: a merge.
  A commit waits until the directory has been quiet for `quiet` (0.5 s) or its oldest op
  has waited `commit_delay` (2 s), unless someone waits for the upload (`kick`): a `cp -r`
  of 1,000 files costs a handful of manifest writes, not one every few files.
- An op is committed only when the blob it references is in the bucket, and a rename's
  removal only after its addition, so the bucket never references a missing blob and never
  loses a name in between.
- Failures are retried with backoff, forever: nothing in the journal is ever dropped
  because the network was down.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .blobcache import BlobCache, hash_file
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
from .namespace import EMPTY_SHA, Namespace
from .repository import blob_key, manifest_key
from .state import StateDB
from .store.base import Store, StoredObject

log = logging.getLogger(__name__)

# Uploads in flight while files are being written: the uploads' CPU (boto3, hashing for
# signatures) would otherwise slow the writers down, and the queue catches up right after.
WHILE_WRITING = 4

FLUSH_HOLD = 1.0  # seconds a kick() keeps the uploader in flush mode
TRUST_REMOTE = 600.0  # seconds; far below any sensible gc grace period (hours)


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
                 batch_delay: float = 0.2, commit_delay: float = 2.0,
                 quiet: float = 0.5) -> None:
        self.store = store
        self.db = db
        self.journal = journal
        self.cache = cache
        self.ns = namespace
        self.host = host
        self.parallel = parallel
        self.batch_delay = batch_delay
        # Batching: a directory's ops are committed once its writer has paused for `quiet`
        # seconds, or the oldest has waited `commit_delay`, or someone waits (kick()).
        self.commit_delay = commit_delay
        self.quiet = quiet
        self._seen: dict[int, float] = {}  # seq -> when this uploader first saw the op
        self._flush_until = 0.0  # flush mode (no batching) lasts while waiters keep kicking
        self._next_due = math.inf
        self.remote: set[str] = set()  # blobs known to be in the bucket
        # When this process last saw each blob in the bucket (uploaded or HEAD), and the
        # known blobs that new content re-uses and that must be seen there again first: a
        # gc may have deleted a blob the index still lists (see `reuse`).
        self.confirmed: dict[str, float] = {}
        self.unconfirmed: set[str] = set()
        self.lost: set[str] = set()  # pending blobs whose cache file was gone at startup
        # Pending blobs left by an earlier run: a power loss may have torn their file, so
        # each is hashed once before it is sent (servers that skip the checksum exist).
        self.unverified: set[str] = set()
        self.status = UploadStatus()
        self._slots = trio.Semaphore(parallel)
        self.writing: Callable[[], bool] = lambda: False
        self._committing: set[str] = set()
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (count, retry at)
        self.idle = trio.Event()
        self.progressed = trio.Event()  # set (and replaced) when an upload or commit ends
        self._kick = trio.Event()

    # -- bookkeeping ----------------------------------------------------------------------
    def note_known(self, shas: set[str]) -> None:
        """Blobs seen referenced by a manifest in the bucket: known to exist there."""
        new = shas - self.remote
        if new:
            self.remote |= new

    def reuse_or_recheck(self, sha: str) -> bool:
        """Whether a closed file whose content is blob `sha` may skip its upload (dedup).
        Only if this process saw the blob in the bucket within TRUST_REMOTE seconds: the
        index of known blobs outlives a `--gc` that deleted some of them (after they had
        been unreferenced for its grace period), and a file re-using one would then name a
        blob that is gone. Otherwise the blob is checked (one HEAD, no upload if it is
        there) before any manifest references it, and uploaded again if it is not."""
        if sha not in self.remote:
            return False
        if sha == EMPTY_SHA or time.monotonic() - self.confirmed.get(sha, -math.inf) \
                < TRUST_REMOTE:
            return True
        self.unconfirmed.add(sha)
        return False

    def _progress(self) -> None:
        self._kick.set()
        self.progressed.set()
        self.progressed = trio.Event()

    def kick(self) -> None:
        """Someone waits for the journal to drain: commit without batching delays. Waiters
        kick at least every FLUSH_HOLD seconds; once they stop (or the queue drained),
        batching resumes, so writes that start right after a wait are batched again."""
        self._flush_until = time.monotonic() + FLUSH_HOLD
        self._kick.set()

    def drained(self) -> None:
        """A waiter saw the queue empty and leaves: writes that follow are batched again."""
        self._flush_until = 0.0

    @property
    def _flush(self) -> bool:
        return time.monotonic() < self._flush_until

    def pending_blobs(self) -> dict[str, int]:
        """Blobs the journal needs that are not yet in the bucket: sha -> size."""
        out: dict[str, int] = {}
        for ops in self.journal.by_dir.values():
            last = {p.op.name: p for p in ops}
            # A superseded entry is never written, unless what supersedes it must wait for
            # another directory's commit (a rename's removal): then the ops before that
            # wait are committed first, and they write their own last entry of the name.
            ready: dict[bytes, PendingOp] = {}
            for p in ops:
                if not p.written or (p.requires is not None and p.requires in self.journal.by_seq):
                    break
                ready[p.op.name] = p
            for p in ops:
                e = p.op.entry
                if isinstance(e, FileEntry) and (e.sha256 not in self.remote
                                                 or e.sha256 in self.unconfirmed) \
                        and (last[p.op.name] is p or ready.get(p.op.name) is p):
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
        for seq in self.journal.by_seq:
            self._seen.setdefault(seq, -math.inf)  # left by an earlier run: due at once
        async with trio.open_nursery() as nursery:
            while True:
                self._kick = trio.Event()
                started = self._schedule(nursery)
                if not self.journal.by_seq and not self.status.uploads_in_flight \
                        and not self._committing:
                    self.idle.set()
                    self._flush_until = 0.0
                else:
                    self.idle = trio.Event() if self.idle.is_set() else self.idle
                timeout = min(0.5 if not started else 5,
                              max(0.0, self._next_due - time.monotonic()))
                with trio.move_on_after(timeout):
                    changed = self.journal.changed
                    async with trio.open_nursery() as waiter:
                        async def on(event: trio.Event) -> None:
                            await event.wait()
                            waiter.cancel_scope.cancel()
                        waiter.start_soon(on, changed)
                        waiter.start_soon(on, self._kick)
                if self.batch_delay:
                    # Let a burst of changes gather; but someone waiting for the queue to
                    # drain (kick) should not wait for the batching, only yield briefly.
                    await trio.sleep(min(self.batch_delay, 0.02) if self._flush
                                     else self.batch_delay)

    def _schedule(self, nursery: trio.Nursery) -> bool:
        started = False
        now = time.monotonic()
        for seq in self.journal.by_seq:
            self._seen.setdefault(seq, now)
        pending = self.pending_blobs()
        for sha, size in pending.items():
            if sha in self.status.uploads_in_flight or not self._ready("blob:" + sha):
                continue
            if not self.cache.has(sha) and sha not in self.lost:
                continue  # its close() is still storing it (a lost one: see _abandon)
            if sha == EMPTY_SHA and not self._empty_wanted(now):
                continue
            if self._slots.value == 0 or (len(self.status.uploads_in_flight) >= WHILE_WRITING
                                          and self.writing()):
                break
            self.status.uploads_in_flight.add(sha)
            self.status.bytes_in_flight += size
            nursery.start_soon(self._upload, sha, size)
            started = True
        self._next_due = math.inf
        if len(self._seen) > 2 * len(self.journal.by_seq) + 1000:
            self._seen = {s: t for s, t in self._seen.items() if s in self.journal.by_seq}
        for dir_id in list(self.journal.by_dir):
            if dir_id in self._committing or not self._ready("dir:" + dir_id):
                continue
            batch = self._committable(dir_id)
            if batch and self._due(dir_id, len(batch)):
                self._committing.add(dir_id)
                nursery.start_soon(self._commit, dir_id, batch)
                started = True
        return started

    def _due(self, dir_id: str, count: int) -> bool:
        """Whether the first `count` ops of a directory should be committed now."""
        now = time.monotonic()
        if self._flush:
            # Someone waits: go as soon as the whole directory is ready, or nothing it
            # still needs is on its way, or the batch has waited long enough.
            ops = self.journal.by_dir[dir_id]
            if count == len(ops):
                return True
            waiting_for = {p.op.entry.sha256 for p in ops[count:]
                           if isinstance(p.op.entry, FileEntry)}
            if not waiting_for & self.status.uploads_in_flight:
                return True
            first = self._seen.get(ops[0].seq, now)
            if now - first >= self.commit_delay:
                return True
            self._next_due = min(self._next_due, first + self.commit_delay)
            return False
        seen = [self._seen[p.seq] for p in self.journal.by_dir[dir_id]]
        due = min(max(seen) + self.quiet, min(seen[:count]) + self.commit_delay)
        if due <= now:
            return True
        self._next_due = min(self._next_due, due)
        return False

    def _empty_wanted(self, now: float) -> bool:
        """A new file is journaled empty at create and replaced at close: upload the empty
        blob only for a file that stayed empty (its op is due), not for every create."""
        if self._flush:
            return True
        for ops in self.journal.by_dir.values():
            for p in {p.op.name: p for p in ops}.values():
                e = p.op.entry
                if isinstance(e, FileEntry) and e.sha256 == EMPTY_SHA \
                        and self._seen[p.seq] + self.quiet <= now:
                    return True
        return False

    def _committable(self, dir_id: str) -> list[PendingOp]:
        """The longest prefix of the directory's ops that can go now. An op whose blob is
        not in the bucket yet can go only with a later op on its name that replaces it (a
        file created empty, then written: its empty version is never uploaded)."""
        ops = self.journal.by_dir.get(dir_id, [])
        last = {p.op.name: p for p in ops}
        out = []
        for p in ops:
            if not p.written:  # not yet in the local database: not ours to send
                break
            if self._needs_blob(p) and last[p.op.name] is p:
                break
            if p.requires is not None and p.requires in self.journal.by_seq:
                break
            out.append(p)
        while True:  # what the batch writes for each name is its last op there
            final = {p.op.name: p for p in out}
            cut = next((i for i, p in enumerate(out)
                        if final[p.op.name] is p and self._needs_blob(p)), None)
            if cut is None:
                return out
            out = out[:cut]

    def _needs_blob(self, p: PendingOp) -> bool:
        e = p.op.entry
        return isinstance(e, FileEntry) and (e.sha256 not in self.remote
                                             or e.sha256 in self.unconfirmed)

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
                self._progress()

    async def _upload_one(self, sha: str, size: int) -> None:
        key = blob_key(sha)
        # HEAD first: content another machine already stored costs no upload bandwidth
        # (an If-None-Match PUT would send the whole body only to hear 412).
        if await self.store.head(key) is None:
            path = self.cache.path(sha)
            if not self.cache.has(sha):
                if sha in self.lost:
                    await self._abandon(sha)
                    return
                raise ImgrepoError(f"blob {sha} is pending upload but missing from the cache")
            if sha in self.unverified:
                actual = await trio.to_thread.run_sync(hash_file, path)
                if actual != sha:
                    log.error("blob %s in the local cache is damaged (it hashes to %s), "
                              "probably by a power loss before its close() returned",
                              sha[:12], actual[:12])
                    self.cache.discard(sha)
                    self.lost.add(sha)
                    await self._abandon(sha)
                    return
                self.unverified.discard(sha)
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
        self.confirmed[sha] = time.monotonic()
        self.unconfirmed.discard(sha)
        self.cache.uploaded(sha)

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
            self._progress()
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
        # A removal that `requires` an earlier op is the source side of a rename.
        moved = {p.op.name for p in batch if p.op.entry is None and p.requires is not None}
        for attempt in range(1, 100):
            entries = dict(remote)
            ops_now = await self._drop_unsafe_dir_removals(remote, ops, moved)
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
        self.note_known({e.sha256 for e in entries.values() if isinstance(e, FileEntry)})
        self.ns.views.set_remote(dir_id, entries, new_etag)

    async def _drop_unsafe_dir_removals(self, remote: dict[bytes, Entry], ops: list,
                                        moved: set[bytes] = frozenset()):  # type: ignore[assignment]
        """A directory removed here may have gained files on another machine meanwhile:
        then the removal is dropped, so their files stay reachable. The old name of a
        directory renamed away (to another parent: `moved`, or within this one) always
        goes: the directory lives on under its new name, content and all."""
        out = []
        moved_ids = {o.entry.id for o in ops if isinstance(o.entry, DirEntry)}
        for op in coalesce(ops):
            base = op.base
            if op.entry is None and isinstance(base, DirEntry) and remote.get(op.name) == base \
                    and op.name not in moved and base.id not in moved_ids:
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
            self.kick()
            await trio.sleep(0.05)
        self.drained()
