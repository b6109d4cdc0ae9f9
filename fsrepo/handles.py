"""The table of open file handles: which inode each reads or writes, and which blob a
clean file's handle reads from."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

from .blobcache import Download
from .errors import FsError
from .inodes import Node
from .manifest import Chunks


@dataclass
class Handle:
    fh: int
    node: Node
    writable: bool
    sha: str | None = None  # the blob this handle reads when the file is clean
    size: int = 0
    fd: int | None = None
    download: Download | None = None
    chunks: Chunks | None = None  # a chunked file read chunk by chunk (reads.read_chunks)


class HandleTable:
    def __init__(self) -> None:
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1

    def open(self, node: Node, writable: bool) -> Handle:
        fh = self._next_fh
        self._next_fh += 1
        handle = Handle(fh, node, writable)
        self._handles[fh] = handle
        node.opens += 1
        return handle

    def get(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    def find(self, fh: int | None) -> Handle | None:
        return None if fh is None else self._handles.get(fh)

    def pop(self, fh: int) -> Handle | None:
        return self._handles.pop(fh, None)

    def of(self, node: Node) -> Iterator[Handle]:
        return (h for h in self._handles.values() if h.node is node)

    def is_open(self, node: Node) -> bool:
        return any(h.node is node for h in self._handles.values())

    def writers(self, node: Node) -> int:
        return sum(1 for h in self._handles.values() if h.node is node and h.writable)

    def is_writing(self, ino: int) -> bool:
        return any(h.writable and h.node.ino == ino for h in self._handles.values())

    def reading(self, node: Node) -> Handle | None:
        """A handle still reading a blob of the node (for a file unlinked while open)."""
        return next((h for h in self._handles.values() if h.node is node and h.sha), None)
