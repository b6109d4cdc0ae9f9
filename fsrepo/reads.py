"""Reading a clean file: each handle reads its blob from the cache, or from the download
in progress, waiting only for the byte range asked for."""

from __future__ import annotations

import logging
import os

from .announce import Invalidator
from .blobcache import BlobCache
from .errors import FsError, ImgrepoError, IntegrityError, errno_for
from .handles import Handle
from .manifest import FileEntry

log = logging.getLogger(__name__)


class BlobReads:
    def __init__(self, cache: BlobCache, invalidator: Invalidator) -> None:
        self.cache = cache
        self.invalidator = invalidator

    def attach(self, handle: Handle, entry: FileEntry) -> None:
        """Point a handle at the blob of `entry` (cached, or downloading)."""
        self.detach(handle)
        handle.sha, handle.size = entry.sha256, entry.size
        self.cache.acquire(entry.sha256)
        if entry.size == 0:
            return
        if self.cache.has(entry.sha256):
            self.cache.touch(entry.sha256)
            handle.fd = os.open(self.cache.path(entry.sha256), os.O_RDONLY)
        else:
            dl = self.cache.start_download(entry.sha256, entry.size)
            handle.download = dl
            handle.fd = self.cache.open_fd(dl)

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

    async def wait(self, handle: Handle, end: int) -> None:
        """Wait until the handle's download has the bytes up to `end`."""
        dl = handle.download
        assert dl is not None
        try:
            await dl.wait_for(end)
        except (ImgrepoError, OSError) as exc:
            log.error("read failed: %s", exc)
            if isinstance(exc, IntegrityError):  # drop pages the kernel kept of it
                self.invalidator.inode(handle.node.ino)
            raise FsError(errno_for(exc)) from None
        if dl.done:
            handle.download = None
