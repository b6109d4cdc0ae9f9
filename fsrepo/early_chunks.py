"""Chunks of a large file sent while it is still being written.

A file written sequentially (a copy, a `dd`, a camera import) has its completed chunks
uploaded in the background, each under its own SHA-256, so that after close() only its
last chunk is left to send. What is sent here is a head start, never a promise: the close
path (blob_upload) still cuts the closed file and makes sure every chunk is in the bucket,
finding these ones already there (trusted as just seen, no request). A chunk whose bytes
were changed after it was sent is simply not referenced (--gc frees it); one not sent here
(too many waiting, an error, a crash) is sent after close.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import trio

from .chunking import ChunkLists
from .errors import ImgrepoError
from .hashing import hash_file
from .remote_index import RemoteIndex
from .repository import blob_key
from .store.base import Store

log = logging.getLogger(__name__)

EARLY_PARALLEL = 4  # chunks in flight (and at most as many waiting)
TRACKED = 4096  # staging copies remembered (the oldest are forgotten: no early chunks)


class Written(Protocol):
    """A staging copy being written: its file, and how far it was written in order."""

    path: Path
    fd: int
    hashed: int  # bytes written sequentially from the start (a running hash covers them)

    @property
    def hasher(self) -> object | None: ...


class EarlyChunks:
    """Sends completed chunks of sequentially written files (`wrote` after each write)."""

    def __init__(self, store: Store, remote: RemoteIndex, chunk_lists: ChunkLists,
                 partial_dir: Path, parallel: int = EARLY_PARALLEL) -> None:
        self.store = store
        self.remote = remote
        self.chunk_lists = chunk_lists
        self.partial_dir = partial_dir
        self.parallel = parallel
        self.sent = 0  # chunks this process created in the bucket before their file's close
        self._next: OrderedDict[Path, int] = OrderedDict()  # staging copy -> next chunk start
        self._queue, self._jobs = trio.open_memory_channel[tuple[int, int, int]](parallel)

    def wrote(self, st: Written) -> None:
        """After a write to a staging copy: queue the chunks it completed, if it is being
        written in order (a random write ends the head start: close() cuts the file)."""
        size = self.chunk_lists.chunk_size
        if size is None or st.hasher is None:
            self._next.pop(st.path, None)
            return
        start = self._next.get(st.path, 0)
        if start > st.hashed:  # truncated and written again
            start = 0
        while st.hashed - start >= size:
            fd = os.dup(st.fd)  # the copy may be closed (or renamed into the cache) meanwhile
            try:
                self._queue.send_nowait((fd, start, size))
            except trio.WouldBlock:
                os.close(fd)  # too much waiting already: left to close()
                break
            start += size
        self._next[st.path] = start
        self._next.move_to_end(st.path)
        while len(self._next) > TRACKED:
            self._next.popitem(last=False)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.parallel):
                nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        async for fd, start, size in self._jobs:
            part = self.partial_dir / f"early.{uuid.uuid4().hex}"
            try:
                await trio.to_thread.run_sync(_copy_fd_range, fd, part, start, size)
                sha = await trio.to_thread.run_sync(hash_file, part)
                if not self.remote.reuse_or_recheck(sha) \
                        and await self.store.head(blob_key(sha)) is None:
                    if await self.store.put_file(blob_key(sha), part, sha):
                        self.sent += 1
                self.remote.seen_in_bucket(sha)
            except (ImgrepoError, OSError) as exc:  # a head start only: close() sends it
                log.debug("early upload of a chunk failed: %s", exc)
            finally:
                os.close(fd)
                part.unlink(missing_ok=True)


def _copy_fd_range(fd: int, dest: Path, offset: int, length: int) -> None:
    """Bytes [offset, offset+length) of an open file into a new file (worker thread)."""
    with open(dest, "wb") as out:
        copied = 0
        while copied < length:
            n = os.copy_file_range(fd, out.fileno(), length - copied, offset + copied)
            if n == 0:
                raise OSError(f"a staging copy ended before byte {offset + length}")
            copied += n
