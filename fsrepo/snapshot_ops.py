"""The FUSE side of `.snapshots`: kernel requests on snapshot inodes go to the snapshot tree,
every other request to the live tree; the root's listing leaves `.snapshots` out.

Like ZFS's `.zfs`, `.snapshots` is reached by its path but not listed, so `rsync -a MNT/`,
`find` and `du` do not walk every snapshot. Every change inside it answers EROFS but the
rmdir of a snapshot's own folder, which deletes that snapshot; the live root refuses the
name for anything of its own (EEXIST: it is taken).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import pyfuse3

from .errors import FsError
from .files import FileManager
from .fs import ATTR_TIMEOUT, BLKSIZE, DOTS
from .inodes import ROOT_INO
from .manifest import DirEntry, FileEntry
from .namespace import Namespace
from .readonly import GatedOperations
from .snapshot_views import TOP_INO, SnapNode, SnapshotTree, is_reserved
from .snapshots import RESERVED_NAME

log = logging.getLogger(__name__)

T = TypeVar("T")

TOP_TIMEOUT = 1.0  # the list of snapshots changes without the kernel's knowledge
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _errno(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The snapshot tree's FsError -> FUSEError (the live tree's calls translate their own;
    the tree logged anything unexpected behind its error)."""

    @wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    return wrapper


def _refused(err: int, why: str) -> pyfuse3.FUSEError:
    log.info("refused: %s", why)
    return pyfuse3.FUSEError(err)


