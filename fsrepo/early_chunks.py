"""Chunks of a large file sent while it is still being written.

A file written sequentially (a copy, a `dd`, a camera import) has its completed chunks
uploaded in the background, each under its own SHA-256, so that after close() only its
last chunk is left to send. What is sent here is a head start, never a promise: the close
path (blob_upload) still makes sure every chunk of the closed file is in the bucket,
finding these ones already there (trusted as just seen, no request). It takes the chunk
hashes from here when the file's running hash proves they are the closed file's (no second
read), and hashes the rest itself; once a file is closed, no new chunk of it starts here.
A chunk whose bytes were changed after it was sent is simply not referenced (--gc frees
it); one not sent here (too many waiting, an error, a crash) is sent after close.

A chunk is hashed and then sent straight from the staging copy (a byte range of it: no
copy of its own, the bytes still in the page cache). A write behind the sequential run
while that happens changes the copy's running hash; the chunk is then not sent, or, if it
was, deleted again: the bytes that went may not be the ones its name says (the server
also refuses a body that does not match the checksum sent with it).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from .blob_upload import stored_whole
from .chunking import ChunkLists, hash_range
from .errors import ImgrepoError
from .hashing import BURST_GAP, RunningHash, WriterFirst, set_background_priority
from .remote_index import RemoteIndex
from .repository import blob_key
from .store.base import FileRange, Store
from .workers import Workers

log = logging.getLogger(__name__)

EARLY_PARALLEL = 4  # chunks in flight (each streamed from the staging copy: no memory)
TRACKED = 64  # files followed at once (each holds a descriptor; the oldest are let go)
SWEEP_EVERY = 5.0  # seconds between looks for files closed meanwhile
KEPT = 64  # files let go whose chunk hashes are kept for their upload after close


class Written(Protocol):
    """A staging copy being written: its file, and how far it was written in order."""

    path: Path
    fd: int
    size: int
    hashed: int  # bytes written sequentially from the start (a running hash covers them)

    @property
    def hasher(self) -> RunningHash | None: ...


@dataclass
class Followed:
    """A file whose completed chunks are being sent: our own descriptor on its staging
    copy (valid whatever happens to the copy's), how far it was written in order, the
    start of the next chunk to send, and the SHA-256 of each chunk hashed so far."""

    fd: int
    copy: Written
    written: int = 0
    next: int = 0
    busy: int = 0  # chunks of it in flight
    done: bool = False  # written out of order, or let go: nothing more to send
    run: int = 0  # the sequential run (a truncation to 0 starts a new one)
    shas: dict[int, str] = field(default_factory=dict)  # chunk index -> its SHA-256

    def chunks_of(self, sha: str, size: int) -> dict[int, str] | None:
        """The chunks hashed here, if the file they were cut from is the content `sha` of
        `size` bytes. Its running hash proves it: still valid, it covers every byte of the
        file written in order, once, so no hashed chunk was written again after it was
        cut (a write back into it ends the running hash)."""
        hasher = self.copy.hasher
        if not self.shas or hasher is None or self.copy.hashed != size \
                or self.copy.size != size or hasher.hexdigest() != sha:
            return None
        return dict(self.shas)


class EarlyChunks:
    """Sends completed chunks of sequentially written files (`wrote` after each write)."""

    def __init__(self, store: Store, remote: RemoteIndex, chunk_lists: ChunkLists,
                 parallel: int = EARLY_PARALLEL,
                 on_sent: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.remote = remote
        self.chunk_lists = chunk_lists
        self.parallel = parallel
        self.sent = 0  # chunks this process created in the bucket before their file's close
        self.on_sent = on_sent  # told the bytes of each chunk sent
        self._files: OrderedDict[Path, Followed] = OrderedDict()  # by staging copy
        self._closed: OrderedDict[int, Followed] = OrderedDict()  # let go, hashes kept
        self._threads = Workers("imgrepo-early", parallel)
        self._work = trio.Event()
        self.writer_first = WriterFirst()

    def wrote(self, st: Written) -> None:
        """After a write to a staging copy: note how far it is written in order (a random
        write ends its head start: close() cuts the file)."""
        size = self.chunk_lists.chunk_size
        f = self._files.get(st.path)
        self.writer_first.wrote()
        if size is None or st.hasher is None:
            if f is not None:
                self._let_go(st.path, f)
            return
        if f is None:
            if st.hashed < size:
                return
            f = self._files[st.path] = Followed(os.dup(st.fd), st)
            while len(self._files) > TRACKED:
                oldest = next(iter(self._files))
                self._let_go(oldest, self._files[oldest])
        if st.hashed < f.next:  # truncated and written again
            f.next = 0
            f.run += 1
            f.shas.clear()
        f.written = st.hashed
        self._files.move_to_end(st.path)
        if f.written - f.next >= size:
            self._work.set()

    def _let_go(self, path: Path, f: Followed) -> None:
        f.done = True
        del self._files[path]
        if not f.busy:
            os.close(f.fd)
        if f.copy.hasher is not None:  # (written out of order: its hashes are no use)
            self._closed[id(f)] = f
            while len(self._closed) > KEPT:
                self._closed.popitem(last=False)

    def chunks_of(self, sha: str, size: int) -> dict[int, str]:
        """The chunk hashes (by index) of content `sha` of `size` bytes cut here while it
        was written, taken: its upload after close hashes only the chunks left."""
        for kept in (self._closed, self._files):
            for key, f in list(kept.items()):
                found = f.chunks_of(sha, size)
                if found is not None:
                    if kept is self._closed:
                        del self._closed[key]
                    return found
        return {}

    def sweep(self) -> None:
        """Let go of files closed meanwhile (their staging copy is gone: sealed into the
        cache, or dropped), so that no descriptor keeps a dropped copy's space."""
        for path, f in list(self._files.items()):
            if not f.busy and not path.exists():
                self._let_go(path, f)

    def _take(self) -> tuple[Path, Followed, int, int, int, RunningHash | None] | None:
        """The next chunk to send: the oldest followed file's first unsent complete one."""
        size = self.chunk_lists.chunk_size
        if size is None:
            return None
        for path, f in list(self._files.items()):
            if f.written - f.next >= size and not path.exists():
                self._let_go(path, f)  # closed: the upload after close sends the rest
            elif f.written - f.next >= size:
                start, f.next = f.next, f.next + size
                f.busy += 1
                return path, f, start, size, f.run, f.copy.hasher
        return None

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.parallel):
                    nursery.start_soon(self._worker)
        finally:
            for path, f in list(self._files.items()):
                self._let_go(path, f)
            self._threads.close()

    async def _worker(self) -> None:
        while True:
            job = self._take()
            if job is None:
                self.sweep()
                if self._work.is_set():
                    self._work = trio.Event()
                with trio.move_on_after(SWEEP_EVERY):
                    await self._work.wait()
                continue
            path, f, start, size, run, hasher = job
            try:
                chunk = await self._send(f, start, size, run, hasher)
                if chunk is not None and f.run == run:
                    f.shas[start // size] = chunk
            finally:
                f.busy -= 1
                if f.done:  # let go meanwhile (by another worker, or a sweep)
                    if not f.busy:
                        os.close(f.fd)
                elif not path.exists() and f.written - f.next < size:
                    self._let_go(path, f)  # closed (sealed into the cache): all sent

    async def _send(self, f: Followed, start: int, size: int, run: int,
                    hasher: RunningHash | None) -> str | None:
        """Send one chunk; its SHA-256 (None if it could not even be hashed, or its bytes
        were written again meanwhile)."""

        def unchanged() -> bool:
            """No write behind the sequential run since the chunk was taken (its bytes
            are still the ones hashed)."""
            return f.run == run and hasher is not None and f.copy.hasher is hasher

        sha = None
        try:
            await self._writer_first(f)
            sha = await self._threads.run(_in_background, hash_range, f.fd, start, size)
            key = blob_key(sha)
            await self._writer_first(f)
            if not unchanged():
                return None
            async with self.chunk_lists.sending(sha):
                if not self.remote.reuse_or_recheck(sha) and not await stored_whole(
                        self.store, key, size, f"chunk {sha[:12]}"):
                    if not unchanged():
                        return None
                    created = await self.store.put_file(key, FileRange(f.fd, start, size), sha)
                    if not unchanged():
                        if created:
                            await self._take_back(key)
                        return None
                    if created:
                        self.sent += 1
                        if self.on_sent is not None:
                            self.on_sent(size)
                self.remote.seen_in_bucket(sha)
        except (ImgrepoError, OSError) as exc:  # a head start only: close() sends it
            log.debug("early upload of a chunk failed: %s", exc)
        return sha

    async def _writer_first(self, f: Followed) -> None:
        """Hold a chunk back while the writer needs the core (WriterFirst): its hash would
        take the gaps the writer leaves, and its PUT's system calls (and, on a loopback,
        the server's side) run at the writer's priority."""
        while self.writer_first.holds() and not f.done:
            await trio.sleep(BURST_GAP)

    async def _take_back(self, key: str) -> None:
        """Delete a chunk sent while its bytes were written again (what went up may not be
        what its name says); one that cannot be deleted is named loudly (--verify --data
        finds it, --gc frees it once nothing references it)."""
        try:
            await self.store.delete(key)
        except (ImgrepoError, OSError) as exc:
            log.warning("cannot delete %s, sent while its file was written again (its "
                        "content may not match its name): %s", key, exc)


def _in_background(fn: Callable[..., str], *args: object) -> str:
    """Run `fn` in this (dedicated) thread at hashing.BACKGROUND_NICE: the writer, whose
    requests the trio thread answers, gets a shared core first; nothing waits for these
    threads (the upload after close hashes what they have not reached)."""
    set_background_priority()  # (where it cannot, at the writer's priority)
    return fn(*args)
