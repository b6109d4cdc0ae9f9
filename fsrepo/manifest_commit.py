"""Writing a batch of a directory's pending ops into its manifest in the bucket.

One read-modify-write per batch, conditional on the etag read (If-Match; If-None-Match for a
directory's first manifest). On 412 another machine wrote first: its version is re-read and
the ops re-applied onto it, a merge, not a failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from .chunking import ChunkLists
from .dir_merge import DirMerger
from .errors import ManifestError, ObjectNotFound, PreconditionFailed, StorageError
from .journal import Journal, PendingOp
from .manifest import DirEntry, Entry, Manifest, parse_manifest, serialise_manifest
from .manifest_cache import WrittenManifests
from .merge import Op, apply_ops, coalesce, later, moved_dirs, same_content
from .namespace import Namespace
from .paths import entry_path
from .repository import manifest_key
from .retry import Backoff
from .state import StateDB
from .store.base import Store, StoredObject

log = logging.getLogger(__name__)

# Between re-reads after a 412: not a failure (another writer won the race, and the merge
# onto its version goes at once), only a short random pause, so that writers racing on one
# directory do not collide again in step. After 99 lost races something is wrong.
MERGE_PAUSE = Backoff(first=0.01, cap=0.5, jitter=1.0, attempts=99)


class ManifestCommitter:
    """Commits batches of ops to directory manifests, merging with other writers."""

    def __init__(self, store: Store, db: StateDB, journal: Journal, namespace: Namespace,
                 chunk_lists: ChunkLists, *, host: str) -> None:
        self.store = store
        self.chunk_lists = chunk_lists  # what this machine's large files were cut into
        self.db = db
        self.journal = journal
        self.ns = namespace
        self.host = host
        self.merger = DirMerger(store, db, journal, namespace, host=host)
        self.written = WrittenManifests()  # what we last wrote, parsed: see manifest_cache
        self._in_flight: set[str] = set()  # directories being committed now
        # removed while their own commit was in flight: finished when it is done
        self._removed: dict[str, Removal] = {}
        self._merged_away: set[str] = set()  # merged while their commit was in flight
        # this session's conflict copies, as paths: (the name written, the copy's name)
        self.conflict_copies: list[tuple[str, str]] = []

    async def read_manifest(self, dir_id: str) -> tuple[dict[bytes, Entry], str | None]:
        manifest, etag = await self.read_full(dir_id)
        return manifest.entries, etag

    async def read_full(self, dir_id: str) -> tuple[Manifest, str | None]:
        """The directory's manifest in the bucket (entries and removal records), with its
        etag (None: there is none yet)."""
        try:
            obj = await self.store.get(manifest_key(dir_id))
        except ObjectNotFound:
            return Manifest(dir_id), None
        assert isinstance(obj, StoredObject)
        manifest, problems = parse_manifest(obj.data, dir_id)
        for p in problems:
            log.warning("%s", p)
        return manifest, obj.etag

    async def _last_known(self, dir_id: str) -> tuple[Manifest, str | None]:
        """The manifest as last seen (the local state's copy, kept with every fetch and
        write; the one this machine wrote last is kept parsed), else as the bucket has it."""
        row = await self.db.run(self.db.state.load_manifest, dir_id)
        if row is not None and (row[1] is not None or row[0] is None):
            kept = self.written.get(dir_id, row[0], row[1])
            if kept is not None:
                return kept, row[0]
            try:
                manifest = parse_manifest(row[1], dir_id)[0] if row[1] else Manifest(dir_id)
                return manifest, row[0]
            except ManifestError:
                pass
        return await self.read_full(dir_id)

    async def commit(self, dir_id: str, batch: list[PendingOp]) -> int:
        """Write `batch` into the directory's manifest; returns how many conflict copies it
        made (names kept under another name), each also in `conflict_copies`."""
        self._in_flight.add(dir_id)
        try:
            return await self._commit(dir_id, batch)
        finally:
            self._in_flight.discard(dir_id)
            removal = self._removed.pop(dir_id, None)
            if removal is not None:
                await self._finish_removal(dir_id, removal)
            if dir_id in self._merged_away:
                self._merged_away.discard(dir_id)
                self.written.forget(dir_id)
                await self.merger.drop_manifest(dir_id)

    async def _commit(self, dir_id: str, batch: list[PendingOp]) -> int:
        known, etag = await self._last_known(dir_id)
        based_on = etag  # the version the views were computed from, unless `races`
        remote, records = known.entries, known.moved
        had_manifest = etag is not None
        await self.merger.finish_earlier()
        # A removal that `requires` an earlier op is the source side of a rename.
        moved = {p.op.name for p in batch if p.op.entry is None and p.requires is not None}
        races = 0
        names_at = max((p.names_at for p in batch if p.names_at), default=None)
        marked: dict[str, Removal] = {}  # marked removed in any round (see below)
        merged_any = False
        while True:
            entries = dict(remote)
            ops = [p.op for p in batch]  # (a folder merge re-targets them in place)
            ops_now, emptied = await self._drop_unsafe_dir_removals(dir_id, remote, ops, moved)
            # A directory marked in an earlier round and not in this one left this folder
            # meanwhile (it is finished like the others: its mark must not stay behind).
            marked.update(emptied)
            ops_now = await self._yield_to_earlier_renames(dir_id, remote, records, ops_now)
            merged: dict[str, str] = {}
            diverted = apply_ops(entries, ops_now, self.host, merged=merged,
                                 moved=self._moved_anywhere())
            entries = self.chunk_lists.with_chunks(entries, {op.name for op in ops_now}
                                                   | set(diverted.values()))
            if merged and await self._merge_dirs(merged):
                merged_any = True  # (the journal changed under the views: recompute whole)
                continue  # the ops changed: apply them again
            gone = known.removed is not None or (etag is None and had_manifest)
            skip = (gone and not (entries and self._adds_to(dir_id, remote))) \
                or dir_id in self.journal.merged
            if skip:
                # removed (here or elsewhere) with nothing of ours to keep in it, or merged
                # into another directory meanwhile (the merge carried these ops along)
                break
            mtime_ns = later(known.mtime_ns, names_at)
            written = Manifest(dir_id, entries, self._moves_out(
                dir_id, remote, entries, records, ops_now, moved), mtime_ns=mtime_ns)
            body, fragments = self.written.serialise(dir_id, written)
            try:
                if etag is None:
                    new_etag = await self.store.put(manifest_key(dir_id), body,
                                                    if_none_match=True)
                else:
                    new_etag = await self.store.put(manifest_key(dir_id), body, if_match=etag)
                break
            except (PreconditionFailed, ObjectNotFound):
                # Someone else wrote it: merge onto their version.
                races += 1
                if MERGE_PAUSE.gives_up(races):
                    raise StorageError(f"directory {dir_id}: too many concurrent "
                                       "writers") from None
                known, etag = await self.read_full(dir_id)
                remote, records = known.entries, known.moved
                await trio.sleep(MERGE_PAUSE.delay(races))
        if skip:
            await self.db.run(self.db.state.drop_ops, [p.seq for p in batch])
            self.journal.retire(dir_id, [p.seq for p in batch])
            for removed_id, removal in marked.items():
                await self._retire_removed(removed_id, removal)
            return 0
        copies = 0
        for name, where in diverted.items():
            path, copy = entry_path(self.ns.inodes, dir_id, name), \
                entry_path(self.ns.inodes, dir_id, where)
            if (path, copy) not in self.conflict_copies:
                self.conflict_copies.append((path, copy))
                copies += 1
            log.warning("conflict: %s was changed on another machine too; this machine's "
                        "version is kept as %s", path, copy)
        seqs = [p.seq for p in batch]
        await self.db.run(self.db.state.commit_dir, dir_id, new_etag, body, seqs)
        self.written.keep(dir_id, new_etag, body, written, fragments)
        self.journal.retire(dir_id, seqs)
        names = {p.op.name for p in batch} | set(diverted.values())
        if races or diverted or gone or marked or merged_any:
            self.ns.views.set_remote(dir_id, entries, new_etag, mtime_ns)
        else:  # only the batch's names changed since the version the view was computed on
            self.ns.views.committed(dir_id, entries, new_etag, mtime_ns, based_on, names)
        if gone:
            await self._keep_alive_where(dir_id, known)
        await self._retire_removed_dirs(marked, entries)
        return copies

    def _adds_to(self, dir_id: str, remote: dict[bytes, Entry]) -> bool:
        """Whether this machine's pending ops, all of them (not only the batch being
        committed), leave something in a removed directory. A batch carrying a file this
        machine removed since (and then the directory: the removal that marked it) is no
        addition to keep the directory alive for; once the removal has landed, those ops
        have left the journal, and nothing is left either."""
        entries = dict(remote)
        apply_ops(entries, self.journal.ops_for(dir_id), self.host)
        return bool(entries)

    async def _keep_alive_where(self, dir_id: str, known: Manifest) -> None:
        """We added entries to a directory being removed (its removal mark says where
        from) or removed (its manifest was gone: where our inode or views had it): it is
        put back there."""
        if known.removed is not None:
            await self._keep_alive(dir_id, known.removed)
            return
        node = self.ns.inodes.of_dir(dir_id)
        parent = None if node is None or node.parent == 0 else self.ns.inodes.get(node.parent)
        if node is not None and parent is not None and parent.dir_id is not None:
            await self._keep_alive(dir_id, (parent.dir_id, node.name))
            return
        places = self._places_of(dir_id, dir_id)
        if places:
            await self._keep_alive(dir_id, places[0])
            return
        log.error("folder %s was removed on another machine while this machine added to "
                  "it, and no folder of this machine lists it: its entries stay in the "
                  "bucket, unlisted (see imgrepo-mount --verify)", entry_path(self.ns.inodes,
                                                                              dir_id))

    async def _keep_alive(self, dir_id: str, where: tuple[str, bytes]) -> None:
        """Another machine removed (or is removing) a directory this machine just added
        entries to: it is put back under its name, so the additions stay reachable."""
        parent, name = where
        log.warning("folder %s was removed on one machine while files were added to it "
                    "on another; keeping it", entry_path(self.ns.inodes, parent, name))
        entry = DirEntry(dir_id, time.time_ns(), 0o755)
        await self.ns.settle(self.ns.record_fix(parent, Op(name, entry, None), None))

    def _moved_anywhere(self) -> set[str]:
        """Directories a pending op removes from a name: putting one of them under another
        name is a rename, never a new directory to merge."""
        return moved_dirs([p.op for p in self.journal.by_seq.values()])

    async def _merge_dirs(self, merged: dict[str, str]) -> bool:
        """New directories of ours met theirs under the same names: merge them (see
        `dir_merge`); whether anything moved."""
        moved = False
        for ours, theirs in merged.items():
            if await self.merger.merge(ours, theirs):
                moved = True
                await self._drop_when_idle(ours)
        return moved

    async def _drop_when_idle(self, dir_id: str) -> None:
        """Delete a directory's manifest now, or when its commit in flight is done."""
        if dir_id in self._in_flight:
            self._merged_away.add(dir_id)
        else:
            self.written.forget(dir_id)
            await self.merger.drop_manifest(dir_id)

    async def _retire_removed_dirs(self, emptied: dict[str, Removal],
                                   entries: dict[bytes, Entry]) -> None:
        """Directories this commit removed (found empty and marked removed, not renamed):
        their own pending ops are dropped, and their manifests stay as their marks (see
        `_finish_removal`), so no manifest is left that no folder lists but a mark; a
        directory still listed here after all loses its mark."""
        if not emptied:
            return
        still = {e.id for e in entries.values() if isinstance(e, DirEntry)}
        wanted = {p.op.entry.id for p in self.journal.by_seq.values()
                  if isinstance(p.op.entry, DirEntry)}
        for dir_id, removal in emptied.items():
            if dir_id in still or dir_id in wanted:
                await self._clear_mark(dir_id, removal)  # it lives on after all
                continue
            await self._retire_removed(dir_id, removal)

    async def _retire_removed(self, dir_id: str, removal: Removal) -> None:
        """A directory found empty (with this machine's pending ops applied) left its
        folder: those ops need not go anywhere now, but the subdirectories they remove
        are removed the same way (marked). A subdirectory another machine added files to
        meanwhile is put back, and so (by its mark, when this put-back is committed) is
        this directory: the path to those files stays, holding only what was added."""
        left = list(self.journal.by_dir.get(dir_id, ()))
        moved = {p.op.name for p in left if p.op.entry is None and p.requires is not None}
        subdirs = [(op.name, op.base) for op in coalesce([p.op for p in left])
                   if op.entry is None and isinstance(op.base, DirEntry)
                   and op.name not in moved]
        if left:
            await self.db.run(self.db.state.drop_ops, [p.seq for p in left])
            self.journal.forget(left)
        for name, base in subdirs:
            assert isinstance(base, DirEntry)
            mark = await self._mark_removed(base.id, dir_id, name)
            if mark is None:
                log.warning("folder %s was removed here with its folder, but another "
                            "machine added files to it; keeping both",
                            entry_path(self.ns.inodes, dir_id, name))
                await self.ns.settle(self.ns.record_fix(dir_id, Op(name, base, None), None))
                continue
            await self._retire_removed(base.id, Removal(mark, dir_id, name))
        if dir_id in self._in_flight:
            self._removed[dir_id] = removal
        else:
            await self._finish_removal(dir_id, removal)

    async def _clear_mark(self, dir_id: str, removal: Removal) -> None:
        """Take our removal mark off a directory that stays listed (if it still has it)."""
        self.written.forget(dir_id)
        try:
            manifest, etag = await self.read_full(dir_id)
            if etag == removal.etag:
                body = serialise_manifest(Manifest(dir_id, manifest.entries, manifest.moved,
                                                   mtime_ns=manifest.mtime_ns))
                await self.store.put(manifest_key(dir_id), body, if_match=etag)
        except (PreconditionFailed, ObjectNotFound):
            pass  # written meanwhile: whoever wrote it dropped the mark
        except (StorageError, ManifestError) as exc:
            log.warning("cannot clear the removal mark of folder %s: %s",
                        entry_path(self.ns.inodes, removal.parent, removal.entry_name), exc)

    async def _finish_removal(self, dir_id: str, removal: Removal) -> None:
        """The removal landed in the parent: if another machine added entries to the
        directory meanwhile (over our mark), put it back (their additions keep it alive).
        Otherwise the mark stays, a tombstone (`--gc` deletes old ones): deleting it
        here could delete an addition landing between our read and the delete (S3 has
        no conditional delete), and a machine adding to the directory later finds the
        mark and puts the directory back itself."""
        try:
            manifest, etag = await self.read_full(dir_id)
        except (StorageError, ManifestError) as exc:
            log.warning("cannot finish removing folder %s: %s",
                        entry_path(self.ns.inodes, removal.parent, removal.entry_name), exc)
            return
        if etag is None or etag == removal.etag \
                or (manifest.removed is not None and not manifest.entries):
            return
        await self._keep_alive(dir_id, (removal.parent, removal.entry_name))

    async def _yield_to_earlier_renames(self, dir_id: str, remote: dict[bytes, Entry],
                                        records: dict[str, tuple[str, bytes]],
                                        ops: list[Op]) -> list[Op]:
        """One directory renamed to two names on two machines: the rename that lands first
        wins. Ours, finding its source name gone and the directory under another name in
        this folder, or moved to another folder (`records`), takes back its own addition:
        here (a rename within this folder) or, for a move to another folder (already
        committed there), by removing it there."""
        where = {e.id: (dir_id, name) for name, e in remote.items() if isinstance(e, DirEntry)}
        lost: dict[str, tuple[str, bytes]] = {}  # our renamed directory -> where it is now
        for op in coalesce(ops):
            base = op.base
            if op.entry is not None or not isinstance(base, DirEntry):
                continue
            now_at = where.get(base.id) or records.get(base.id)
            if now_at is not None and now_at != (dir_id, op.name):
                lost[base.id] = now_at
        if not lost:
            return ops
        out = []
        for op in ops:
            entry = op.entry
            if isinstance(entry, DirEntry) and entry.id in lost and op.base is None \
                    and lost[entry.id] != (dir_id, op.name):
                log.warning("folder %s was renamed on another machine first (to %s): this "
                            "machine's rename of it is taken back",
                            entry_path(self.ns.inodes, dir_id, op.name),
                            entry_path(self.ns.inodes, *lost[entry.id]))
                continue
            out.append(op)
        for moved_id, now_at in lost.items():
            if not any(isinstance(o.entry, DirEntry) and o.entry.id == moved_id for o in ops):
                await self._take_back_move(dir_id, moved_id, now_at)
        return out

    async def _take_back_move(self, source: str, moved_id: str,
                              now_at: tuple[str, bytes]) -> None:
        """Our move of directory `moved_id` out of `source` lost to another machine's rename
        (to `now_at`): remove the name our move gave it in the other folder (none if that
        is where it is now: then this is our own move, landed before a crash)."""
        for view_id, name in self._places_of(moved_id, source):
            if (view_id, name) == now_at:
                continue
            log.warning("folder %s was renamed on another machine first (to %s): this "
                        "machine's move of it to %s is taken back",
                        entry_path(self.ns.inodes, moved_id), entry_path(self.ns.inodes, *now_at),
                        entry_path(self.ns.inodes, view_id, name))
            entry = self.ns.views.get(view_id).entries[name]  # type: ignore[union-attr]
            assert isinstance(entry, DirEntry)
            await self.ns.settle(self.ns.record_fix(view_id, Op(name, None, entry), 0))

    def _places_of(self, dir_id: str, source: str) -> list[tuple[str, bytes]]:
        """Where the loaded views (but `source`'s) list a directory."""
        out = []
        for view_id in self.ns.views:
            view = self.ns.views.get(view_id)
            if view is None or view_id == source:
                continue
            out += [(view_id, name) for name, entry in view.entries.items()
                    if isinstance(entry, DirEntry) and entry.id == dir_id]
        return out

    def _moves_out(self, dir_id: str, remote: dict[bytes, Entry], entries: dict[bytes, Entry],
                   records: dict[str, tuple[str, bytes]], ops: list[Op],
                   moved: set[bytes]) -> dict[str, tuple[str, bytes]]:
        """The removal records to write: those there (but of directories listed here again),
        plus one for each directory this commit moves out to another folder (where our
        views show it now)."""
        here = {e.id for e in entries.values() if isinstance(e, DirEntry)}
        out = {k: v for k, v in records.items() if k not in here}
        for op in coalesce(ops):
            base = op.base
            if op.entry is None and isinstance(base, DirEntry) and op.name in moved \
                    and isinstance(remote.get(op.name), DirEntry) \
                    and remote[op.name].id == base.id:  # type: ignore[union-attr]
                places = self._places_of(base.id, dir_id)
                if places:
                    out.pop(base.id, None)
                    out[base.id] = places[0]
        return out

    async def _drop_unsafe_dir_removals(self, dir_id: str, remote: dict[bytes, Entry],
                                        ops: list[Op], moved: set[bytes]
                                        ) -> tuple[list[Op], dict[str, Removal]]:
        """A directory removed (or replaced) here may have gained files on another machine
        meanwhile: then it stays, so their files stay reachable (a removal is dropped; a
        replacement becomes a create, which meets their directory and merges or is kept
        beside it). Otherwise it is marked removed (`_mark_removed`) before its name goes.
        The old name of a directory renamed away (to another parent: `moved`, or within
        this one) always goes: it lives on under its new name, content and all. Also
        returns the directories marked removed."""
        out = []
        emptied: dict[str, Removal] = {}
        moved_ids = {o.entry.id for o in ops if isinstance(o.entry, DirEntry)}
        for op in coalesce(ops):
            base = op.base
            if isinstance(base, DirEntry) and same_content(remote.get(op.name), base) \
                    and op.name not in moved and base.id not in moved_ids \
                    and not (isinstance(op.entry, DirEntry) and op.entry.id == base.id):
                mark = await self._mark_removed(base.id, dir_id, op.name)
                if mark is not None:
                    emptied[base.id] = Removal(mark, dir_id, op.name)
                elif op.entry is None:
                    log.warning("folder %s was removed here but another machine added "
                                "files to it; keeping it", entry_path(self.ns.inodes, dir_id,
                                                                      op.name))
                    continue
                else:
                    op = Op(op.name, op.entry, None)
            out.append(op)
        return out, emptied

    async def _mark_removed(self, dir_id: str, parent: str, name: bytes) -> str | None:
        """If the directory holds nothing this machine is not about to take out of it,
        write its removal mark (conditional on the version read, so an addition landing
        meanwhile is seen) and return the mark's etag; None if it gained entries. Its
        pending ops are read before its manifest: ops that land in between are then in
        the manifest read, and applying them again changes nothing."""
        self.written.forget(dir_id)
        for _ in range(MERGE_PAUSE.attempts):
            own = self.journal.ops_for(dir_id)
            try:
                manifest, etag = await self.read_full(dir_id)
            except ManifestError:
                return None
            child = dict(manifest.entries)
            apply_ops(child, own, self.host)
            if child:
                return None
            body = serialise_manifest(Manifest(dir_id, {}, manifest.moved, (parent, name)))
            try:
                if etag is None:
                    return await self.store.put(manifest_key(dir_id), body,
                                                if_none_match=True)
                return await self.store.put(manifest_key(dir_id), body, if_match=etag)
            except (PreconditionFailed, ObjectNotFound):
                continue
        raise StorageError(f"directory {dir_id}: too many concurrent writers")


@dataclass(frozen=True)
class Removal:
    """A directory this machine marked removed: the mark's etag, and where it was."""

    etag: str
    parent: str
    entry_name: bytes
