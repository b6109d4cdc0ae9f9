"""What a changed directory view means for the inodes and for the kernel's caches.

A view changes under the kernel when another machine's manifest arrives, or when this
machine's own ops are taken back; then names the kernel caches may mean something else
now. This module decides which inodes keep their name, which are detached (open handles
keep reading what they had), and what the kernel must forget (`Invalidator`).
"""

from __future__ import annotations

from typing import Protocol

from .inodes import InodeTable
from .manifest import DirEntry, Entry
from .merge import same_content, same_object


class Invalidator:
    """Tells the kernel what went stale; the FUSE layer provides the real one."""

    def entry(self, parent_ino: int, name: bytes) -> None:
        pass

    def inode(self, ino: int) -> None:
        pass


class EditTracker(Protocol):
    """Whether a file inode is open for writing or has unsaved changes: a remote change
    does not take it away from its name (saving it merges)."""

    def is_editing(self, ino: int) -> bool: ...


class _NothingEdited:
    def is_editing(self, ino: int) -> bool:
        return False


class Announcer:
    """The `ViewChanges` listener of the view cache."""

    def __init__(self, inodes: InodeTable, invalidator: Invalidator) -> None:
        self.inodes = inodes
        self.invalidator = invalidator
        self.editing: EditTracker = _NothingEdited()

    def track_edits(self, tracker: EditTracker) -> None:
        """The file layer says which inodes are being edited (it is built after us)."""
        self.editing = tracker

    def view_changed(self, dir_id: str, old: dict[bytes, Entry],
                     new: dict[bytes, Entry]) -> None:
        parent = self.inodes.of_dir(dir_id)
        if parent is None:
            return
        changed = False
        for name in old.keys() | new.keys():
            before, after = old.get(name), new.get(name)
            if before == after:
                continue
            changed = True
            self.invalidator.entry(parent.ino, name)
            node = self.inodes.of_name(parent.ino, name)
            if node is not None and not self.editing.is_editing(node.ino) and (
                    not same_object(before, after) or (
                        node.opens > 0 and not same_content(before, after))):
                # The name now means something else, or other content while open handles
                # read the old: the old inode is detached and keeps what it had.
                self.inodes.detach(parent.ino, name)
            elif node is not None:  # (a file being edited stays: saving merges)
                self.invalidator.inode(node.ino)
            if isinstance(after, DirEntry) and not same_content(before, after):
                moved = self.inodes.of_dir(after.id)
                if moved is not None and after.id not in self.inodes.ancestors(parent.ino):
                    # A directory renamed or moved here elsewhere: its inode follows.
                    self.inodes.move(moved, parent.ino, name)
            if isinstance(before, DirEntry) and not isinstance(after, DirEntry):
                gone = self.inodes.of_dir(before.id)
                if gone is not None and gone.parent == parent.ino and gone.name == name:
                    self.invalidator.inode(gone.ino)
        if changed:  # the directory's own link count and times
            self.invalidator.inode(parent.ino)

    def diverted(self, dir_id: str, diverted: dict[bytes, bytes]) -> None:
        """Our version of a name went to a conflict copy: what the kernel caches for the
        name (our own content) is stale."""
        parent = self.inodes.of_dir(dir_id)
        if parent is None:
            return
        for name, copy in diverted.items():
            self.invalidator.entry(parent.ino, name)
            self.invalidator.entry(parent.ino, copy)
            node = self.inodes.of_name(parent.ino, name)
            if node is not None:
                self.invalidator.inode(node.ino)
