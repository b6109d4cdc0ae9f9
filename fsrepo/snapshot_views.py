"""The read-only tree under `.snapshots`: each snapshot's directories and files as they were.

Its inodes are numbered from SNAP_INO_BASE up, apart from the live tree's (a directory id
appears in the live tree and in every snapshot that kept it: each is a different inode);
a directory is (snapshot, directory id), a file or symlink (parent inode, name). Files
are read through the same blob cache as the live tree's (lazily, downloads shared), and
the blobs their manifests name are known to be in the bucket, so a copy back into the
live tree uploads nothing. Nothing here changes anything but `delete` (rmdir of a
snapshot's own folder).
"""

from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from .announce import Invalidator
from .blobcache import BlobCache
from .errors import FsError, ImgrepoError, ManifestError, ObjectNotFound, errno_for
from .handles import Handle
from .inodes import ROOT_INO, Node
from .manifest import ROOT_ID, DirEntry, Entry, FileEntry, SymlinkEntry, parse_manifest
from .paths import show_name
from .reads import BlobReads
from .snapshots import RESERVED_NAME, Snapshot, Snapshots

log = logging.getLogger(__name__)

SNAP_INO_BASE = 1 << 56  # the live inode table counts up from 2 and never gets here
TOP_INO = SNAP_INO_BASE
TOP_ID = "snapshots"
PARSED_KEPT = 64  # parsed snapshot manifests kept in memory (the rest re-parse from disk)


@dataclass(slots=True)
class SnapNode:
    ino: int
    parent: int
    name: bytes
    snapshot: str  # "" for the top
    entry: Entry
    lookups: int = 0
    opens: int = 0


def is_reserved(parent: int, name: bytes) -> bool:
    """Whether a name in a live directory is the snapshots' own (only in the root)."""
    return parent == ROOT_INO and name == RESERVED_NAME


