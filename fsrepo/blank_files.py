"""Empty staging files made ahead of need by a thread of their own.

A new staging copy is one `open(O_CREAT|O_EXCL)` in the cache's filesystem, on the trio
thread that answers the kernel. While the group commit syncs the cache's disk that call
waits on the filesystem's journal (27 us on an idle disk, several times that during a
`cp -r`'s commits), and every create of the copy waits with it. Made ahead, a create takes
a file from a short queue instead. Unused files are removed at unmount, and a crash leaves
only empty files that no log line names, which the next start's `clear_leftovers` removes.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path

import trio

BATCH = 64  # files made per refill
LOW = 16  # a refill starts when fewer are left


class BlankFiles:
    """A queue of empty files (path, descriptor open read-write) in `directory`, named
    `<prefix>-b<n>` (unique for the run: the caller's own names use another form)."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self._ready: deque[tuple[Path, int]] = deque()
        self._made = 0  # (only the refilling thread counts: one refill at a time)
        self._refilling = False
        self._closed = False
        self._lock = threading.Lock()  # close() against a refill's last files

    def take(self) -> tuple[Path, int] | None:
        """An empty file made ahead, or None (the caller makes one itself); starts a refill
        when the queue runs low."""
        try:
            blank = self._ready.popleft()
        except IndexError:
            blank = None
        if len(self._ready) < LOW and not self._refilling and not self._closed:
            self._refilling = True
            trio.lowlevel.start_thread_soon(self._refill, self._refilled)
        return blank

    def _refill(self) -> None:
        for _ in range(BATCH):
            self._made += 1
            path = self.directory / f"{self.prefix}-b{self._made}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            with self._lock:
                if self._closed:
                    _remove(path, fd)
                    return
                self._ready.append((path, fd))

    def _refilled(self, outcome: object) -> None:
        # A failure (a full disk, descriptors run out) is left to the callers' own
        # creates, which report it to the user; the next take() tries again.
        self._refilling = False

    def waiting(self) -> set[str]:
        """The names of the files made and not taken yet."""
        with self._lock:
            return {path.name for path, _ in self._ready}

    def close(self) -> None:
        """Remove the files not taken (at unmount)."""
        with self._lock:
            self._closed = True
            while self._ready:
                _remove(*self._ready.popleft())


def _remove(path: Path, fd: int) -> None:
    os.close(fd)
    path.unlink(missing_ok=True)
