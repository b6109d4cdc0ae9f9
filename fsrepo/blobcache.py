"""The local blob cache and how blobs get into it from the bucket: downloads.

`BlobCache` is the cache index (cache_index.py) plus the download machinery. Downloads
stream into `partial/<sha>`; readers wait only until their byte range has arrived. The
finished file is verified against its name before it joins the cache; a mismatch fails the
download (readers get EIO) and the bytes are discarded.

The hash is taken as the bytes land (the download's thread hashes each piece from the
store's buffer as it writes it), so a chunk is verified as its last byte arrives, not read
a second time after it; what is left at the end (a digest, a stat, a rename) is
done on the loop, without a hop to a thread and back. A cold read of many small files is
CPU-bound on this per-blob bookkeeping (docs/perf-log.md), so the loop's share of a
download is kept to starting it, one wake-up when it ends, and its cache-index row
written with those of the other blobs that finished in the same moment.

A download has no retry loop of its own (the store retries each request: retry.py). One
that breaks beyond those retries fails its readers, but keeps what arrived: the next read
of the blob starts a download that resumes from there, and the whole file is still
verified at the end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

import trio

from .cache_index import CacheIndex
from .chunking import ChunkLists
from .errors import ImgrepoError, IntegrityError
from .hashing import HASH_CHUNK, hash_file
from .manifest import MIN_CHUNK, Chunks, FileEntry
from .repository import blob_key
from .state import StateDB
from .store.base import ChunkSink, Store
from .workers import Workers

log = logging.getLogger(__name__)

RECORD_AFTER = 0.05  # seconds a downloaded blob's cache-index row waits for others


class Download:
    """One blob on its way into the cache; readers wait on byte ranges."""

    def __init__(self, sha: str, size: int, path: Path, available: int = 0) -> None:
        self.sha = sha
        self.size = size
        self.path = path
        self.available = available  # bytes readers may read (resumed: what arrived before)
        self.arrived = available  # bytes in the file (set by the download thread)
        self.done = False
        self.error: BaseException | None = None
        self._waiters: list[tuple[int, trio.Event]] = []
        self.finished = trio.Event()
        # The SHA-256 of the file's bytes [0, hashed), taken by the download's thread as
        # they arrive (a resumed download's first call hashes what the last one left).
        self.hasher = hashlib.sha256()
        self.hashed = 0

    def hash_arrived(self, fd: int, end: int) -> None:
        """Hash the partial file's bytes up to `end` not hashed yet (download thread)."""
        while self.hashed < end:
            piece = os.pread(fd, min(HASH_CHUNK, end - self.hashed), self.hashed)
            if not piece:
                return
            self.hasher.update(piece)
            self.hashed += len(piece)

    def progress(self, available: int) -> None:
        if not self.done:
            # The last byte is held back until the whole blob is verified: a reader can
            # never reach the end of a corrupt blob and take it for the real content.
            available = min(available, self.size - 1)
        self.available = max(self.available, available)
        still = []
        for end, event in self._waiters:
            if end <= self.available:
                event.set()
            else:
                still.append((end, event))
        self._waiters = still

    @property
    def waiting(self) -> bool:
        """Whether a reader waits for bytes (read from the download thread: a reader that
        starts waiting just after is woken by the next chunk's progress, or the end)."""
        return bool(self._waiters)

    def fail(self, error: BaseException) -> None:
        self.error = error
        for _, event in self._waiters:
            event.set()
        self._waiters = []
        self.finished.set()

    def complete(self) -> None:
        self.done = True
        self.progress(self.size)
        self.finished.set()

    async def wait_for(self, end: int) -> None:
        end = min(end, self.size)
        while self.available < end and self.error is None:
            event = trio.Event()
            self._waiters.append((end, event))
            await event.wait()
        if self.error is not None and (self.available < end
                                       or isinstance(self.error, IntegrityError)):
            raise self.error  # a corrupt blob serves nothing more, not even what arrived


class _Progress(ChunkSink):
    """What a download's thread does as bytes land: hash them (from the store's buffer,
    or read back from the file where the store handed none, e.g. a resumed download's
    earlier bytes), then tell the loop how far the blob is. The news is queued, not
    waited for: the download thread goes on receiving while the loop is busy answering
    the reads it unblocks; and only while a reader waits (a download fetched ahead wakes
    nobody: its end always does)."""

    def __init__(self, dl: Download, token: trio.lowlevel.TrioToken) -> None:
        self.dl = dl
        self.token = token

    def landed(self, data: bytes | memoryview, at: int) -> None:
        dl = self.dl
        if at == dl.hashed:
            dl.hasher.update(data)
            dl.hashed += len(data)

    def __call__(self, end: int) -> None:
        dl = self.dl
        if dl.hashed < end:
            fd = os.open(dl.path, os.O_RDONLY)
            try:
                dl.hash_arrived(fd, end)
            finally:
                os.close(fd)
        dl.arrived = end
        if dl.waiting and end < dl.size:  # (all of it: the seal, next, wakes the readers)
            self.token.run_sync_soon(dl.progress, end)


