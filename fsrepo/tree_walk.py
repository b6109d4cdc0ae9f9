"""One walk of a folder tree, several folders read at once: every file under a folder, with
its path. The mount's --sync and --duplicates both walk with it (each folder read once, the
progress figures kept where a reporter reads them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .manifest import DirEntry, Entry, FileEntry
from .paths import show_name

ReadDir = Callable[[str], Awaitable[dict[bytes, Entry]]]
PARALLEL = 8  # folders read at once


@dataclass
class WalkCounts:
    """A walk's progress so far (shared by the walks of one request)."""

    folders: int = 0
    files: int = 0


async def files_under(read_dir: ReadDir, dir_id: str, path: str = "/",
                      seen: set[str] | None = None, counts: WalkCounts | None = None,
                      parallel: int = PARALLEL) -> list[tuple[str, FileEntry]]:
    """Every (path, file entry) under the folder, `parallel` folders read at a time; a
    folder id in `seen` is not read again (and is added once read)."""
    seen = set() if seen is None else seen
    counts = WalkCounts() if counts is None else counts
    out: list[tuple[str, FileEntry]] = []
    send, receive = trio.open_memory_channel[tuple[str, str]](float("inf"))
    outstanding = 1
    send.send_nowait((dir_id, path))

    async def reader() -> None:
        nonlocal outstanding
        async for current, where in receive:
            try:
                if current in seen:
                    continue
                seen.add(current)
                entries = await read_dir(current)
                for name, entry in sorted(entries.items()):
                    child = where.rstrip("/") + "/" + show_name(name)
                    if isinstance(entry, FileEntry):
                        out.append((child, entry))
                        counts.files += 1
                    elif isinstance(entry, DirEntry):
                        outstanding += 1
                        send.send_nowait((entry.id, child))
                counts.folders += 1
            finally:
                outstanding -= 1
                if outstanding == 0:
                    send.close()

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, parallel)):
            nursery.start_soon(reader)
    return out
