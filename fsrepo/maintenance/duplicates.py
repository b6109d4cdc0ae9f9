"""`--duplicates`: groups of files with identical content under a folder, found from the
manifests alone (every file entry carries its SHA-256; no file is downloaded).

Runs inside the mount, over the same directory views the mount shows (pending changes
included), reading several folders at once. Deleting a copy is then an ordinary `rm`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from ..manifest import DirEntry, Entry, FileEntry
from ..paths import show_name

ReadDir = Callable[[str], Awaitable[dict[bytes, Entry]]]
PARALLEL = 8  # folders read at once


async def files_under(read_dir: ReadDir, dir_id: str, path: str,
                      on_folder: Callable[[int, int], None] | None = None,
                      parallel: int = PARALLEL) -> list[tuple[str, FileEntry]]:
    """Every (path, file entry) under the folder; each folder read once. `on_folder` hears
    (folders read, files found) after each folder."""
    out: list[tuple[str, FileEntry]] = []
    seen: set[str] = set()
    send, receive = trio.open_memory_channel[tuple[str, str]](float("inf"))
    outstanding = 1
    send.send_nowait((dir_id, path))
    folders = 0

    async def reader() -> None:
        nonlocal outstanding, folders
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
                    elif isinstance(entry, DirEntry):
                        outstanding += 1
                        send.send_nowait((entry.id, child))
                folders += 1
                if on_folder is not None:
                    on_folder(folders, len(out))
            finally:
                outstanding -= 1
                if outstanding == 0:
                    send.close()

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, parallel)):
            nursery.start_soon(reader)
    return out


def duplicate_groups(files: Iterable[tuple[str, FileEntry]]) -> list[dict[str, Any]]:
    """Files grouped by content, groups of two or more only, the most space first: each
    {"sha256", "size", "count", "paths", "space_without_dedup", "saved"}."""
    by_sha: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for path, entry in files:
        by_sha.setdefault(entry.sha256, []).append(path)
        sizes[entry.sha256] = entry.size
    groups = []
    for sha, paths in by_sha.items():
        if len(paths) < 2 or sizes[sha] == 0:
            continue  # empty files are all "identical" and cost nothing
        size = sizes[sha]
        groups.append({"sha256": sha, "size": size, "count": len(paths),
                       "paths": sorted(paths), "space_without_dedup": size * len(paths),
                       "saved": size * (len(paths) - 1)})
    groups.sort(key=lambda g: (-g["saved"], g["paths"][0]))
    return groups
