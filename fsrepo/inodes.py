"""The inode table: which inode number stands for which name, and for how long.

A directory's inode follows its directory id wherever it is renamed; a file's or symlink's
inode is its (parent, name). An inode stays valid while the kernel holds lookups on it or
handles are open; once neither is true and its name is gone, it is dropped. How many
inodes each directory has named in it is counted: a directory's view may leave memory only
when none has (`has_children`).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from .errors import FsError
from .manifest import ROOT_ID, DirEntry, Entry, FileEntry, SymlinkEntry

ROOT_INO = 1


@dataclass(slots=True)
class Node:
    ino: int
    parent: int  # 0: orphan (its name is gone; valid for open handles until forgotten)
    name: bytes
    dir_id: str | None  # set for directories
    lookups: int = 0
    is_link: bool = False
    opens: int = 0


class InodeTable:
    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_INO: Node(ROOT_INO, ROOT_INO, b"", ROOT_ID, 1)}
        # file and symlink inodes by parent, then name (no (parent, name) tuple per inode)
        self._by_name: dict[int, dict[bytes, int]] = {}
        self._dir_ino: dict[str, int] = {ROOT_ID: ROOT_INO}
        self._children: dict[int, int] = {}  # parent inode -> inodes named in it
        self._next_ino = ROOT_INO + 1

    def get(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FsError(errno.ESTALE)
        return node

    def dir_node(self, ino: int) -> Node:
        node = self.node(ino)
        if node.dir_id is None:
            raise FsError(errno.ENOTDIR)
        return node

    def has_children(self, ino: int) -> bool:
        """Whether some inode is named in the directory (its view is needed to see it)."""
        return ino in self._children

    def _set_parent(self, node: Node, parent: int) -> None:
        """Re-home a node (0: orphan), keeping the per-directory counts."""
        old = node.parent
        if old == parent:
            return
        if old != 0 and node.ino != ROOT_INO:
            left = self._children[old] - 1
            if left:
                self._children[old] = left
            else:
                del self._children[old]
        if parent != 0:
            self._children[parent] = self._children.get(parent, 0) + 1
        node.parent = parent

    def _name_get(self, parent: int, name: bytes) -> int | None:
        names = self._by_name.get(parent)
        return None if names is None else names.get(name)

    def _name_set(self, parent: int, name: bytes, ino: int) -> None:
        names = self._by_name.get(parent)
        if names is None:
            names = self._by_name[parent] = {}
        names[name] = ino

    def _name_pop(self, parent: int, name: bytes) -> int | None:
        names = self._by_name.get(parent)
        if names is None:
            return None
        ino = names.pop(name, None)
        if not names:
            del self._by_name[parent]
        return ino

    def of_dir(self, dir_id: str) -> Node | None:
        """The inode of a directory, if it has one."""
        ino = self._dir_ino.get(dir_id)
        return None if ino is None else self.nodes[ino]

    def files_in(self, parent: int) -> list[Node]:
        """The file and symlink inodes named in a directory."""
        names = self._by_name.get(parent)
        return [] if names is None else [self.nodes[ino] for ino in names.values()]

    def of_name(self, parent: int, name: bytes) -> Node | None:
        """The inode of a file or symlink by its name, if it has one."""
        ino = self._name_get(parent, name)
        return None if ino is None else self.nodes[ino]

    def node_for(self, parent: int, name: bytes, entry: Entry) -> Node:
        """The inode a name's entry is seen through: the existing one if it still denotes
        the same object, else a new one (the old is detached)."""
        if isinstance(entry, DirEntry):
            ino = self._dir_ino.get(entry.id)
            if ino is not None:
                node = self.nodes[ino]
                self._set_parent(node, parent)
                node.name = name
                return node
        else:
            ino = self._name_get(parent, name)
            if ino is not None:
                if is_same_object(self.nodes[ino], entry):
                    return self.nodes[ino]
                self.detach(parent, name)
        ino = self._next_ino
        self._next_ino += 1
        node = Node(ino, 0, name, entry.id if isinstance(entry, DirEntry) else None,
                    is_link=isinstance(entry, SymlinkEntry))
        self._set_parent(node, parent)
        self.nodes[ino] = node
        if node.dir_id is not None:
            self._dir_ino[node.dir_id] = ino
        else:
            self._name_set(parent, name, ino)
        return node

    def detach(self, parent: int, name: bytes) -> None:
        """A file's or symlink's name now means something else: its inode becomes an
        orphan, still valid for open handles and until forgotten."""
        ino = self._name_pop(parent, name)
        if ino is not None:
            node = self.nodes[ino]
            self._set_parent(node, 0)
            self.drop_if_unused(node)

    def orphan(self, node: Node) -> None:
        """The node's name was removed (unlink, rmdir)."""
        if node.dir_id is None:
            self._name_pop(node.parent, node.name)
        self._set_parent(node, 0)
        self.drop_if_unused(node)

    def move(self, node: Node, parent: int, name: bytes) -> None:
        """The node's name moved (rename here, or a directory renamed elsewhere)."""
        if node.dir_id is None and self._name_get(node.parent, node.name) == node.ino:
            self._name_pop(node.parent, node.name)
            self._name_set(parent, name, node.ino)
        self._set_parent(node, parent)
        node.name = name

    def redirect_dir(self, old_id: str, new_id: str) -> Node | None:
        """Directory `old_id` was merged into `new_id`: its inode (if any) now shows
        `new_id`, and stands for it unless `new_id` has an inode of its own."""
        ino = self._dir_ino.pop(old_id, None)
        if ino is None:
            return None
        node = self.nodes[ino]
        node.dir_id = new_id
        self._dir_ino.setdefault(new_id, ino)
        return node

    def drop_if_unused(self, node: Node) -> None:
        """Forget a node nobody refers to any more (no lookups, no open handles)."""
        if node.lookups <= 0 and node.opens <= 0 and node.ino != ROOT_INO:
            self.nodes.pop(node.ino, None)
            if node.dir_id is not None:
                if self._dir_ino.get(node.dir_id) == node.ino:
                    del self._dir_ino[node.dir_id]
            elif self._name_get(node.parent, node.name) == node.ino:
                self._name_pop(node.parent, node.name)
            self._set_parent(node, 0)

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            node.lookups -= count
            self.drop_if_unused(node)

    def compact(self) -> None:
        """Re-size the table's dicts to what they hold: a dict keeps the room it once
        needed (a walk's million inodes) after its entries go."""
        self.nodes = dict(self.nodes)
        self._dir_ino = dict(self._dir_ino)
        self._children = dict(self._children)

    def ancestors(self, ino: int) -> set[str]:
        """The directory ids from `ino` up to the root (a directory may not move into
        one of them, nor list one of them: that would be a cycle)."""
        seen: set[str] = set()
        while True:
            node = self.nodes.get(ino)
            if node is None or node.dir_id is None or node.dir_id in seen:
                return seen
            seen.add(node.dir_id)
            if node.ino == ROOT_INO or node.parent == 0:
                return seen
            ino = node.parent


def is_same_object(node: Node, entry: Entry | None) -> bool:
    """Whether an entry denotes the node's object: same directory id, or the same kind."""
    if node.dir_id is not None:
        return isinstance(entry, DirEntry) and entry.id == node.dir_id
    if node.is_link:
        return isinstance(entry, SymlinkEntry)
    return isinstance(entry, FileEntry)
