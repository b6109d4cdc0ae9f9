"""The index of the local blob cache: which blobs are cached, LRU order, pins, eviction.

A blob file is named by its SHA-256 and is immutable once in place, so an open file
descriptor on it stays valid whatever happens to the name. Eviction removes the least
recently used blobs beyond the size limit, but never one that is pending upload (it may be
the only copy) or open.

An evicted blob leaves the index at once and its file is removed by a worker thread a
moment later; a new file under the same name meanwhile (a close or a download of the same
content) must survive that removal. So every new name takes the blob out of `_evicting`
before it is made, and the removal and the naming are ordered by one lock: a removal
unlinks only a blob still marked as evicted by its own eviction.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import trio

from .state import StateDB

log = logging.getLogger(__name__)


class CacheIndex:
    """The cached blobs and their sizes, in LRU order, with what must not be evicted."""

    def __init__(self, root: Path, db: StateDB, limit: int) -> None:
        self.root = root
        self.db = db
        self.limit = limit
        self._lru: OrderedDict[str, int] = OrderedDict()  # sha -> size, oldest first
        self.pending: set[str] = set()  # not yet in the bucket: never evicted
        self._open: dict[str, int] = {}
        self.used = 0
        self._touched: dict[str, float] = {}
        # evicted blobs whose file removal is on its way: sha -> the eviction's token
        self._evicting: dict[str, object] = {}
        self._names = threading.Lock()  # a removal against a new file under that name

    # -- startup ------------------------------------------------------------------------
    def load(self, rows: list[tuple[str, int, bool, float]]) -> list[str]:
        """Index what the database says is cached; returns pending blobs whose file is gone
        (which means data was lost behind our back: the caller logs it)."""
        missing = []
        for sha, length, pending, _atime in rows:
            size = self._on_disk(sha, length)
            if size is None:
                if pending:
                    missing.append(sha)
                continue
            self._lru[sha] = size
            self.used += size
            if pending:
                self.pending.add(sha)
        return missing

    # -- queries --------------------------------------------------------------------------
    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return sha in self._lru

    def touch(self, sha: str) -> None:
        if sha in self._lru:
            self._lru.move_to_end(sha)
            self._touched[sha] = time.time()

    def pinned(self, sha: str) -> bool:
        return sha in self.pending or self._open.get(sha, 0) > 0

    def pinned_bytes(self) -> int:
        """What eviction may not remove: cached blobs pending upload or open."""
        lru = self._lru
        return sum(lru.get(sha, 0) for sha in self.pending | self._open.keys())

    def acquire(self, sha: str) -> None:
        self._open[sha] = self._open.get(sha, 0) + 1

    def release(self, sha: str) -> None:
        n = self._open.get(sha, 0) - 1
        if n > 0:
            self._open[sha] = n
        else:
            self._open.pop(sha, None)

    # -- adding ---------------------------------------------------------------------------
    def adopt(self, staging: Path, sha: str, replace: bool = False) -> bool:
        """Move a finished staging file into the cache under its hash (a rename: cheap on
        the trio thread; the group commit makes it durable). Returns False if the blob was
        already cached (the staging file is then deleted), unless `replace` (the cached
        one may be damaged)."""
        if not replace and sha not in self._evicting and self.path(sha).exists():
            staging.unlink(missing_ok=True)
            return False
        self.place(staging, sha)
        return True

    def claim_name(self, sha: str) -> threading.Lock:
        """A new file is about to take the blob's name: an eviction's removal on its way
        leaves it alone. Make the name while holding the returned lock."""
        self._evicting.pop(sha, None)
        return self._names

    def place(self, staging: Path, sha: str) -> Path:
        """Rename a file into the cache under its hash, over whatever has that name (the
        same content, or a damaged copy of it); returns its path there."""
        target = self.path(sha)
        with self.claim_name(sha):
            try:
                os.replace(staging, target)
            except FileNotFoundError:  # the shard's first blob
                target.parent.mkdir(exist_ok=True)
                os.replace(staging, target)
        return target

    def link_in(self, staging: Path, sha: str, replace: bool = False) -> None:
        """A second name in the cache for a staging file that must stay where it is until
        its journal record is gone (a copy fsync'd while open: staging.py); `replace`: as
        in `adopt`."""
        target = self.path(sha)
        doomed = sha in self._evicting
        with self.claim_name(sha):
            if target.exists():
                if not (replace or doomed):
                    return
                target.unlink()
            target.parent.mkdir(exist_ok=True)
            try:
                os.link(staging, target)
            except FileExistsError:
                pass

    def _on_disk(self, sha: str, length: int) -> int | None:
        """What a blob file counts against the limit: its length, or the blocks it uses
        if fewer (a sparse file: a 2 GiB file with 4 MB written counts 4 MB). None if the
        file is missing."""
        try:
            return min(length, os.stat(self.path(sha)).st_blocks * 512)
        except FileNotFoundError:
            return None

    def register(self, sha: str, size: int, pending: bool, dense: bool = False,
                 on_disk: int | None = None) -> None:
        """Index a blob file now in place; `dense`: written whole (a download), so its
        size is what it uses, with no stat to ask; `on_disk`: the bytes it uses there if
        the caller knows them (a close: from the staging descriptor), else `_on_disk` looks."""
        if sha not in self._lru:
            if on_disk is None and not dense:
                on_disk = self._on_disk(sha, size)
            size = size if on_disk is None else min(size, on_disk)
            self._lru[sha] = size
            self.used += size
        else:
            self._lru.move_to_end(sha)
        if pending:
            self.pending.add(sha)

    def discard(self, sha: str) -> None:
        """Forget a damaged blob and remove its file (worker thread or loop)."""
        size = self._lru.pop(sha, None)
        if size is not None:
            self.used -= size
        self.pending.discard(sha)
        try:
            os.unlink(self.path(sha))
        except FileNotFoundError:
            pass

    def uploaded(self, sha: str) -> None:
        self.pending.discard(sha)

    # -- eviction -------------------------------------------------------------------------
    def evictable(self) -> list[tuple[str, int]]:
        """Blobs to remove to get back under the limit, oldest first."""
        over = self.used - self.limit
        victims = []
        if over <= 0:
            return victims
        for sha, size in self._lru.items():
            if over <= 0:
                break
            if self.pinned(sha):
                continue
            victims.append((sha, size))
            over -= size
        return victims

    async def evict(self) -> int:
        victims = self.evictable()
        if not victims:
            return 0
        token = object()
        for sha, size in victims:
            self._lru.pop(sha, None)
            self.used -= size
            self._evicting[sha] = token

        def remove() -> None:
            for sha, _ in victims:
                with self._names:
                    if self._evicting.get(sha) is not token:
                        continue  # named again since (see the module's docstring)
                    try:
                        os.unlink(self.path(sha))
                    except FileNotFoundError:
                        pass
        try:
            await trio.to_thread.run_sync(remove)
        finally:
            for sha, _ in victims:
                if self._evicting.get(sha) is token:
                    del self._evicting[sha]
        try:
            await self.db.run(self.db.state.remove_blobs, [s for s, _ in victims])
        except OSError as exc:  # stale rows of files that are gone are skipped at startup
            log.warning("evicted blobs not yet forgotten locally: %s", exc)
        return sum(size for _, size in victims)

    async def flush_atimes(self) -> None:
        if self._touched:
            items, self._touched = list(self._touched.items()), {}
            try:
                await self.db.run(self.db.state.touch_blobs, items)
            except OSError as exc:  # only LRU order is at stake: try again later
                self._touched = dict(items) | self._touched
                log.warning("cannot record cache use: %s", exc)
