"""Prefetch: bring every file (or those under some paths) into the local cache.

Runs inside the mount process (the one owner of the cache), driven over the control
channel; when the client goes away (Ctrl-C), the sync stops starting downloads (those in
flight finish and are kept). Already cached blobs are skipped, and a blob being downloaded
for a reader is joined, not fetched again, so an interrupted sync simply continues when run
again and nothing is downloaded twice. When the files do not fit the cache limit, it says so
first and stops at the limit instead of evicting what it just fetched. When the storage
becomes unreachable, it stops at once and says so.

The walk reads several directories at once (one round trip each on S3). A sync of the
whole repository also leaves the repository's totals behind (files, bytes, stored bytes,
and when): `--status` shows those instead of walking the tree itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .blobcache import BlobCache
from .errors import FsError, ImgrepoError, StorageError, StorageOffline
from .manifest import ROOT_ID, DirEntry, Entry, FileEntry
from .namespace import Namespace
from .paths import entry_path
from .tree_walk import WalkCounts, files_under

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]
TOTALS_KEY = "repository_totals"  # meta key of the last full walk's totals
WALK_PARALLEL = 8  # directories read at once by a walk


async def report_walk(send: Send, counts: WalkCounts, started: float) -> None:
    """A walk's progress to the client twice a second, until cancelled (or it goes away)."""
    while True:
        try:
            await send({"phase": "walk", "folders": counts.folders,
                        "files_found": counts.files, "elapsed": time.monotonic() - started})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away; the control channel cancels us
        await trio.sleep(0.5)


