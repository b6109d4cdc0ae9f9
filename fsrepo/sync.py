"""Prefetch: bring every file (or those under some paths) into the local cache.

Runs inside the mount process (the one owner of the cache), driven over the control
channel. Already cached blobs are skipped, so an interrupted sync simply continues when run
again. When the files do not fit the cache limit, it says so first and stops at the limit
instead of evicting what it just fetched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .blobcache import BlobCache
from .errors import ImgrepoError
from .manifest import ROOT_ID, DirEntry, FileEntry
from .namespace import FsError, Namespace

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]


class Syncer:
    def __init__(self, ns: Namespace, cache: BlobCache) -> None:
        self.ns = ns
        self.cache = cache

    async def walk(self, dir_id: str, seen: set[str] | None = None) -> list[FileEntry]:
        """Every file entry under a directory (each directory read once)."""
        seen = set() if seen is None else seen
        out: list[FileEntry] = []
        stack = [dir_id]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            try:
                view = await self.ns.view(current)
            except FsError as exc:
                log.warning("sync: skipping unreadable directory %s: %s", current, exc)
                continue
            for entry in view.entries.values():
                if isinstance(entry, FileEntry):
                    out.append(entry)
                elif isinstance(entry, DirEntry):
                    stack.append(entry.id)
        return out

    async def resolve(self, relpath: str) -> str:
        """Directory id of a path relative to the mountpoint."""
        dir_id = ROOT_ID
        for part in [p for p in relpath.split("/") if p and p != "."]:
            view = await self.ns.view(dir_id)
            entry = view.entries.get(part.encode("utf-8", "surrogateescape"))
            if not isinstance(entry, DirEntry):
                raise ImgrepoError(f"{relpath} is not a directory in the repository")
            dir_id = entry.id
        return dir_id

    async def repository_totals(self) -> dict[str, int]:
        files = await self.walk(ROOT_ID)
        blobs = {f.sha256: f.size for f in files}
        return {"repository_files": len(files),
                "repository_bytes": sum(f.size for f in files),
                "repository_unique_bytes": sum(blobs.values())}

    async def run(self, paths: list[str], send: Send, parallel: int = 8) -> dict[str, Any]:
        roots = [await self.resolve(p) for p in paths] or [ROOT_ID]
        seen: set[str] = set()
        files: list[FileEntry] = []
        for root in roots:
            files.extend(await self.walk(root, seen))
        wanted: dict[str, int] = {}
        for f in files:
            if not self.cache.has(f.sha256):
                wanted[f.sha256] = f.size
        total_bytes = sum(wanted.values())
        room = self.cache.limit - self.cache.used
        fits = total_bytes <= room
        await send({"phase": "start", "files": len(files), "to_fetch": len(wanted),
                    "bytes": total_bytes, "cache_room": room, "fits": fits})
        done_files = done_bytes = failed = 0
        stopped_at_limit = False
        started = time.monotonic()
        last_report = 0.0
        limiter = trio.Semaphore(parallel)
        queue = sorted(wanted.items())

        async def fetch(sha: str, size: int) -> None:
            nonlocal done_files, done_bytes, failed
            try:
                await self.cache.ensure(sha, size)
                done_files += 1
                done_bytes += size
            except (ImgrepoError, OSError) as exc:
                failed += 1
                log.error("sync: %s", exc)
            finally:
                limiter.release()

        async with trio.open_nursery() as nursery:
            for sha, size in queue:
                await limiter.acquire()
                if self.cache.used + size > self.cache.limit:
                    limiter.release()
                    stopped_at_limit = True
                    break
                nursery.start_soon(fetch, sha, size)
                now = time.monotonic()
                if now - last_report > 0.5:
                    last_report = now
                    await send({"phase": "progress", "done_files": done_files,
                                "done_bytes": done_bytes, "to_fetch": len(wanted),
                                "bytes": total_bytes, "elapsed": now - started})
        return {"phase": "end", "done_files": done_files, "done_bytes": done_bytes,
                "to_fetch": len(wanted), "bytes": total_bytes, "failed": failed,
                "stopped_at_limit": stopped_at_limit,
                "elapsed": time.monotonic() - started}
