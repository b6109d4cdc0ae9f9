"""Driving the filesystem core without FUSE, through the same calls the FUSE layer makes.

    async with running_engine(target, cache_root, upload=True) as eng:
        await write_file(eng, "photos/a.jpg", b"...")      # FileManager.create/write/flush/release
        await eng.uploader.wait_idle()
        names = await list_dir(eng, "photos")
        data = await read_file(eng, "photos/a.jpg")

Used in-process by tests/test_core.py and in separate processes by tests/core_worker.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from fsrepo.config import Settings
from fsrepo.engine import Engine, StateLock
from fsrepo.errors import FsError
from fsrepo.files import AttrChange
from fsrepo.group_commit import Disk
from fsrepo.inodes import ROOT_INO, Node
from fsrepo.manifest import DirEntry, Entry, FileEntry
from fsrepo.store import Store, open_store

if TYPE_CHECKING:  # (core_worker.py imports this module as a top-level one)
    from .targets import StorageTarget

CHUNK = 128 * 1024  # the kernel's usual write size for cached writes


def settings_for(storage_url: str, endpoint_url: str | None, cache_root: Path,
                 **extra: object) -> Settings:
    return Settings(storage=storage_url, endpoint_url=endpoint_url, cache_root=cache_root,
                    **extra)  # type: ignore[arg-type]


@asynccontextmanager
async def running_engine(storage_url: str, endpoint_url: str | None, cache_root: Path, *,
                         upload: bool = True, host: str | None = None,
                         wrap_store: Callable[[Store], Store] | None = None,
                         disk: Disk | None = None, **extra: object) -> AsyncIterator[Engine]:
    """An opened engine with its background tasks (downloads; the uploader if `upload`).
    `wrap_store` puts a wrapper (counting, fault injection) between the engine and the
    store; the wrapper's `aclose` closes the store. `disk`: how the group commit syncs
    (tests/powerloss.py records it)."""
    settings = settings_for(storage_url, endpoint_url, cache_root, **extra)
    lock = StateLock(settings.state_dir())
    store = open_store(settings.storage, settings.endpoint_url, settings.region)
    if wrap_store is not None:
        store = wrap_store(store)
    engine = Engine(settings, store, host=host, disk=disk)
    try:
        await engine.open()
        async with trio.open_nursery() as nursery:
            engine.cache.nursery = nursery
            if upload:
                nursery.start_soon(engine.uploader.run)
            if hasattr(engine.journal, "write_behind"):  # as the mount runs it
                nursery.start_soon(engine.journal.write_behind)
            nursery.start_soon(engine.durable.run)  # the group commit, as the mount runs it
            engine.nursery = nursery  # type: ignore[attr-defined]
            yield engine
            await engine.durable.commit()  # as the mount's unmount does (names closed files)
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
        engine.close()
        lock.release()


def engine_on(storage: StorageTarget, cache_root: Path, *, upload: bool = True,
              **options: Any) -> AbstractAsyncContextManager[Engine]:
    """running_engine on a test's storage target (its URL and endpoint)."""
    return running_engine(storage.url, storage.endpoint_url, cache_root, upload=upload,
                          **options)


def start_uploader(engine: Engine) -> None:
    engine.nursery.start_soon(engine.uploader.run)  # type: ignore[attr-defined]


def _parts(path: str | bytes) -> list[bytes]:
    raw = os.fsencode(path) if isinstance(path, str) else path
    return [p for p in raw.split(b"/") if p]


async def resolve(engine: Engine, path: str | bytes) -> tuple[Node, Entry | None]:
    """The node at `path` (lookups are balanced with forget, like the kernel's)."""
    node = engine.ns.node(ROOT_INO)
    entry: Entry | None = None
    for part in _parts(path):
        node, entry = await engine.ns.lookup(node.ino, part, count=False)
    return node, entry


