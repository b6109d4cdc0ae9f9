"""Blobs of a folder's next files fetched before they are opened.

A reader that goes through a folder in order (a photo viewer, `cp -r` or `cat *` out of
the mount) would otherwise wait one round trip per file. Once two files of a folder that
were not cached are opened one after the other in the folder's order (names in byte
order: the order readdir lists them, and a shell's glob for the usual names), the blobs of
the next `files` files are downloaded in the background, several at once, and the window
moves on with the reader. An open that does not follow the order ends it: guesses not yet
opened are let go (those in flight finish into the cache; nothing new starts).

Bounds: `files` ahead of the reader's position; `max_bytes` of guesses not yet opened; and
the cache limit: a guess starts only if it fits beside what eviction may not touch (open
blobs, blobs pending upload) and the other guesses, so a guess never makes the cache evict
what is read or not yet in the bucket, nor (being the newest) another guess. Guesses are
not pinned: a reader that stops leaves them to the cache's LRU like any blob read, and a
folder not opened for `IDLE` seconds lets its guesses go from the byte bound.

A reader of a file being fetched ahead joins that download (one GET per blob); every
download is verified before its last byte is served (blobcache.py). A guess that turned out
damaged fails only the reader of that file: `take` hands it the failed download.
Whole-blob files only: chunked files read ahead within themselves (reads.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .blobcache import BlobCache, Download
from .errors import IntegrityError
from .manifest import Entry, FileEntry

READ_AHEAD_FILES = 16  # files fetched ahead of a reader going through a folder (0: off)
READ_AHEAD_BYTES = 64 << 20  # bytes of guesses not yet opened, at most
STREAK = 2  # cold opens in order before fetching ahead
STEP = 4  # an open at most this many positions after the last one is still "in order"
FOLDERS_KEPT = 4  # folders whose reading order is followed at once (each holds its names)
IDLE = 30.0  # seconds without an open after which a folder's reader is taken to be gone


@dataclass
class _Folder:
    """One folder being read: its names in order, where the reader is, what is guessed."""

    entries: Mapping[bytes, Entry]  # the view's entries the order was made from
    names: list[bytes]
    position: dict[bytes, int]
    last: int = -1  # position of the last open
    opened_at: float = 0.0  # monotonic time of the last open
    streak: int = 0  # opens in order so far
    next_guess: int = 0  # first position not yet considered for a guess
    guesses: dict[str, Download] = field(default_factory=dict)  # sha -> not yet opened


class FolderReadAhead:
    """Follows opens per folder and starts downloads ahead of an in-order reader."""

    def __init__(self, cache: BlobCache, files: int = READ_AHEAD_FILES,
                 max_bytes: int = READ_AHEAD_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.clock = clock
        self.files = files
        self.max_bytes = max_bytes
        self._folders: OrderedDict[str, _Folder] = OrderedDict()
        self._owner: dict[str, str] = {}  # guessed sha -> folder id
        self.guessed_bytes = 0  # sizes of guesses not yet opened
        self.started = 0  # downloads started ahead (counters for tests and --status)
        self.started_bytes = 0  # their sizes: what the guesses cost in GETs and transfer
        self.used = 0  # of those, opened by a reader

    # -- what a reader opens ----------------------------------------------------------------
    def opened(self, folder_id: str, entries: Mapping[bytes, Entry], name: bytes,
               entry: FileEntry, cold: bool) -> None:
        """A file of the folder was opened for reading; `cold`: its blob was not cached
        (or was here only because it was guessed)."""
        if self.files <= 0:
            return
        now = self.clock()
        for other in self._folders.values():
            if other.guesses and now - other.opened_at > IDLE:
                self._let_go(other)  # its reader went away
        folder = self._folder(folder_id, entries, name)
        folder.opened_at = now
        pos = folder.position[name]
        if pos == folder.last:
            return  # the same file again (opened twice in a row): neither order nor not
        in_order = 0 < pos - folder.last <= STEP
        folder.last = pos
        if not in_order:
            self._let_go(folder)
            folder.streak = 1 if cold else 0
            folder.next_guess = pos + 1
            return
        if cold or folder.streak:
            folder.streak += 1
        if folder.streak >= STREAK and self.cache.store.online:
            self._guess(folder_id, folder, pos)

    def take(self, sha: str) -> Download | None:
        """A reader opens a guessed blob: the guess is its own now. Returns the
        download if it failed as damaged (the reader answers EIO from it, with no new
        request); None otherwise (running: the reader joins it; done: it is cached)."""
        folder_id = self._owner.pop(sha, None)
        folder = None if folder_id is None else self._folders.get(folder_id)
        if folder is None:
            return None
        dl = folder.guesses.pop(sha)
        self._forget(dl)
        self.used += 1
        return dl if isinstance(dl.error, IntegrityError) else None

    def guessed(self, sha: str) -> bool:
        return sha in self._owner

    # -- internals ------------------------------------------------------------------------
    def _folder(self, folder_id: str, entries: Mapping[bytes, Entry], name: bytes) -> _Folder:
        folder = self._folders.get(folder_id)
        if folder is not None and (folder.entries is not entries or name not in folder.position):
            old, folder = folder, self._ordered(entries)  # the folder changed: order again
            at = old.names[old.last] if 0 <= old.last < len(old.names) else None
            folder.last = folder.position.get(at, -1) if at is not None else -1
            folder.streak, folder.guesses = old.streak, old.guesses
            folder.next_guess = folder.last + 1
            self._folders[folder_id] = folder
        elif folder is None:
            folder = self._folders[folder_id] = self._ordered(entries)
            while len(self._folders) > FOLDERS_KEPT:
                _, dropped = self._folders.popitem(last=False)
                self._let_go(dropped)
        self._folders.move_to_end(folder_id)
        return folder

    @staticmethod
    def _ordered(entries: Mapping[bytes, Entry]) -> _Folder:
        names = sorted(entries)
        return _Folder(entries, names, {n: i for i, n in enumerate(names)})

    def _guess(self, folder_id: str, folder: _Folder, pos: int) -> None:
        """Start the downloads of the files after `pos` not cached, within the bounds."""
        start = max(folder.next_guess, pos + 1)
        end = min(pos + 1 + self.files, len(folder.names))
        cache = self.cache
        for at in range(start, end):
            entry = folder.entries.get(folder.names[at])
            if isinstance(entry, FileEntry) and entry.size > 0 and entry.chunks is None \
                    and not cache.has(entry.sha256) and entry.sha256 not in self._owner \
                    and cache.chunks_of(entry) is None:
                if not self._room_for(entry.size):
                    return  # taken up again from here when the reader moves on
                dl = cache.start_download(entry.sha256, entry.size)
                folder.guesses[entry.sha256] = dl
                self._owner[entry.sha256] = folder_id
                self.guessed_bytes += entry.size
                self.started += 1
                self.started_bytes += entry.size
            folder.next_guess = at + 1

    def _room_for(self, size: int) -> bool:
        """Whether a guess of `size` bytes fits the bounds: bytes of guesses, and the cache
        limit beside what eviction may not remove and the other guesses."""
        if self.guessed_bytes + size > self.max_bytes:
            return False
        cache = self.cache
        if cache.used + self._guessed_in_flight() + size <= cache.limit:
            return True  # fits without evicting anything
        return cache.pinned_bytes() + self.guessed_bytes + size <= cache.limit

    def _guessed_in_flight(self) -> int:
        """Guesses still downloading (the finished ones count in the cache's use)."""
        return sum(dl.size for f in self._folders.values() for dl in f.guesses.values()
                   if not dl.done)

    def _let_go(self, folder: _Folder) -> None:
        """The reader left the order (or went away): its guesses not yet opened no longer
        count (those in flight still finish into the cache)."""
        for sha, dl in folder.guesses.items():
            self._owner.pop(sha, None)
            self._forget(dl)
        folder.guesses = {}
        folder.streak = 0

    def _forget(self, dl: Download) -> None:
        self.guessed_bytes -= dl.size
