"""Reading a clean file: each handle reads its blob from the cache, or from the download
in progress, waiting only for the byte range asked for. A file stored as chunks is read
chunk by chunk: a chunk is served only once all of it is cached and verified, the next
ones are fetched ahead of the reader, and a damaged one fails only the reads touching it."""

from __future__ import annotations

import errno
import logging
import os
import time

from .announce import Invalidator
from .blobcache import BlobCache
from .errors import FsError, ImgrepoError, IntegrityError, errno_for
from .folder_readahead import FolderReadAhead
from .handles import Handle
from .inodes import ROOT_INO, InodeTable
from .manifest import Chunks, FileEntry

log = logging.getLogger(__name__)

READ_AHEAD = 4  # chunks fetched ahead of a reader, besides the one it waits for
DAMAGED_FOR = 60.0  # seconds a chunk found damaged answers EIO without a new download


class BlobReads:
    def __init__(self, cache: BlobCache, invalidator: Invalidator,
                 inodes: InodeTable | None = None,
                 ahead: FolderReadAhead | None = None) -> None:
        self.cache = cache
        self.invalidator = invalidator
        self.inodes = inodes  # to name a file with a damaged chunk in the log
        self.ahead = ahead  # blobs of a folder's next files, fetched before they are opened
        self._damaged: dict[str, float] = {}  # chunk sha -> when found damaged

    def attach(self, handle: Handle, entry: FileEntry) -> None:
        """Point a handle at the blob of `entry` (cached, or downloading)."""
        self.detach(handle)
        handle.sha, handle.size = entry.sha256, entry.size
        self.cache.acquire(entry.sha256)
        # A guess of the folder read-ahead is the handle's now; one found damaged answers
        # this reader's reads with EIO (no second GET of the same bytes).
        damaged = self.ahead.take(entry.sha256) if self.ahead is not None else None
        if entry.size == 0:
            return
        if damaged is not None:
            handle.download = damaged  # (no descriptor: its bytes are gone)
        elif self.cache.has(entry.sha256):
            self.cache.touch(entry.sha256)
            handle.fd = os.open(self.cache.path(entry.sha256), os.O_RDONLY)
        elif (chunks := self.cache.chunks_of(entry)) is not None:
            handle.chunks = chunks  # fetched as reads ask for them (read_chunks)
        else:
            # (its descriptor is opened by the first read, once bytes are there)
            handle.download = self.cache.start_download(entry.sha256, entry.size)

    def attach_empty(self, handle: Handle, sha: str) -> None:
        """A new file's handle reads the empty blob."""
        handle.sha, handle.size = sha, 0
        self.cache.acquire(sha)

    def detach(self, handle: Handle) -> None:
        if handle.fd is not None:
            os.close(handle.fd)
            handle.fd = None
        if handle.sha is not None:
            self.cache.release(handle.sha)
            handle.sha = None
        handle.download = None
        handle.chunks = None

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        """Bytes of the clean file a handle reads: chunk by chunk, from the download in
        progress, or from the cached blob."""
        if handle.sha is None or handle.size == 0 or offset >= handle.size:
            return b""
        if handle.chunks is not None:
            return await self.read_chunks(handle, offset, size)
        if handle.download is not None:
            await self.wait(handle, offset + size)
        assert handle.fd is not None
        return os.pread(handle.fd, size, offset)

    async def wait(self, handle: Handle, end: int) -> None:
        """Wait until the handle's download has the bytes up to `end`."""
        dl = handle.download
        assert dl is not None
        try:
            await dl.wait_for(end)
            if handle.fd is None:
                handle.fd = self.cache.open_fd(dl)
        except (ImgrepoError, OSError) as exc:
            log.error("read failed: %s", exc)
            if isinstance(exc, IntegrityError):  # drop pages the kernel kept of it
                self.invalidator.inode(handle.node.ino)
            raise FsError(errno_for(exc)) from None
        if dl.done:
            handle.download = None

    # -- chunked files --------------------------------------------------------------------
    async def read_chunks(self, handle: Handle, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a chunked file, each chunk verified whole first."""
        chunks = handle.chunks
        assert chunks is not None
        end = min(offset + size, handle.size)
        if end <= offset:
            return b""
        first, last = offset // chunks.size, (end - 1) // chunks.size
        self._fetch_ahead(chunks, handle.size, last + 1)
        parts = []
        for index in range(first, last + 1):
            start = index * chunks.size
            lo = max(offset, start) - start
            hi = min(end, start + chunks.length(index, handle.size)) - start
            parts.append(await self._chunk_bytes(handle, chunks, index, lo, hi))
        return b"".join(parts)

    def _fetch_ahead(self, chunks: Chunks, file_size: int, index: int) -> None:
        """Start the downloads of the chunks a sequential reader wants next."""
        for i in range(index, min(index + READ_AHEAD, len(chunks.shas))):
            sha = chunks.shas[i]
            if not self.cache.has(sha) and not self._known_damaged(sha):
                self.cache.start_download(sha, chunks.length(i, file_size))

    def _known_damaged(self, sha: str) -> bool:
        found = self._damaged.get(sha)
        if found is not None and time.monotonic() - found >= DAMAGED_FOR:
            del self._damaged[sha]  # perhaps repaired meanwhile: look again
            return False
        return found is not None

    async def _chunk_bytes(self, handle: Handle, chunks: Chunks, index: int,
                           lo: int, hi: int) -> bytes:
        sha = chunks.shas[index]
        if self._known_damaged(sha):
            raise FsError(errno.EIO)
        self.cache.acquire(sha)  # not evicted between its download and our read
        try:
            path = await self.cache.ensure(sha, chunks.length(index, handle.size))
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, hi - lo, lo)
            finally:
                os.close(fd)
        except (ImgrepoError, OSError) as exc:
            start = index * chunks.size
            log.error("%s: cannot read bytes %d-%d (chunk %d, blob %s): %s",
                      self._name(handle), start, start + chunks.length(index, handle.size),
                      index, sha[:12], exc)
            if isinstance(exc, IntegrityError):
                self._damaged[sha] = time.monotonic()
                self.invalidator.inode(handle.node.ino)
            raise FsError(errno_for(exc)) from None
        finally:
            self.cache.release(sha)

    def _name(self, handle: Handle) -> str:
        """The file's path in the mount, as far as the inode table knows it."""
        node, parts = handle.node, []
        for _ in range(256):
            if node.ino == ROOT_INO or self.inodes is None:
                break
            parts.append(node.name.decode("utf-8", "backslashreplace"))
            parent = self.inodes.nodes.get(node.parent)
            if parent is None:
                parts.append("(removed)")
                break
            node = parent
        return "/" + "/".join(reversed(parts)) if parts else f"inode {handle.node.ino}"
