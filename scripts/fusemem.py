#!/usr/bin/env python3
"""fusemem: a pyfuse3 filesystem with nothing behind it (files are bytearrays in memory,
fsync returns at once), for measuring the floor of a pyfuse3 filesystem on this machine.

    python -m scripts.fusemem [--writeback-cache] MOUNTPOINT    (foreground; unmount to stop)

It runs with imgrepo's mount options, attribute timeouts, keep_cache and trio task limits,
as scripts/fusepass.py does, but without a single system call per request: what a workload
costs on it is what the kernel, libfuse and pyfuse3 cost, and no filesystem can go below it
through this binding. One folder level is enough for the benchmark's database (W8).
`--writeback-cache` asks the kernel to cache writes (FUSE_CAP_WRITEBACK_CACHE, pyfuse3's
`enable_writeback_cache`): what a database's commit would cost with it.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

TIMEOUT = 300.0  # as imgrepo's ATTR_TIMEOUT


@dataclass
class MemNode:
    """One file or folder: its mode, times and (a file's) bytes or (a folder's) names."""
    ino: int
    mode: int
    data: bytearray = field(default_factory=bytearray)
    children: dict[bytes, int] = field(default_factory=dict)
    mtime_ns: int = field(default_factory=time.time_ns)


class MemOps(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        root = MemNode(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)
        self.nodes: dict[int, MemNode] = {root.ino: root}
        self.next_ino = root.ino + 1

    def _node(self, ino: int) -> MemNode:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attrs(self, node: MemNode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = 1
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.st_size = len(node.data)
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    def _new(self, parent: int, name: bytes, mode: int) -> MemNode:
        folder = self._node(parent)
        if name in folder.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = MemNode(self.next_ino, mode)
        self.next_ino += 1
        self.nodes[node.ino] = node
        folder.children[name] = node.ino
        return node

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        ino = self._node(parent_inode).children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.nodes[ino])

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(self._node(inode))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> Any:
        node = self._node(inode)
        if fields.update_size:
            del node.data[attr.st_size:]
            node.data.extend(bytes(attr.st_size - len(node.data)))
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        return self._attrs(node)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self._attrs(self._new(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode)))

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        node = self._new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode))
        return pyfuse3.FileInfo(fh=node.ino, keep_cache=True), self._attrs(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        ino = self._node(parent_inode).children.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # Kept while open or looked up (the kernel's forget drops nothing here): a floor.

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        folder = self._node(parent_inode)
        ino = folder.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self.nodes[ino].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del folder.children[name]

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        node = self._node(inode)
        if flags & os.O_TRUNC:
            node.data.clear()
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.nodes[fh].data[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        data = self.nodes[fh].data
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off:off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass  # nothing behind it: the floor of a request, not a place to keep data

    async def release(self, fh: int) -> None:
        pass

    async def opendir(self, inode: int, ctx: Any) -> int:
        self._node(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        names = list(self.nodes[fh].children.items())
        for i in range(start_id, len(names)):
            name, ino = names[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(self.nodes[ino]), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: Any) -> Any:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = out.f_bfree = out.f_bavail = 1 << 20
        out.f_files = out.f_ffree = out.f_favail = 1 << 20
        out.f_namemax = 255
        return out


def main(argv: list[str]) -> int:
    writeback = argv[:1] == ["--writeback-cache"]
    argv = argv[1:] if writeback else argv
    if len(argv) != 1:
        print("usage: fusemem.py [--writeback-cache] MOUNTPOINT", file=sys.stderr)
        return 2
    options = set(pyfuse3.default_options)  # as imgrepo mounts
    options |= {"fsname=fusemem", "subtype=fusemem", "noatime"}
    ops = MemOps()
    ops.enable_writeback_cache = writeback
    pyfuse3.init(ops, argv[0], options)
    try:
        trio.run(pyfuse3.main, 4, 64)  # imgrepo's min_tasks / max_tasks
    finally:
        pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