async def makedirs(engine: Engine, path: str | bytes) -> Node:
    node = engine.ns.node(ROOT_INO)
    for part in _parts(path):
        try:
            node, _ = await engine.ns.lookup(node.ino, part, count=False)
        except FsError:
            node, _ = await engine.ns.mkdir(node.ino, part, 0o755)
    return node


async def write_file(engine: Engine, path: str | bytes, data: bytes,
                     parent: Node | None = None) -> None:
    """create + write (in kernel-sized chunks) + flush + release, as FUSE would."""
    parts = _parts(path)
    if parent is None:
        parent = await makedirs(engine, b"/".join(parts[:-1])) if parts[:-1] else \
            engine.ns.node(ROOT_INO)
    handle, _node = await engine.files.create(parent.ino, parts[-1], 0o644)
    try:
        for off in range(0, len(data), CHUNK):
            await engine.files.write(handle.fh, off, data[off:off + CHUNK])
        await engine.files.flush(handle.fh)
    finally:
        await engine.files.release(handle.fh)


async def overwrite_file(engine: Engine, path: str | bytes, data: bytes) -> None:
    """open(O_WRONLY|O_TRUNC) + write + flush + release of an existing file."""
    node, _ = await resolve(engine, path)
    handle = await engine.files.open(node, os.O_WRONLY | os.O_TRUNC)
    try:
        for off in range(0, len(data), CHUNK):
            await engine.files.write(handle.fh, off, data[off:off + CHUNK])
        await engine.files.flush(handle.fh)
    finally:
        await engine.files.release(handle.fh)


async def remove(engine: Engine, path: str | bytes) -> None:
    parts = _parts(path)
    parent, _ = await resolve(engine, b"/".join(parts[:-1]))
    await engine.ns.remove(parent.ino, parts[-1], is_dir=False)


async def read_file(engine: Engine, path: str | bytes) -> bytes:
    """open + read in chunks + release, as FUSE would."""
    node, _ = await resolve(engine, path)
    handle = await engine.files.open(node, os.O_RDONLY)
    out = bytearray()
    try:
        while True:
            chunk = await engine.files.read(handle.fh, len(out), CHUNK)
            if not chunk:
                return bytes(out)
            out += chunk
    finally:
        await engine.files.release(handle.fh)


async def list_dir(engine: Engine, path: str | bytes = b"") -> dict[bytes, Entry]:
    node, _ = await resolve(engine, path)
    return dict(await engine.ns.listing(node.ino))


async def tree(engine: Engine, path: bytes = b"") -> dict[bytes, bytes | None]:
    """Every file under `path` with its content (None for directories)."""
    out: dict[bytes, bytes | None] = {}
    for name, entry in (await list_dir(engine, path)).items():
        full = path + b"/" + name if path else name
        if isinstance(entry, DirEntry):
            out[full] = None
            out.update(await tree(engine, full))
        else:
            out[full] = await read_file(engine, full)
    return out


