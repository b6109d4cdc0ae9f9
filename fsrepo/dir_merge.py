"""Folder merge: a directory this machine created under a name that, meanwhile, another
machine gave a directory of its own, becomes part of theirs.

The name keeps their directory (the bucket's). Ours is merged into it: its content (its
manifest as this machine last wrote it, with the ops still pending applied) is put into
theirs name by name, by the ordinary three-way merge, so files with the same content are
one file, different content makes a conflict copy, and a same-named subdirectory merges
again, recursively. Its pending ops, and every op naming it, are re-targeted in one local
transaction (`Journal.merge_dir`); redoing a merge after a crash finds nothing left to move.
The inode of our directory is pointed at theirs, so a program working inside it (its cwd,
an open descriptor) keeps working; our directory's manifest is then deleted from the bucket
(a marker in the local state remembers that until it is done), so nothing is left that no
folder lists.
"""

from __future__ import annotations

import logging

from .errors import ManifestError, ObjectNotFound, StorageError
from .journal import Journal
from .manifest import Entry, FileEntry, parse_manifest
from .merge import apply_ops
from .merge_record import drop_marker, merge_markers
from .namespace import Namespace
from .paths import entry_path
from .repository import manifest_key
from .state import StateDB
from .store.base import Store

log = logging.getLogger(__name__)


class DirMerger:
    def __init__(self, store: Store, db: StateDB, journal: Journal, namespace: Namespace, *,
                 host: str) -> None:
        self.store = store
        self.db = db
        self.journal = journal
        self.ns = namespace
        self.host = host
        self._earlier_done = False

    async def merge(self, ours: str, theirs: str) -> bool:
        """Merge directory `ours` into `theirs`; False if there was nothing (left) to move.
        Its manifest is then for `drop_manifest` (once no commit of it is in flight)."""
        if ours == theirs or ours in self.journal.merged:
            return False
        # Theirs is loaded first: once our inode shows it, the files open in it (and those
        # being created there) are looked up in its view, which must be in memory.
        await self.ns.views.load(theirs)
        while True:
            seen = [p.seq for p in self.journal.by_dir.get(ours, ())]
            content = await self._content(ours)
            if content is None:
                return False
            # (ops read before the manifest: one committed in between is in both, and
            # applying it again changes nothing; `merge_dir` checks none came or went)
            changed = await self.journal.merge_dir(ours, theirs, content, seen)
            if changed is not None:
                break
        log.info("folder %s was also created on another machine: merged this machine's %d "
                 "entries into it", entry_path(self.ns.inodes, ours), len(content))
        self._point_inode(ours, theirs)
        view = self.ns.views.get(ours)
        if view is not None:
            self.ns.views.discard(view)
        self.ns.views.recompute(changed)
        return True

    async def finish_earlier(self) -> None:
        """Delete the manifests of directories merged away by an earlier run that crashed
        (or was offline) before it could."""
        if self._earlier_done:
            return
        for ours in await self.db.run(merge_markers, self.db.state):
            await self.drop_manifest(ours)
        self._earlier_done = True

    async def _content(self, ours: str) -> dict[bytes, Entry] | None:
        """What directory `ours` holds for this machine: its last manifest written from
        here, with the pending ops applied; None if it was merged away already."""
        ops = self.journal.ops_for(ours)
        row = await self.db.run(self.db.state.load_manifest, ours)
        if row is None and not ops:
            return None
        entries: dict[bytes, Entry] = {}
        if row is not None and row[1]:
            try:
                entries = parse_manifest(row[1], ours)[0].entries
            except ManifestError as exc:
                log.error("%s; merging the bucket's version", exc)
                entries = await self._from_bucket(ours)
        elif row is None:
            entries = await self._from_bucket(ours)
        # The ops the merge makes carry these entries into theirs: their blobs are in the
        # bucket (this manifest was there), and the commits need them known, or they would
        # wait for uploads that cannot start (a file the cache let go, in a new process;
        # see Namespace._carried).
        self.ns.known_blobs.note_known(
            {sha for e in entries.values() if isinstance(e, FileEntry) for sha, _ in e.blobs()})
        apply_ops(entries, ops, self.host)
        return entries

    async def _from_bucket(self, ours: str) -> dict[bytes, Entry]:
        try:
            obj = await self.store.get(manifest_key(ours))
        except ObjectNotFound:
            return {}
        return parse_manifest(obj.data, ours)[0].entries  # type: ignore[union-attr]

    def _point_inode(self, ours: str, theirs: str) -> None:
        node = self.ns.inodes.redirect_dir(ours, theirs)
        if node is None:
            return
        self.ns.invalidator.inode(node.ino)
        if node.parent:
            self.ns.invalidator.entry(node.parent, node.name)
        view = self.ns.views.get(theirs)
        for name in () if view is None else view.entries:
            self.ns.invalidator.entry(node.ino, name)

    async def drop_manifest(self, ours: str) -> None:
        """Delete the manifest of a directory merged away (no folder lists it, and no
        other machine knows it); its marker stays until that is done (a later run tries
        again)."""
        try:
            await self.store.delete(manifest_key(ours))
        except ObjectNotFound:
            pass
        except StorageError as exc:
            log.warning("cannot delete the manifest of directory %s yet: %s", ours, exc)
            return
        await self.db.run(drop_marker, self.db.state, ours)
