#!/usr/bin/env python3
"""fusepass: a pyfuse3 passthrough to a local folder, for the benchmark only.

    python scripts/fusepass.py BACKING MOUNTPOINT      (foreground; unmount to stop)

It does what any pyfuse3 filesystem must (one Python round trip per kernel request, through
the same trio loop, with imgrepo's mount options, attribute timeouts and keep_cache) and
nothing else: no hashing, no journal, no fsync, no server. Its figures are the ceiling of a
pyfuse3 filesystem on the machine, next to imgrepo's in the same run.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import trio

TIMEOUT = 300.0  # as imgrepo's ATTR_TIMEOUT


class PassOps(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root_ino = os.lstat(root).st_ino
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: str(root)}
        # Open folders: (path, names sorted once at opendir, as imgrepo lists a handle).
        self.listings: dict[int, tuple[str, list[str]]] = {}
        self.next_dh = 1

    # -- inodes: the backing file's st_ino, the root's mapped to ROOT_INODE ---------------
    def _ino(self, st: os.stat_result) -> int:
        return pyfuse3.ROOT_INODE if st.st_ino == self.root_ino else st.st_ino

    def _path(self, ino: int) -> str:
        path = self.paths.get(ino)
        if path is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return path

    def _entry(self, path: str, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        if st is None:
            try:
                st = os.lstat(path)
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        ino = self._ino(st)
        self.paths[ino] = path
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = TIMEOUT
        e.attr_timeout = TIMEOUT
        e.st_mode, e.st_nlink = st.st_mode, st.st_nlink
        e.st_uid, e.st_gid, e.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        e.st_size, e.st_blksize, e.st_blocks = st.st_size, st.st_blksize, st.st_blocks
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, \
            st.st_ctime_ns
        return e

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    # -- names ------------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self._entry(self._child(parent_inode, name))

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._entry(self._path(inode))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> Any:
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return self._entry(path)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        self._call(os.mkdir, path, stat.S_IMODE(mode))
        return self._entry(path)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._call(os.unlink, self._child(parent_inode, name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._call(os.rmdir, self._child(parent_inode, name))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new,
                                                                        name_new)
        self._call(os.rename, old, new)
        # A directory's children are remembered by path: move them along with it.
        prefix = old + os.sep
        for ino, path in list(self.paths.items()):
            if path == old or path.startswith(prefix):
                self.paths[ino] = new + path[len(old):]
        self._entry(new)

    # -- files ------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        fd = self._call(os.open, self._path(inode), flags & ~os.O_CREAT)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        fd = self._call(os.open, path, flags | os.O_CREAT | os.O_TRUNC, stat.S_IMODE(mode))
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._entry(path)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self._call(os.pread, fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self._call(os.pwrite, fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass  # no durability at all: this is the ceiling, not a filesystem to keep data in

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._call(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh: int) -> None:
        os.close(fh)

    # -- directories ------------------------------------------------------------------------
    async def opendir(self, inode: int, ctx: Any) -> int:
        base = self._path(inode)
        names = sorted(self._call(os.listdir, base))
        dh, self.next_dh = self.next_dh, self.next_dh + 1
        self.listings[dh] = (base, names)
        return dh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        base, names = self.listings[fh]
        for i in range(start_id, len(names)):
            path = os.path.join(base, names[i])
            try:
                entry = self._entry(path)
            except pyfuse3.FUSEError:
                continue  # gone meanwhile
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), entry, i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self.listings.pop(fh, None)

    async def statfs(self, ctx: Any) -> Any:
        sv = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(sv, field))
        return out

    @staticmethod
    def _call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: fusepass.py BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    backing, mountpoint = Path(argv[0]).resolve(), argv[1]
    if not backing.is_dir():
        print(f"fusepass: {backing} is not a folder", file=sys.stderr)
        return 2
    options = set(pyfuse3.default_options)  # as imgrepo mounts
    options |= {"fsname=fusepass", "subtype=fusepass", "noatime"}
    pyfuse3.init(PassOps(backing), mountpoint, options)
    try:
        trio.run(pyfuse3.main, 4, 64)  # imgrepo's min_tasks / max_tasks
    finally:
        pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
