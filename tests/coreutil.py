"""Driving the filesystem core without FUSE, through the same calls the FUSE layer makes.

    async with running_engine(target, cache_root, upload=True) as eng:
        await write_file(eng, "photos/a.jpg", b"...")      # FileManager.create/write/flush/release
        await eng.uploader.wait_idle()
        names = await list_dir(eng, "photos")
        data = await read_file(eng, "photos/a.jpg")

Used in-process by tests/test_core.py and in separate processes by tests/core_worker.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from fsrepo.config import Settings
from fsrepo.engine import Engine, StateLock
from fsrepo.errors import FsError
from fsrepo.inodes import ROOT_INO, Node
from fsrepo.manifest import DirEntry, Entry
from fsrepo.store import open_store

CHUNK = 128 * 1024  # the kernel's usual write size for cached writes


def settings_for(storage_url: str, endpoint_url: str | None, cache_root: Path,
                 **extra: object) -> Settings:
    return Settings(storage=storage_url, endpoint_url=endpoint_url, cache_root=cache_root,
                    **extra)  # type: ignore[arg-type]


@asynccontextmanager
async def running_engine(storage_url: str, endpoint_url: str | None, cache_root: Path, *,
                         upload: bool = True, host: str | None = None,
                         **extra: object) -> AsyncIterator[Engine]:
    """An opened engine with its background tasks (downloads; the uploader if `upload`)."""
    settings = settings_for(storage_url, endpoint_url, cache_root, **extra)
    lock = StateLock(settings.state_dir())
    store = open_store(settings.storage, settings.endpoint_url, settings.region)
    engine = Engine(settings, store, host=host)
    try:
        await engine.open()
        async with trio.open_nursery() as nursery:
            engine.cache.nursery = nursery
            if upload:
                nursery.start_soon(engine.uploader.run)
            if hasattr(engine.journal, "write_behind"):  # as the mount runs it
                nursery.start_soon(engine.journal.write_behind)
            engine.nursery = nursery  # type: ignore[attr-defined]
            yield engine
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
        engine.close()
        lock.release()


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
