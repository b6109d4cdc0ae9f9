"""The attributes readdirplus handed the kernel for the folders listed last, reused while an
entry is unchanged: `ls -l` of a big folder lists it whole every time (pyfuse3 cannot let
the kernel cache a listing), and building each entry's attributes again was most of the
mount's time per entry.

An item is valid while the folder's entry for the name is the same object (entries are
immutable: any change puts a new one in the view) on the same inode; what the caller shows
differently for other reasons (a file open for writing, a folder's own stat) it does not
put here. Bounded by entries over all folders, the folders listed longest ago going first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .manifest import Entry

MAX_ENTRIES = 32_768  # ~10 MiB at most: a 10,000-photo folder and its neighbours


class ListedAttrs:
    """Per listed folder (its inode): name -> (entry, inode, attributes)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._folders: OrderedDict[int, dict[bytes, tuple[Entry, int, Any]]] = OrderedDict()
        self._count = 0

    def folder(self, ino: int) -> dict[bytes, tuple[Entry, int, Any]]:
        """The folder's items, now the most recently listed. An item is valid while the
        view holds that entry object for the name and the inode table that inode."""
        items = self._folders.get(ino)
        if items is None:
            items = self._folders[ino] = {}
        else:
            self._folders.move_to_end(ino)
        return items

    def put(self, folder_ino: int, items: dict[bytes, tuple[Entry, int, Any]], name: bytes,
            entry: Entry, ino: int, attrs: Any) -> None:
        """Keep `attrs` for the entry (the folders listed longest ago make room; a folder
        bigger than the bound keeps what fits)."""
        if name not in items:
            while self._count >= self.max_entries:
                oldest = next(iter(self._folders))
                if oldest == folder_ino:
                    return
                self._count -= len(self._folders.pop(oldest))
            self._count += 1
        items[name] = (entry, ino, attrs)

    def drop(self, folder_ino: int) -> None:
        """Forget a folder's items (the kernel forgot the folder)."""
        items = self._folders.pop(folder_ino, None)
        if items is not None:
            self._count -= len(items)

    def clear(self) -> None:
        """Forget every folder's items (the mount is idle: the next listing builds them)."""
        self._folders.clear()
        self._count = 0

    def __len__(self) -> int:
        return self._count