class EngineDriver:
    """Every filesystem operation the tests make, by path, in one place: the calls the FUSE
    layer makes into the core (fs.py), so that renaming a core method changes this class
    only. Errors are `FsError`s carrying the errno FUSE would return."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def node(self, path: str | bytes) -> tuple[Node, Entry | None]:
        node, entry = await resolve(self.engine, path)
        if entry is None and node.ino != ROOT_INO:
            raise FsError(errno.ENOENT)
        return node, entry

    async def _parent(self, path: str | bytes) -> tuple[Node, bytes]:
        parts = _parts(path)
        parent, entry = await resolve(self.engine, b"/".join(parts[:-1]))
        if entry is not None and not isinstance(entry, DirEntry):
            raise FsError(errno.ENOTDIR)
        return parent, parts[-1]

    async def create(self, path: str | bytes, data: bytes = b"", mode: int = 0o644) -> None:
        """open(O_CREAT|O_EXCL|O_WRONLY) + write + close."""
        parent, name = await self._parent(path)
        handle, _ = await self.engine.files.create(parent.ino, name, mode)
        try:
            for off in range(0, len(data), CHUNK):
                await self.engine.files.write(handle.fh, off, data[off:off + CHUNK])
            await self.engine.files.flush(handle.fh)
        finally:
            await self.engine.files.release(handle.fh)

    async def write_at(self, path: str | bytes, offset: int, data: bytes) -> None:
        """open(O_WRONLY) + pwrite at `offset` + close."""
        node, _ = await self.node(path)
        handle = await self.engine.files.open(node, os.O_WRONLY)
        try:
            await self.engine.files.write(handle.fh, offset, data)
            await self.engine.files.flush(handle.fh)
        finally:
            await self.engine.files.release(handle.fh)

    async def truncate(self, path: str | bytes, size: int) -> None:
        """truncate(path, size): setattr with a size, no open handle."""
        node, entry = await self.node(path)
        if not isinstance(entry, FileEntry):
            raise FsError(errno.EISDIR if isinstance(entry, DirEntry) or entry is None
                          else errno.EINVAL)
        await self.engine.files.truncate(node, size)

    async def read(self, path: str | bytes) -> bytes:
        return await read_file(self.engine, path)

    async def mkdir(self, path: str | bytes, mode: int = 0o755) -> None:
        parent, name = await self._parent(path)
        await self.engine.ns.mkdir(parent.ino, name, mode)

    async def symlink(self, path: str | bytes, target: bytes) -> None:
        parent, name = await self._parent(path)
        await self.engine.ns.symlink(parent.ino, name, target)

    async def unlink(self, path: str | bytes) -> None:
        parent, name = await self._parent(path)
        await self.engine.ns.remove(parent.ino, name, is_dir=False)

    async def rmdir(self, path: str | bytes) -> None:
        parent, name = await self._parent(path)
        await self.engine.ns.remove(parent.ino, name, is_dir=True)

    async def rename(self, old: str | bytes, new: str | bytes) -> None:
        """rename(2), with the checks the kernel's VFS makes before it calls the filesystem:
        a directory cannot move into itself (EINVAL) nor onto one of its ancestors
        (ENOTEMPTY), whatever the types of the names involved."""
        old_parent, old_name = await self._parent(old)
        new_parent, new_name = await self._parent(new)
        await self.node(old)
        old_path, new_path = b"/".join(_parts(old)), b"/".join(_parts(new))
        if new_path.startswith(old_path + b"/"):
            raise FsError(errno.EINVAL)
        if old_path.startswith(new_path + b"/"):
            raise FsError(errno.ENOTEMPTY)
        await self.engine.ns.rename(old_parent.ino, old_name, new_parent.ino, new_name)

    async def setattr(self, path: str | bytes, mode: int | None = None,
                      mtime_ns: int | None = None) -> None:
        """chmod / utimens through the core's one setattr call (what fs.setattr makes)."""
        node, _ = await self.node(path)
        await self.engine.files.setattr(node.ino, AttrChange(mode=mode, mtime_ns=mtime_ns), None)

    async def listdir(self, path: str | bytes = b"") -> dict[bytes, Entry]:
        node, entry = await self.node(path)
        if entry is not None and not isinstance(entry, DirEntry):
            raise FsError(errno.ENOTDIR)
        return dict(await self.engine.ns.listing(node.ino))

    async def drain(self) -> None:
        """Wait until every change is in the bucket (the journal is empty)."""
        await self.engine.uploader.wait_idle()

    async def revalidate(self) -> None:
        """Ask the bucket again about every directory this engine has loaded."""
        for dir_id in list(self.engine.ns.views):
            await self.engine.ns.views.revalidate(dir_id)

    def journal_length(self) -> int:
        return len(self.engine.journal)


class HeldWriter:
    """Stands in for hashing.WriterFirst: holds the background work until told (`hold`),
    and counts the looks."""

    def __init__(self) -> None:
        self.hold = True
        self.looks = 0

    def wrote(self) -> None:
        pass

    def holds(self) -> bool:
        self.looks += 1
        return self.hold