class Syncer:
    def __init__(self, ns: Namespace, cache: BlobCache) -> None:
        self.ns = ns
        self.cache = cache
        self.running = 0  # syncs in progress (status)
        self._totals: dict[str, Any] | None = None  # the last full walk's, once read

    def _online(self) -> bool:
        return self.cache.store.online

    async def walk(self, dir_id: str, path: str = "/", seen: set[str] | None = None,
                   fresh: bool = False, counts: WalkCounts | None = None,
                   parallel: int = WALK_PARALLEL) -> list[tuple[str, FileEntry]]:
        """Every (path, file entry) under a directory (tree_walk.files_under: each directory
        read once, `parallel` at a time). With `fresh`, directories marked stale (another
        machine changed them, as the change records say) are revalidated first, so a sync
        sees what the bucket holds now without a request per unchanged directory."""
        return await files_under(lambda d: self._read(d, fresh), dir_id, path, seen,
                                 counts, parallel)

    async def _read(self, dir_id: str, fresh: bool) -> dict[bytes, Entry]:
        """One directory's entries for a walk (none if it cannot be read)."""
        try:
            view = await self.ns.views.load(dir_id)
            if fresh and self.ns.views.stale(view):
                try:
                    await self.ns.views.revalidate(dir_id)
                except StorageError as exc:
                    log.warning("using the cached listing of %s: %s",
                                entry_path(self.ns.inodes, dir_id), exc)
                view = self.ns.views.get(dir_id) or view
        except FsError as exc:
            log.warning("skipping unreadable folder %s: %s",
                        entry_path(self.ns.inodes, dir_id), exc)
            return {}
        return dict(view.entries)

    async def resolve(self, relpath: str) -> str | FileEntry:
        """A path relative to the mountpoint: its directory id, or its file entry."""
        dir_id = ROOT_ID
        parts = [p for p in relpath.split("/") if p and p != "."]
        for i, part in enumerate(parts):
            try:
                view = await self.ns.views.load(dir_id)
            except FsError as exc:
                raise ImgrepoError(f"cannot read {relpath}: {exc}") from None
            entry = view.entries.get(part.encode("utf-8", "surrogateescape"))
            if isinstance(entry, FileEntry) and i == len(parts) - 1:
                return entry
            if not isinstance(entry, DirEntry):
                raise ImgrepoError(f"{relpath} is not a file or directory in the repository")
            dir_id = entry.id
        return dir_id

    async def last_totals(self) -> dict[str, Any]:
        """The repository's totals as the last full walk (`--sync` of everything) found
        them, with its time; {} before the first. No walk, no request."""
        if self._totals is None:
            raw = await self.ns.db.run(self.ns.db.state.get_meta, TOTALS_KEY)
            self._totals = json.loads(raw) if raw else {}
        return dict(self._totals)

    async def _note_totals(self, files: list[FileEntry]) -> None:
        blobs = {f.sha256: f.size for f in files}
        local_only = {sha: size for sha, size in blobs.items() if sha in self.cache.pending}
        self._totals = {"repository_files": len(files),
                        "repository_bytes": sum(f.size for f in files),
                        # in the bucket: what is only in this machine's queue is not stored
                        "repository_unique_bytes": sum(blobs.values()) - sum(local_only.values()),
                        "repository_local_only_bytes": sum(local_only.values()),
                        "repository_counted_at": time.time()}
        await self.ns.db.run(self.ns.db.state.set_meta, TOTALS_KEY, json.dumps(self._totals))

    async def run(self, paths: list[str], send: Send, parallel: int = 8) -> dict[str, Any]:
        if not self._online():
            raise ImgrepoError(f"{self.cache.store.offline_error()}; --sync needs it: run it "
                               "again when the storage is back")
        self.running += 1
        try:
            return await self._run(paths, send, max(1, parallel))
        finally:
            self.running -= 1

    async def _run(self, paths: list[str], send: Send, parallel: int) -> dict[str, Any]:
        started = time.monotonic()  # the whole run counts, the walk included
        roots = [await self.resolve(p) for p in paths] or [ROOT_ID]
        seen: set[str] = set()
        files: list[FileEntry] = []
        counts = WalkCounts()
        async with trio.open_nursery() as walking:
            walking.start_soon(report_walk, send, counts, started)
            for root in roots:
                if isinstance(root, FileEntry):
                    files.append(root)
                    counts.files += 1
                else:
                    found = await self.walk(root, seen=seen, fresh=True, counts=counts)
                    files.extend(entry for _, entry in found)
            walking.cancel_scope.cancel()
        if not paths:
            await self._note_totals(files)
        wanted: dict[str, int] = {}
        for f in files:
            if not self.cache.has(f.sha256):  # else its whole content is cached
                for sha, size in f.blobs():  # a chunked file: each chunk, verified alone
                    if not self.cache.has(sha):
                        wanted[sha] = size
        total_bytes = sum(wanted.values())
        room = max(0, self.cache.limit - self.cache.used)
        fits = total_bytes <= room
        await send({"phase": "start", "files": len(files), "to_fetch": len(wanted),
                    "bytes": total_bytes, "cache_room": room, "fits": fits,
                    "folders": counts.folders, "elapsed": time.monotonic() - started})
        done_files = done_bytes = failed = reserved = 0
        in_flight = 0
        stopped_at_limit = offline = False
        fetch_started = time.monotonic()
        limiter = trio.Semaphore(parallel)

        def progress() -> dict[str, Any]:
            return {"phase": "progress", "done_files": done_files, "done_bytes": done_bytes,
                    "to_fetch": len(wanted), "bytes": total_bytes, "in_flight": in_flight,
                    "failed": failed, "elapsed": time.monotonic() - started,
                    "fetch_elapsed": time.monotonic() - fetch_started}

        async def report() -> None:
            while True:
                await trio.sleep(0.5)
                try:
                    await send(progress())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the client went away; the control channel cancels us

        async def fetch(sha: str, size: int) -> None:
            nonlocal done_files, done_bytes, failed, reserved, in_flight, offline
            try:
                await self.cache.ensure(sha, size)  # joins a download already running
                done_files += 1
                done_bytes += size
            except StorageOffline:
                offline = True
            except (ImgrepoError, OSError) as exc:
                if not self._online():
                    offline = True
                else:
                    failed += 1
                    log.error("sync: %s", exc)
            finally:
                reserved -= size
                in_flight -= 1
                limiter.release()

        async with trio.open_nursery() as outer:
            outer.start_soon(report)
            async with trio.open_nursery() as nursery:
                for sha, size in wanted.items():
                    await limiter.acquire()
                    if offline or not self._online():
                        offline = True
                        limiter.release()
                        break
                    if self.cache.has(sha):  # fetched meanwhile (a reader opened it)
                        limiter.release()
                        done_files += 1
                        done_bytes += size
                        continue
                    # Downloads in flight count against the limit too: the sync never
                    # pushes the cache over it (which would evict what it just fetched).
                    if self.cache.used + reserved + size > self.cache.limit:
                        limiter.release()
                        stopped_at_limit = True
                        break
                    reserved += size
                    in_flight += 1
                    nursery.start_soon(fetch, sha, size)
            outer.cancel_scope.cancel()
        if offline:
            log.warning("sync stopped: the storage is unreachable (%d of %d files fetched)",
                        done_files, len(wanted))
        return {"phase": "end", "files": len(files), "done_files": done_files,
                "done_bytes": done_bytes,
                "to_fetch": len(wanted), "bytes": total_bytes, "failed": failed,
                "stopped_at_limit": stopped_at_limit, "offline": offline,
                "remaining": len(wanted) - done_files,
                "elapsed": time.monotonic() - started}