class BlobCache(CacheIndex):
    """The cache index, filled on demand by downloads that readers can follow."""

    def __init__(self, root: Path, db: StateDB, store: Store, limit: int,
                 chunk_lists: ChunkLists | None = None) -> None:
        super().__init__(root, db, limit)
        self.store = store
        self.chunk_lists = chunk_lists  # of files this machine sent as chunks
        self.partial_dir = root / "partial"
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        self.downloads: dict[str, Download] = {}
        # Downloads that broke, not by corruption: bytes their partial file holds, for the
        # next download of the blob to resume from.
        self.broken: dict[str, int] = {}
        self.nursery: trio.Nursery | None = None
        self._unrecorded: dict[str, int] = {}  # downloaded, not yet in the state's table
        # Threads of our own that read back and hash what a store did not report as it
        # landed (the S3 and local stores report every chunk: their blobs need no hop).
        self._sealers = Workers("imgrepo-verify", 2)
        self._recording = False  # a task is writing them
        self.record_after = RECORD_AFTER

    @property
    def settling(self) -> bool:
        """Downloads in flight, or finished ones whose index rows and eviction have not run
        yet (they wait `record_after` for each other): until then the cache may hold more
        than its limit."""
        return bool(self.downloads) or self._recording

    def load(self, rows: list[tuple[str, int, bool, float]]) -> list[str]:
        """Index what the database says is cached (see CacheIndex.load); downloads the last
        run left unfinished start afresh."""
        missing = super().load(rows)
        for leftover in self.partial_dir.iterdir():
            leftover.unlink(missing_ok=True)
        return missing

    # -- downloads ------------------------------------------------------------------------
    def start_download(self, sha: str, size: int) -> Download:
        """Join or start the download of a blob not in the cache (a download is listed
        only while in flight: once done, the blob is in the index, or eviction took it
        since and a new download starts)."""
        dl = self.downloads.get(sha)
        if dl is not None and dl.error is None and not dl.done:
            return dl
        # (the store makes the partial file; readers open it once bytes are there)
        dl = Download(sha, size, self.partial_dir / sha, self.broken.pop(sha, 0))
        self.downloads[sha] = dl
        assert self.nursery is not None
        self.nursery.start_soon(self._download, dl)
        return dl

    async def _download(self, dl: Download) -> None:
        try:
            try:
                await self._fetch(dl)
                if dl.hashed < dl.size:  # the store did not report all of it as it landed
                    await self._sealers.run(self._hash_rest, dl)
                self._seal(dl)  # (the last byte stays held back from readers until then)
            except (ImgrepoError, OSError) as exc:
                log.error("download of blob %s failed: %s", dl.sha, exc)
                # (the last byte is always fetched again: it was never checked)
                resume = max(dl.available, min(dl.arrived, dl.size - 1))
                if isinstance(exc, IntegrityError) or resume == 0:
                    try:
                        dl.path.unlink()
                    except OSError:
                        pass
                else:
                    self.broken[dl.sha] = resume  # the next read resumes from here
                dl.fail(exc)
                return
            self.register(dl.sha, dl.size, pending=False, dense=True)
            dl.complete()  # readers go on; the cache's bookkeeping need not hold them
        finally:
            if self.downloads.get(dl.sha) is dl:
                del self.downloads[dl.sha]
        await self._record_cached(dl.sha, dl.size)

    def close(self) -> None:
        """Stop the verifying threads (after the trio loop has finished)."""
        self._sealers.close()

    async def _record_cached(self, sha: str, size: int) -> None:
        """Note a downloaded blob in the cache index's table, then evict what is over the
        limit. The first row waits `record_after` seconds for the downloads finishing
        meanwhile; they go in the same call to the database's thread and one transaction
        (a hop and a WAL write per batch of blobs, not per blob). Rows still waiting when the mount
        stops are written then. A crash loses at most that moment's rows: their blobs are
        downloaded again when read, over the files they left."""
        self._unrecorded[sha] = size
        if self._recording:
            return
        self._recording = True
        try:
            try:
                await trio.sleep(self.record_after)
            finally:
                with trio.CancelScope(shield=True):
                    await self._record_waiting()
        finally:
            self._recording = False

    async def _record_waiting(self) -> None:
        while self._unrecorded:
            rows, self._unrecorded = self._unrecorded, {}
            try:
                await self.db.run(self.db.state.add_cached_blobs, rows)
                await self.evict()
            except OSError as exc:
                log.warning("cannot record blob %s in the cache index: %s",
                            ", ".join(rows), exc)

    def _hash_rest(self, dl: Download) -> None:
        """Hash what the download's progress did not (a verifying thread)."""
        try:
            size = os.path.getsize(dl.path)
        except FileNotFoundError:
            size = 0  # (a store that wrote nothing made no file)
        if size != dl.size:
            raise IntegrityError(f"blob {dl.sha} has {size} bytes in the bucket, "
                                 f"the manifest says {dl.size}")
        fd = os.open(dl.path, os.O_RDONLY)
        try:
            dl.hash_arrived(fd, size)
        finally:
            os.close(fd)

    def _seal(self, dl: Download) -> None:
        """The finished download becomes a cached blob, if it is the blob. On the loop: its
        bytes were hashed as they landed, so what is left is a stat, a digest and a rename,
        cheaper than a hop to a thread and back (every blob read from the bucket takes it)."""
        size = os.stat(dl.path).st_size
        if size != dl.size or dl.hashed != size:
            raise IntegrityError(f"blob {dl.sha} has {size} bytes in the bucket, "
                                 f"the manifest says {dl.size}")
        actual = dl.hasher.hexdigest()
        if actual != dl.sha:
            raise IntegrityError(f"blob {dl.sha} from the bucket is corrupt (its content "
                                 f"hashes to {actual}); not used")
        self.place(dl.path, dl.sha)

    async def _fetch(self, dl: Download) -> None:
        """Stream the blob into its partial file, from the bytes readers already have."""
        if dl.size == 0:
            os.close(os.open(dl.path, os.O_WRONLY | os.O_CREAT, 0o644))
            return
        await self.store.download(blob_key(dl.sha), dl.path, dl.available,
                                  _Progress(dl, trio.lowlevel.current_trio_token()))

    def open_fd(self, dl: Download) -> int:
        """A read-only descriptor on a download's file, wherever it is by now (call it
        once bytes have arrived: before, the store may not have made the file yet)."""
        if dl.done:
            return os.open(self.path(dl.sha), os.O_RDONLY)
        try:
            return os.open(dl.path, os.O_RDONLY)
        except FileNotFoundError:
            return os.open(self.path(dl.sha), os.O_RDONLY)  # finished meanwhile

    async def ensure(self, sha: str, size: int) -> Path:
        """The path of a fully cached, verified blob, downloading it if needed."""
        if self.has(sha):
            self.touch(sha)
            return self.path(sha)
        dl = self.start_download(sha, size)
        await dl.finished.wait()
        if dl.error is not None:
            raise dl.error
        return self.path(sha)

    def chunks_of(self, entry: FileEntry) -> Chunks | None:
        """How a file not cached whole is stored: its entry's chunk list, or, for a file
        this machine sent as chunks whose manifest is not written yet, the list it kept."""
        lists = self.chunk_lists
        if entry.chunks is not None or lists is None or entry.size <= MIN_CHUNK or (
                lists.chunk_size is not None and entry.size <= lists.chunk_size):
            return entry.chunks  # (a file of one chunk at most is its own blob: no list)
        return self.chunk_lists.get(entry.sha256)

    def has_content(self, entry: FileEntry) -> bool:
        """Whether all of a file's content is cached: whole, or every one of its chunks
        (a chunked file fetched by --sync reads offline)."""
        if self.has(entry.sha256):
            return True
        chunks = self.chunks_of(entry)
        return chunks is not None and all(self.has(sha) for sha in chunks.shas)

    async def ensure_file(self, entry: FileEntry, ahead: int = 4) -> Path:
        """The path of a file's whole content, cached and verified: a chunked file is put
        together from its verified chunks (`ahead` of them downloading at once) and checked
        against its whole-file hash, then cached like any blob (for a write to it)."""
        chunks = None if self.has(entry.sha256) else self.chunks_of(entry)
        if chunks is None:
            return await self.ensure(entry.sha256, entry.size)
        blobs = FileEntry(entry.sha256, entry.size, 0, 0, chunks).blobs()
        assembling = self.partial_dir / f"{entry.sha256}.{uuid.uuid4().hex}"
        try:
            with open(assembling, "wb") as out:
                for index, (sha, size) in enumerate(blobs):
                    for later, later_size in blobs[index + 1:index + 1 + ahead]:
                        if not self.has(later):
                            self.start_download(later, later_size)
                    self.acquire(sha)
                    try:
                        path = await self.ensure(sha, size)
                        with open(path, "rb") as chunk:
                            await trio.to_thread.run_sync(shutil.copyfileobj, chunk, out)
                    finally:
                        self.release(sha)
            actual = await trio.to_thread.run_sync(hash_file, assembling)
            if actual != entry.sha256:
                raise IntegrityError(f"the chunks of blob {entry.sha256} put together hash "
                                     f"to {actual}; not used")
            self.adopt(assembling, entry.sha256)  # (verified bucket content: no fsync owed)
        finally:
            assembling.unlink(missing_ok=True)
        self.register(entry.sha256, entry.size, pending=False)
        try:
            await self.db.run(self.db.state.add_cached_blob, entry.sha256, entry.size)
        except OSError as exc:
            log.warning("cannot record blob %s in the cache index: %s", entry.sha256, exc)
        return self.path(entry.sha256)
