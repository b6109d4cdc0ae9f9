"""Carries the journal to the bucket: blob uploads, then batched manifest commits.

The coordinator of four parts, each in its own module: the dedup trust index
(`remote_index`), the batching rules (`upload_schedule`), the blob uploads (`blob_upload`)
and the manifest commits (`manifest_commit`). It runs the loop that starts what is due,
several uploads at a time, and retries failures with backoff, forever: nothing in the
journal is ever dropped because the network was down.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .blob_upload import BlobUploader, Outcome
from .cache_index import CacheIndex
from .chunking import ChunkLists
from .early_chunks import EarlyChunks
from .errors import ImgrepoError, StorageAccessDenied, StorageOffline
from .head_writer import HeadWriter
from .journal import Journal, PendingOp
from .manifest_commit import ManifestCommitter
from .namespace import EMPTY_SHA, Namespace
from .paths import blob_path, entry_path
from .remote_index import RemoteIndex
from .retry import QUEUE, RetryTracker
from .state import StateDB
from .store.base import Store
from .upload_schedule import UploadSchedule

log = logging.getLogger(__name__)

# Uploads in flight while files are being written: the uploads' CPU (boto3, hashing for
# signatures) would otherwise slow the writers down, and the queue catches up right after.
WHILE_WRITING = 4
WRITING_PAUSE = 0.3  # seconds without a write after which files count as no longer written
# For the first seconds of a burst of writes (a `cp -r`, a camera's import) nothing starts:
# on a busy machine every upload's and manifest commit's CPU is taken from the writer, and
# they cost less once the burst is over (one manifest write for the folder, not several).
# A longer burst uploads meanwhile (WHILE_WRITING), as does anyone waiting (flush mode).
BURST_HOLD = 5.0


class WriteActivity(Protocol):
    """Where files are written (the file manager): when the last write happened."""

    @property
    def last_activity(self) -> float:
        """time.monotonic() of the last write."""
        ...

    async def name_closed(self) -> None:
        """Name the files closed and not named yet (their content is pending then)."""
        ...


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
    last_error_offline: bool = False  # the storage was unreachable: the outage, not a fault
    last_success_at: float | None = None
    login_required: bool = False


class Uploader:
    """Runs the upload loop: starts what the schedule says is due, counts what happened
    and holds back what failed (QUEUE backoff)."""

    def __init__(self, store: Store, db: StateDB, journal: Journal, cache: CacheIndex,
                 namespace: Namespace, remote: RemoteIndex, writes: WriteActivity,
                 chunk_lists: ChunkLists, *, host: str, parallel: int = 8,
                 batch_delay: float = 0.2, commit_delay: float = 2.0,
                 quiet: float = 0.5) -> None:
        self.journal = journal
        self.cache = cache
        self.batch_delay = batch_delay
        self.schedule = UploadSchedule(journal, remote, commit_delay=commit_delay,
                                       quiet=quiet)
        # completed chunks of files still being written (see early_chunks.py)
        self.early = EarlyChunks(store, remote, chunk_lists, on_sent=self._sent_early)
        self.blobs = BlobUploader(store, db, journal, cache, namespace, remote, chunk_lists,
                                  self.early.chunks_of)
        self.manifests = ManifestCommitter(store, db, journal, namespace, chunk_lists,
                                           host=host)
        self.heads = HeadWriter(store, db, host=host)
        self.status = UploadStatus()
        self._slots = trio.Semaphore(parallel)
        self.writes = writes
        self._committing: set[str] = set()
        self.retries = RetryTracker(QUEUE)  # keys: "blob:<sha>", "dir:<id>"
        self.progressed = trio.Event()  # set (and replaced) when an upload or commit ends
        self._kick = trio.Event()
        self._burst_since: float | None = None  # when the writes going on now began

    def _sent_early(self, size: int) -> None:
        self.status.uploaded_bytes += size

    def _progress(self) -> None:
        self._kick.set()
        self.progressed.set()
        self.progressed = trio.Event()

    def kick(self) -> None:
        """Someone waits for the journal to drain: commit without batching delays (see
        UploadSchedule.kick)."""
        self.schedule.kick()
        self._kick.set()

    def drained(self) -> None:
        """A waiter saw the queue empty and leaves: writes that follow are batched again."""
        self.schedule.drained()

    def _error(self, what: str, exc: BaseException) -> None:
        self.status.last_error = f"{what}: {exc}"
        self.status.last_error_at = time.time()
        self.status.login_required = isinstance(exc, StorageAccessDenied)
        self.status.last_error_offline = isinstance(exc, StorageOffline)
        if self.status.last_error_offline:
            # The outage is logged once by the connectivity guard, not once per item.
            log.debug("%s failed (will retry when the storage is back): %s", what, exc)
        else:
            log.warning("%s failed (will retry): %s", what, exc)

    def _writing_now(self) -> bool:
        return time.monotonic() - self.writes.last_activity < WRITING_PAUSE

    def _held_for_writes(self, now: float) -> bool:
        """Whether a burst of writes that began less than BURST_HOLD ago holds everything
        back (not while someone waits); `schedule.next_due` then says when to look again."""
        last = self.writes.last_activity
        if now - last >= WRITING_PAUSE:
            self._burst_since = None
            return False
        if self._burst_since is None:
            self._burst_since = now
        if self.schedule.flushing or now - self._burst_since >= BURST_HOLD:
            return False
        self.schedule.next_due = min(last + WRITING_PAUSE, self._burst_since + BURST_HOLD)
        return True

    def _succeeded(self) -> None:
        self.status.last_success_at = time.time()
        self.status.login_required = False

    def retry_now(self) -> None:
        """The storage answers again (or a new login works): what failed meanwhile is tried
        at once, not after the backoff it accumulated."""
        self.retries.forget_all()
        self.heads.retry_now()
        self.kick()

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        self.schedule.left_by_earlier_run()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.heads.run, lambda: bool(self._committing))
            nursery.start_soon(self.early.run)
            while True:
                self._kick = trio.Event()
                if not self._held_for_writes(time.monotonic()):
                    # Files closed since are named first (not while a burst of writes goes
                    # on): a folder is never committed with a new file's name but not its
                    # content, and no closed file waits longer than the writes.
                    await self.writes.name_closed()
                started = self._start_due(nursery)
                if not self.journal.by_seq and not self.status.uploads_in_flight \
                        and not self._committing:
                    self.schedule.drained()
                timeout = min(0.5 if not started else 5,
                              max(0.0, self.schedule.next_due - time.monotonic()))
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
                    await trio.sleep(min(self.batch_delay, 0.02) if self.schedule.flushing
                                     else self.batch_delay)

    def _start_due(self, nursery: trio.Nursery) -> bool:
        """Start the uploads and commits that are due; whether any started."""
        started = False
        now = time.monotonic()
        if self._held_for_writes(now):
            return False
        schedule = self.schedule
        in_flight = self.status.uploads_in_flight
        ready = self.retries.ready
        schedule.observe(now)
        settling = schedule.settling(now)
        pending = schedule.pending_blobs()
        for sha, size in pending.items():
            if sha in in_flight or not ready("blob:" + sha):
                continue
            if sha in settling:  # a rewritten file, not yet unchanged for long enough
                schedule.next_due = min(schedule.next_due, settling[sha])
                continue
            if not schedule.remote.needs_upload(sha):  # known there meanwhile (the same content)
                schedule.uploaded(sha)
                continue
            if not self.blobs.can_start(sha):
                continue  # its close() is still storing it
            if sha == EMPTY_SHA and not schedule.empty_wanted(now):
                continue
            if self._slots.value == 0 or (len(in_flight) >= WHILE_WRITING and self._writing_now()):
                break
            in_flight.add(sha)
            self.status.bytes_in_flight += size
            nursery.start_soon(self._upload, sha, size)
            started = True
        for dir_id in list(self.journal.by_dir):
            if dir_id in self._committing or not ready("dir:" + dir_id) \
                    or schedule.held_back(dir_id, now):
                continue
            batch = schedule.committable(dir_id)
            if batch and schedule.due(dir_id, batch, pending):
                self._committing.add(dir_id)
                schedule.commit_started(dir_id)
                nursery.start_soon(self._commit, dir_id, batch)
                started = True
        return started

    async def _upload(self, sha: str, size: int) -> None:
        async with self._slots:
            try:
                outcome, sent_bytes = await self.blobs.upload(sha)
                self.status.uploaded_bytes += sent_bytes
                if outcome is Outcome.SENT:
                    self.status.uploaded_blobs += 1
                elif outcome is Outcome.ALREADY_THERE:
                    self.status.skipped_blobs += 1
                self.schedule.uploaded(sha)
                self.retries.succeeded("blob:" + sha)
                self._succeeded()
            except (ImgrepoError, OSError) as exc:
                path = blob_path(self.journal.by_dir, self.manifests.ns.inodes, sha)
                self._error(f"upload of {path}", exc)
                self.retries.failed("blob:" + sha)
            finally:
                self.status.uploads_in_flight.discard(sha)
                self.status.bytes_in_flight -= size
                self._progress()

    async def _commit(self, dir_id: str, batch: list[PendingOp]) -> None:
        try:
            # (awaited first: `status.conflicts += await ...` would read the counter before
            # the await and write back over the copies other folders' commits counted)
            copies = await self.manifests.commit(dir_id, batch)
            self.status.conflicts += copies
            self.heads.committed()
            self.retries.succeeded("dir:" + dir_id)
            self.status.commits += 1
            self._succeeded()
        except (ImgrepoError, OSError) as exc:
            self._error(f"update of folder {entry_path(self.manifests.ns.inodes, dir_id)}", exc)
            self.retries.failed("dir:" + dir_id)
        finally:
            self._committing.discard(dir_id)
            self._progress()
            await self.cache.evict()

    # -- waiting --------------------------------------------------------------------------
    def pending_summary(self) -> dict[str, int]:
        blobs = self.schedule.pending_blobs()
        return {"ops": len(self.journal), "blobs": len(blobs), "bytes": sum(blobs.values())}

    async def wait_idle(self) -> None:
        await self.writes.name_closed()
        while self.journal.by_seq or self.status.uploads_in_flight or self._committing \
                or self.heads.busy:
            self.kick()
            await trio.sleep(0.05)
        self.drained()