class SnapshotOperations(GatedOperations):
    """`GatedOperations` with `.snapshots` in the root."""

    def __init__(self, ns: Namespace, files: FileManager, statfs_path: str,
                 refusal: Callable[[], str | None], tree: SnapshotTree) -> None:
        super().__init__(ns, files, statfs_path, refusal)
        self.tree = tree
        self._snap_dirs: dict[int, tuple[int, list[tuple[bytes, Any]]]] = {}
        self._next_snap_dh = TOP_INO
        self._warned = False  # about a live folder named .snapshots in the root

    def _snap_attrs(self, node: SnapNode) -> pyfuse3.EntryAttributes:
        entry = node.entry
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        timeout = TOP_TIMEOUT if node.ino == TOP_INO or node.parent == TOP_INO \
            else ATTR_TIMEOUT
        a.entry_timeout = a.attr_timeout = timeout
        if node.ino == TOP_INO:
            # Looked up again at every path walk (in memory, no request): after a live
            # folder named .snapshots is renamed away, its new name must not keep pointing
            # at the snapshots however late the kernel's invalidation arrives.
            a.entry_timeout = 0
        a.st_uid, a.st_gid = self.files.uid, self.files.gid
        a.st_blksize = BLKSIZE
        a.st_nlink = 1
        if isinstance(entry, FileEntry):
            a.st_mode, a.st_size = stat.S_IFREG | entry.mode, entry.size
        elif isinstance(entry, DirEntry):
            a.st_mode, a.st_size = stat.S_IFDIR | entry.mode, 0
        else:
            a.st_mode, a.st_size = stat.S_IFLNK | 0o777, len(entry.target)
        a.st_blocks = (a.st_size + 511) // 512
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = entry.mtime_ns
        return a

    # -- lookups and attributes -----------------------------------------------------------
    @_errno
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if is_reserved(parent_inode, name):
            return self._snap_attrs(self.tree.node(TOP_INO))
        if self.tree.owns(parent_inode):
            return self._snap_attrs(await self.tree.lookup(parent_inode, name))
        return await super().lookup(parent_inode, name, ctx)

    def forget(self, inode_list: Any) -> None:
        live = []
        for ino, count in inode_list:
            if self.tree.owns(ino):
                self.tree.forget(ino, count)
            else:
                live.append((ino, count))
        if live:
            super().forget(live)

    @_errno
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        if self.tree.owns(inode):
            return self._snap_attrs(self.tree.node(inode))
        return await super().getattr(inode, ctx)

    @_errno
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        if self.tree.owns(inode):
            return self.tree.readlink(inode)
        return await super().readlink(inode, ctx)

    # -- directories ----------------------------------------------------------------------
    @_errno
    async def opendir(self, inode: int, ctx: Any) -> int:
        if self.tree.owns(inode):
            listing = await self.tree.listing(inode)
            self._next_snap_dh += 1
            self._snap_dirs[self._next_snap_dh] = (inode, listing)
            return self._next_snap_dh
        dh = await super().opendir(inode, ctx)
        if inode == ROOT_INO:  # reachable by its path, never listed
            listing = self._dir_handles[dh]
            shown = [(n, e) for n, e in listing if not is_reserved(ROOT_INO, n)]
            if len(shown) != len(listing) and not self._warned:
                self._warned = True
                log.warning("the root holds a folder named .snapshots (made before snapshots "
                            "existed): hidden by the snapshots; rename it to see it "
                            "(mv MNT/.snapshots MNT/other-name)")
            self._dir_handles[dh] = shown
        return dh

    @_errno
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if not self.tree.owns(fh):
            return await super().readdir(fh, start_id, token)
        ino, listing = self._snap_dirs.get(fh, (0, []))
        parent = self.tree.node(ino)
        for dot in range(start_id, len(DOTS)):  # no lookup counted: as in the live tree
            if not pyfuse3.readdir_reply(token, DOTS[dot], await self.getattr(
                    ino if dot == 0 else parent.parent), dot + 1):
                return None
        first = max(start_id - len(DOTS), 0)
        for index in range(first, len(listing)):
            name, entry = listing[index]
            try:
                node = self.tree.child(parent, name, entry)
            except FsError:
                continue  # refused (a cycle)
            if not pyfuse3.readdir_reply(token, name, self._snap_attrs(node),
                                         index + 1 + len(DOTS)):
                self.tree.forget(node.ino, 0)
                break
            node.lookups += 1
        return None

    @_errno
    async def releasedir(self, fh: int) -> None:
        if self.tree.owns(fh):
            self._snap_dirs.pop(fh, None)
            return
        await super().releasedir(fh)

    # -- changes: EROFS inside, the reserved name in the root -----------------------------
    def _check_name(self, parent: int, name: bytes) -> None:
        if self.tree.owns(parent):
            raise pyfuse3.FUSEError(errno.EROFS)
        if is_reserved(parent, name):
            raise _refused(errno.EEXIST, "the name .snapshots in the root is reserved "
                                         "for the snapshots")

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        if self.tree.owns(inode):
            raise pyfuse3.FUSEError(errno.EROFS)
        return await super().setattr(inode, attr, fields, fh, ctx)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        self._check_name(parent_inode, name)
        return await super().mkdir(parent_inode, name, mode, ctx)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        if self.tree.owns(parent_inode):
            self._refuse()  # a read-only mount deletes no snapshot either
            await _errno(self.tree.delete)(parent_inode, name)
            return
        if is_reserved(parent_inode, name):
            raise pyfuse3.FUSEError(errno.EBUSY)
        await super().rmdir(parent_inode, name, ctx)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        if is_reserved(parent_inode, name):
            raise pyfuse3.FUSEError(errno.EISDIR)
        self._check_name(parent_inode, name)
        await super().unlink(parent_inode, name, ctx)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        self._check_name(parent_inode, name)
        return await super().symlink(parent_inode, name, target, ctx)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if self.tree.owns(parent_inode_old):
            raise pyfuse3.FUSEError(errno.EROFS)
        self._check_name(parent_inode_new, name_new)
        if is_reserved(parent_inode_old, name_old):
            if not await self._live_reserved():
                raise pyfuse3.FUSEError(errno.EROFS)  # the snapshots themselves do not move
            await super().rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                 flags, ctx)
            # The kernel moved the name it knew, the snapshots' inode, to the new name:
            # it must look the new name up again (and find the live folder there).
            self.ns.invalidator.entry(parent_inode_new, name_new)
            return
        await super().rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)

    async def _live_reserved(self) -> bool:
        """Whether the live root holds an entry named .snapshots (made before snapshots
        existed: it may be renamed out of the way)."""
        view, _ = await self.ns.loaded_view(ROOT_INO)
        return RESERVED_NAME in view.entries

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        self._check_name(new_parent_inode, new_name)
        return await super().link(inode, new_parent_inode, new_name, ctx)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        self._check_name(parent_inode, name)
        return await super().mknod(parent_inode, name, mode, rdev, ctx)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        self._check_name(parent_inode, name)
        return await super().create(parent_inode, name, mode, flags, ctx)

    # -- files ----------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if self.tree.owns(inode):
            if flags & _WRITE_FLAGS:
                raise pyfuse3.FUSEError(errno.EROFS)
            try:
                fh = self.tree.open(inode, False)
            except FsError as exc:
                raise pyfuse3.FUSEError(exc.errno) from None
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        return await super().open(inode, flags, ctx)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.tree.owns(fh):
            return await _errno(self.tree.read)(fh, off, size)
        return await super().read(fh, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.tree.owns(fh):
            raise pyfuse3.FUSEError(errno.EROFS)
        return await super().write(fh, off, buf)

    async def flush(self, fh: int) -> None:
        if not self.tree.owns(fh):
            await super().flush(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.tree.owns(fh):
            await super().fsync(fh, datasync)

    async def release(self, fh: int) -> None:
        if self.tree.owns(fh):
            self.tree.release(fh)
            return
        await super().release(fh)

