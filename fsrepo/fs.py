"""The FUSE binding: translates kernel requests into calls on the filesystem core.

Nothing here decides anything about the repository; it converts between pyfuse3's types
and ours, and maps our errors onto errno values.
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
import trio

from .announce import Invalidator
from .errors import FsError, errno_for
from .files import AttrChange, FileManager
from .inodes import Node
from .listed_attrs import ListedAttrs
from .manifest import DirEntry, Entry, FileEntry
from .namespace import Namespace

log = logging.getLogger(__name__)
DOTS = (b".", b"..")  # the first two entries of every listing, as on any Linux filesystem

T = TypeVar("T")
ATTR_TIMEOUT = 300.0  # remote changes are invalidated explicitly; local ones go through us
BLKSIZE = 1 << 20


def _translate(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Our FsError -> FUSEError (the core logged any failure behind it); any other failure
    is logged here, once, and answered with `errno_for`'s errno."""

    @wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.error("%s failed: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno_for(exc)) from None
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno_for(exc)) from None

    return wrapper


class KernelInvalidator(Invalidator):
    """Tells the kernel about remote changes. invalidate_inode may block, so it runs in a
    thread; invalidate_entry_async queues the notification (FACTS.md)."""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None

    def entry(self, parent_ino: int, name: bytes) -> None:
        try:
            pyfuse3.invalidate_entry_async(parent_ino, name, ignore_enoent=True)
        except Exception as exc:  # the kernel may already have forgotten it
            log.debug("invalidate_entry failed: %s", exc)

    def inode(self, ino: int) -> None:
        if self.nursery is not None:
            self.nursery.start_soon(self._inode, ino)

    async def _inode(self, ino: int) -> None:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except OSError:
            pass


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, ns: Namespace, files: FileManager, statfs_path: str) -> None:
        super().__init__()
        self.ns = ns
        self.files = files
        self.statfs_path = statfs_path
        self._dir_handles: dict[int, list[tuple[bytes, Entry]]] = {}
        self._dir_owner: dict[int, int] = {}
        self._next_dh = 1
        self._listed = ListedAttrs()  # readdirplus's attributes of the folders listed last
        ns.on_idle_release.append(self._listed.clear)

    # -- attributes -----------------------------------------------------------------------
    def _attrs(self, node: Node, entry: Entry) -> pyfuse3.EntryAttributes:
        return self._fill(node, self.files.overlay(node, entry))

    def _fill(self, node: Node, entry: Entry) -> pyfuse3.EntryAttributes:
        """The attributes of the entry as shown (`overlay` applied)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_uid, a.st_gid = self.files.uid, self.files.gid
        a.st_blksize = BLKSIZE
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = entry.mtime_ns
        a.st_nlink = 0 if node.parent == 0 else 1  # 0: unlinked, still open
        if isinstance(entry, FileEntry):
            a.st_mode = stat.S_IFREG | entry.mode
            a.st_size = entry.size
        elif isinstance(entry, DirEntry):
            a.st_mode = stat.S_IFDIR | entry.mode
            a.st_size = 0
            shown = self.ns.dir_stat(entry)
            if shown is None:  # its own listing is not read yet: the kernel asks again
                a.attr_timeout = 0
            else:
                a.st_nlink = shown.nlink if node.parent else 0
                a.st_mtime_ns, a.st_ctime_ns = shown.mtime_ns, shown.ctime_ns
        else:
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_size = len(entry.target)
        a.st_blocks = (a.st_size + 511) // 512
        return a

    # -- lookups --------------------------------------------------------------------------
    @_translate
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        node, entry = await self.ns.lookup(parent_inode, name)
        return self._attrs(node, entry)

    def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            self.ns.forget(ino, count)
            if self.ns.inodes.get(ino) is None:
                self._listed.drop(ino)

    @_translate
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        node, entry = await self.files.stat(inode)
        return self._attrs(node, entry)

    @_translate
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        change = AttrChange(
            mode=attr.st_mode if fields.update_mode else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            size=attr.st_size if fields.update_size else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None)
        node, entry = await self.files.setattr(inode, change, fh)
        return self._attrs(node, entry)

    @_translate
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.files.readlink(inode)

    # -- directories ----------------------------------------------------------------------
    @_translate
    async def opendir(self, inode: int, ctx: Any) -> int:
        listing = await self.ns.open_listing(inode)
        dh = self._next_dh
        self._next_dh += 1
        self._dir_handles[dh] = listing
        self._dir_owner[dh] = inode
        return dh

    @_translate
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self._dir_handles.get(fh, [])
        parent = self._parent_of_listing(fh)
        lookup, attrs, reply = self.ns.lookup_loaded, self._attrs, pyfuse3.readdir_reply
        # "." and ".." first (offsets 0 and 1). The kernel links no dentry and counts no
        # lookup for them (fuse_direntplus_link), so none is counted here either.
        for dot in range(start_id, len(DOTS)):
            node = self.ns.inodes.get(parent)
            ino = parent if dot == 0 or node is None or not node.parent else node.parent
            dot_node, dot_entry = await self.files.stat(ino)
            if not reply(token, DOTS[dot], attrs(dot_node, dot_entry), dot + 1):
                return
        first = max(start_id - len(DOTS), 0)
        if first >= len(listing):
            return
        view, ancestors = await self.ns.loaded_view(parent)
        looked_up, overlay, fill = self.ns.looked_up, self.files.overlay, self._fill
        listed = self._listed
        kept, keep = listed.folder(parent), listed.put
        entries, of_name = view.entries, self.ns.inodes.of_name
        for index in range(first, len(listing)):
            name = listing[index][0]
            item = kept.get(name)
            if item is not None:  # listed before: still the same entry on the same inode?
                node = of_name(parent, name)
                entry = item[0]
                if node is not None and node.ino == item[1] and entries.get(name) is entry \
                        and overlay(node, entry) is entry:
                    if not reply(token, name, item[2], index + 1 + len(DOTS)):
                        self.ns.inodes.drop_if_unused(node)
                        break
                    looked_up(node)
                    continue
            try:
                node, entry = lookup(parent, view, name, ancestors)
            except FsError:
                continue  # gone meanwhile, or refused (cycle)
            shown = overlay(node, entry)
            if shown is not entry or isinstance(entry, DirEntry):
                a = fill(node, shown)  # open for writing, or a folder: its stat changes
            else:
                a = fill(node, entry)
                keep(parent, kept, name, entry, node.ino, a)
            if not reply(token, name, a, index + 1 + len(DOTS)):
                self.ns.inodes.drop_if_unused(node)  # the kernel did not take it
                break
            looked_up(node)  # readdirplus: each entry the kernel took counts as a lookup

    def _parent_of_listing(self, fh: int) -> int:
        return self._dir_owner[fh]

    @_translate
    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)
        owner = self._dir_owner.pop(fh, None)
        if owner is not None:
            self.ns.close_listing(owner)

    @_translate
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        node, entry = await self.ns.mkdir(parent_inode, name, mode)
        return self._attrs(node, entry)

    @_translate
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.ns.remove(parent_inode, name, is_dir=True)

    @_translate
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.ns.remove(parent_inode, name, is_dir=False)

    @_translate
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        node, entry = await self.ns.symlink(parent_inode, name, target)
        return self._attrs(node, entry)

    @_translate
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        await self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                             noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))

    @_translate
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise FsError(errno.EPERM)  # hard links are not supported (SEMANTICS.md)

    @_translate
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        node, entry = await self.files.mknod(parent_inode, name, mode)
        return self._attrs(node, entry)

    # -- files ----------------------------------------------------------------------------
    @_translate
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        node = self.ns.node(inode)
        handle = await self.files.open(node, flags)
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=True)

    @_translate
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        handle, node = await self.files.create(parent_inode, name, mode)
        return (pyfuse3.FileInfo(fh=handle.fh, keep_cache=True),
                self._attrs(*self.files.current(node.ino)))

    @_translate
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.files.read(fh, off, size)

    @_translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.files.write(fh, off, buf)

    @_translate
    async def flush(self, fh: int) -> None:
        await self.files.flush(fh)

    @_translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.files.fsync(fh)

    @_translate
    async def release(self, fh: int) -> None:
        await self.files.release(fh)

    @_translate
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.files.fsyncdir()

    @_translate
    async def statfs(self, ctx: Any) -> Any:
        st = os.statvfs(self.statfs_path)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = 1 << 32
        out.f_ffree = 1 << 31
        out.f_favail = 1 << 31
        out.f_namemax = 255
        return out