class SnapshotTree:
    def __init__(self, snapshots: Snapshots, cache: BlobCache,
                 invalidator: Invalidator) -> None:
        self.snapshots = snapshots
        self.reads = BlobReads(cache, invalidator)
        top = SnapNode(TOP_INO, ROOT_INO, RESERVED_NAME, "",
                       DirEntry(TOP_ID, time.time_ns(), 0o555))
        self.nodes: dict[int, SnapNode] = {TOP_INO: top}
        self._by_key: dict[tuple[object, ...], int] = {}
        self._next_ino = TOP_INO + 1
        self._parsed: OrderedDict[str, dict[bytes, Entry]] = OrderedDict()
        self._handles: dict[int, Handle] = {}
        self._next_fh = SNAP_INO_BASE

    @staticmethod
    def owns(ino: int) -> bool:
        """Whether an inode (or a handle number) is one of the snapshots'."""
        return ino >= SNAP_INO_BASE

    # -- inodes ---------------------------------------------------------------------------
    def node(self, ino: int) -> SnapNode:
        node = self.nodes.get(ino)
        if node is None:
            raise FsError(errno.ESTALE)
        return node

    def _node_for(self, parent: SnapNode, name: bytes, entry: Entry) -> SnapNode:
        snapshot = parent.snapshot or name.decode()
        key: tuple[object, ...] = (snapshot, entry.id) if isinstance(entry, DirEntry) \
            else (parent.ino, name)
        ino = self._by_key.get(key)
        if ino is not None:
            node = self.nodes[ino]
            # A file keeps its inode only with the same content: the kernel keeps its pages
            # (a snapshot deleted and taken again under its name may hold another version).
            if node.entry == entry or (isinstance(entry, DirEntry)
                                       and isinstance(node.entry, DirEntry)):
                node.entry = entry
                return node
        ino = self._next_ino
        self._next_ino += 1
        node = SnapNode(ino, parent.ino, name, snapshot, entry)
        self.nodes[ino] = node
        self._by_key[key] = ino
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None or ino == TOP_INO:
            return
        node.lookups -= count
        self._drop_if_unused(node)

    def _drop_if_unused(self, node: SnapNode) -> None:
        if node.lookups > 0 or node.opens > 0 or node.ino == TOP_INO:
            return
        del self.nodes[node.ino]
        entry = node.entry
        key = (node.snapshot, entry.id) if isinstance(entry, DirEntry) \
            else (node.parent, node.name)
        if self._by_key.get(key) == node.ino:
            del self._by_key[key]

    def path(self, node: SnapNode, name: bytes | None = None) -> str:
        """Where the node (or an entry in it) shows in the mount, for log lines."""
        parts = [] if name is None else [show_name(name)]
        while node.ino != TOP_INO:
            parts.append(show_name(node.name))
            parent = self.nodes.get(node.parent)
            if parent is None:
                break
            node = parent
        return "/" + show_name(RESERVED_NAME) + "".join("/" + p for p in reversed(parts))

    def _ancestors(self, node: SnapNode) -> set[str]:
        seen: set[str] = set()
        while node.ino != TOP_INO:
            if isinstance(node.entry, DirEntry):
                seen.add(node.entry.id)
            parent = self.nodes.get(node.parent)
            if parent is None:
                break
            node = parent
        return seen

    # -- reading directories --------------------------------------------------------------
    async def _snapshot(self, name: str) -> Snapshot:
        try:
            return await self.snapshots.load(name)
        except ObjectNotFound:
            raise FsError(errno.ENOENT) from None
        except ImgrepoError as exc:
            log.error("snapshot %s cannot be read: %s", name, exc)
            raise FsError(errno_for(exc)) from None

    async def entries(self, node: SnapNode) -> dict[bytes, Entry]:
        """A directory's entries: the top lists the snapshots, others their manifest copy."""
        if node.ino == TOP_INO:
            try:
                names = await self.snapshots.names()
            except ImgrepoError as exc:
                log.info("snapshots listed from this machine's copies: %s", exc)
                names = self.snapshots.known_names()
            return {s.name.encode(): DirEntry(ROOT_ID, int(s.written * 1e9), 0o755)
                    for s in names}
        entry = node.entry
        if not isinstance(entry, DirEntry):
            raise FsError(errno.ENOTDIR)
        snap = await self._snapshot(node.snapshot)
        record = snap.dirs.get(entry.id)
        if record is None:
            return {}  # an empty directory (never had a manifest)
        parsed = self._parsed.get(record.sha)
        if parsed is not None:
            self._parsed.move_to_end(record.sha)
            return parsed
        try:
            data = await self.snapshots.manifest(record)
            manifest, problems = parse_manifest(data, entry.id)
        except ManifestError as exc:
            log.error("%s: %s", self.path(node), exc)
            raise FsError(errno.EIO) from None
        except ImgrepoError as exc:
            log.error("%s cannot be read: %s", self.path(node), exc)
            raise FsError(errno_for(exc)) from None
        for problem in problems:
            log.warning("%s: %s", self.path(node), problem)
        self._parsed[record.sha] = manifest.entries
        while len(self._parsed) > PARSED_KEPT:
            self._parsed.popitem(last=False)
        return manifest.entries

    async def lookup(self, parent: int, name: bytes, count: bool = True) -> SnapNode:
        pnode = self.node(parent)
        entry = (await self.entries(pnode)).get(name)
        if entry is None:
            raise FsError(errno.ENOENT)
        if pnode.ino == TOP_INO:
            await self._snapshot(name.decode())  # known and readable before it is shown
        node = self.child(pnode, name, entry)
        if count:
            node.lookups += 1
        return node

    def child(self, pnode: SnapNode, name: bytes, entry: Entry) -> SnapNode:
        """The node of an entry just listed (readdirplus: no await per entry)."""
        if isinstance(entry, DirEntry) and pnode.ino != TOP_INO \
                and entry.id in self._ancestors(pnode):
            log.error("%s refused: it is one of the folders above it (a cycle in the "
                      "snapshot)", self.path(pnode, name))
            raise FsError(errno.EIO)
        return self._node_for(pnode, name, entry)

    async def listing(self, ino: int) -> list[tuple[bytes, Entry]]:
        return sorted((await self.entries(self.node(ino))).items())

    def readlink(self, ino: int) -> bytes:
        entry = self.node(ino).entry
        if not isinstance(entry, SymlinkEntry):
            raise FsError(errno.EINVAL)
        return entry.target

    # -- files ----------------------------------------------------------------------------
    def open(self, ino: int, writable: bool) -> int:
        """A read handle on a snapshot's file (EROFS for writing)."""
        node = self.node(ino)
        if writable:
            raise FsError(errno.EROFS)
        entry = node.entry
        if isinstance(entry, DirEntry):
            raise FsError(errno.EISDIR)
        if not isinstance(entry, FileEntry):
            raise FsError(errno.EINVAL)
        cache = self.reads.cache
        if entry.size and not cache.has_content(entry) and not cache.store.online:
            raise FsError(errno.ENETDOWN)
        fh = self._next_fh
        self._next_fh += 1
        handle = Handle(fh, Node(node.ino, node.parent, node.name, None), False)
        self.reads.attach(handle, entry)
        self._handles[fh] = handle
        node.opens += 1
        return fh

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return await self.reads.read(handle, offset, size)

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        self.reads.detach(handle)
        node = self.nodes.get(handle.node.ino)
        if node is not None:
            node.opens -= 1
            self._drop_if_unused(node)

    # -- deleting -------------------------------------------------------------------------
    async def delete(self, parent: int, name: bytes) -> None:
        """rmdir of `.snapshots/NAME`: the snapshot is deleted (EROFS anywhere deeper)."""
        if parent != TOP_INO:
            raise FsError(errno.EROFS)
        shown = name.decode("utf-8", "replace")
        try:
            await self.snapshots.delete(shown)
        except ObjectNotFound:
            raise FsError(errno.ENOENT) from None
        except ImgrepoError as exc:
            log.error("snapshot %s not deleted: %s", shown, exc)
            raise FsError(errno_for(exc)) from None
        ino = self._by_key.get((shown, ROOT_ID))
        if ino is not None:
            self.nodes[ino].parent = 0
