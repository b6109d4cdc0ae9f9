"""EROFS for every modifying FUSE call while the mount may not change anything.

A `--read-only` mount never writes, and a mount that lost its writer lease (writemode.py)
must stop taking changes it could never upload. Both are decided by one predicate, checked
here in one place in front of the FUSE binding, so the core below needs no flag of its own.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import pyfuse3

from .files import FileManager
from .fs import Operations
from .namespace import Namespace

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


class GatedOperations(Operations):
    """`Operations` that answer EROFS to modifying calls while `refusal()` is not None."""

    def __init__(self, ns: Namespace, files: FileManager, statfs_path: str,
                 refusal: Callable[[], str | None]) -> None:
        super().__init__(ns, files, statfs_path)
        self.refusal = refusal

    def _refuse(self) -> None:
        if self.refusal() is not None:
            raise pyfuse3.FUSEError(errno.EROFS)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        self._refuse()
        return await super().setattr(inode, attr, fields, fh, ctx)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        self._refuse()
        return await super().mkdir(parent_inode, name, mode, ctx)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._refuse()
        await super().rmdir(parent_inode, name, ctx)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._refuse()
        await super().unlink(parent_inode, name, ctx)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        self._refuse()
        return await super().symlink(parent_inode, name, target, ctx)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self._refuse()
        await super().rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        self._refuse()
        return await super().mknod(parent_inode, name, mode, rdev, ctx)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if flags & _WRITE_FLAGS:
            self._refuse()
        return await super().open(inode, flags, ctx)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        self._refuse()
        return await super().create(parent_inode, name, mode, flags, ctx)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._refuse()
        return await super().write(fh, off, buf)
