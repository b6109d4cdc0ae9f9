"""Writing a batch of a directory's pending ops into its manifest in the bucket.

One read-modify-write per batch, conditional on the etag read (If-Match; If-None-Match for a
directory's first manifest). On 412 another machine wrote first: its version is re-read and
the ops re-applied onto it, a merge, not a failure.
"""

from __future__ import annotations

import logging

import trio

from .dir_merge import DirMerger
from .errors import ManifestError, ObjectNotFound, PreconditionFailed, StorageError
from .journal import Journal, PendingOp
from .manifest import DirEntry, Entry, FileEntry, Manifest, parse_manifest, serialise_manifest
from .merge import Op, apply_ops, coalesce, moved_dirs
from .namespace import Namespace
from .remote_index import RemoteIndex
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
                 remote: RemoteIndex, *, host: str) -> None:
        self.store = store
        self.db = db
        self.journal = journal
        self.ns = namespace
        self.remote = remote
        self.host = host
        self.merger = DirMerger(store, db, journal, namespace, host=host)
        self._in_flight: set[str] = set()  # directories being committed now
        self._removed: set[str] = set()  # removed while their own commit was in flight

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
        write), else as the bucket has it."""
        row = await self.db.run(self.db.state.load_manifest, dir_id)
        if row is not None and (row[1] is not None or row[0] is None):
            try:
                manifest = parse_manifest(row[1], dir_id)[0] if row[1] else Manifest(dir_id)
                return manifest, row[0]
            except ManifestError:
                pass
        return await self.read_full(dir_id)

    async def commit(self, dir_id: str, batch: list[PendingOp]) -> int:
        """Write `batch` into the directory's manifest; returns how many names conflicted
        (kept under another name)."""
        self._in_flight.add(dir_id)
        try:
            return await self._commit(dir_id, batch)
        finally:
            self._in_flight.discard(dir_id)
            if dir_id in self._removed and not self.journal.by_dir.get(dir_id):
                self._removed.discard(dir_id)
                await self.merger.drop_manifest(dir_id)

    async def _commit(self, dir_id: str, batch: list[PendingOp]) -> int:
        known, etag = await self._last_known(dir_id)
        remote, records = known.entries, known.moved
        await self.merger.finish_earlier()
        # A removal that `requires` an earlier op is the source side of a rename.
        moved = {p.op.name for p in batch if p.op.entry is None and p.requires is not None}
        races = 0
        while True:
            entries = dict(remote)
            ops = [p.op for p in batch]  # (a folder merge re-targets them in place)
            ops_now, emptied = await self._drop_unsafe_dir_removals(remote, ops, moved)
            ops_now = await self._yield_to_earlier_renames(dir_id, remote, records, ops_now)
            merged: dict[str, str] = {}
            diverted = apply_ops(entries, ops_now, self.host, merged=merged,
                                 moved=self._moved_anywhere())
            if merged and await self._merge_dirs(merged):
                continue  # the ops changed: apply them again
            body = serialise_manifest(Manifest(dir_id, entries, self._moves_out(
                dir_id, remote, entries, records, ops_now, moved)))
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
        for name, where in diverted.items():
            log.warning("conflict in directory %s: %r was changed elsewhere; this "
                        "machine's version is kept as %r", dir_id, name, where)
        seqs = [p.seq for p in batch]
        await self.db.run(self.db.state.commit_dir, dir_id, new_etag, body, seqs)
        self.journal.retire(dir_id, seqs)
        self.remote.note_known({e.sha256 for e in entries.values() if isinstance(e, FileEntry)})
        self.ns.views.set_remote(dir_id, entries, new_etag)
        await self._drop_removed_manifests(emptied, entries)
        return len(diverted)

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
            self._removed.add(dir_id)
        else:
            await self.merger.drop_manifest(dir_id)

    async def _drop_removed_manifests(self, emptied: set[str],
                                      entries: dict[bytes, Entry]) -> None:
        """The manifests of directories this commit removed (checked empty, not renamed)
        are deleted from the bucket: no manifest is left that no folder lists."""
        still = {e.id for e in entries.values() if isinstance(e, DirEntry)}
        wanted = {p.op.entry.id for p in self.journal.by_seq.values()
                  if isinstance(p.op.entry, DirEntry)}
        for dir_id in emptied - still - wanted:
            # Its own pending ops only take out what is there (it was found empty with
            # them applied): they need not go anywhere now.
            left = list(self.journal.by_dir.get(dir_id, ()))
            if left:
                await self.db.run(self.db.state.drop_ops, [p.seq for p in left])
                self.journal.forget(left)
            await self._drop_when_idle(dir_id)

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
                log.warning("directory %r in %s was renamed on another machine first (to "
                            "%r): this machine's rename of it is taken back", op.name,
                            dir_id, lost[entry.id][1])
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
            log.warning("directory %s was renamed on another machine first (to %r): this "
                        "machine's move of it to %r is taken back", moved_id, now_at[1], name)
            entry = self.ns.views.get(view_id).entries[name]  # type: ignore[union-attr]
            assert isinstance(entry, DirEntry)
            await self.ns.settle(self.ns.record_take_back(view_id, name, entry))

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

    async def _drop_unsafe_dir_removals(self, remote: dict[bytes, Entry], ops: list[Op],
                                        moved: set[bytes]) -> tuple[list[Op], set[str]]:
        """A directory removed (or replaced) here may have gained files on another machine
        meanwhile: then it stays, so their files stay reachable (a removal is dropped; a
        replacement becomes a create, which meets their directory and merges or is kept
        beside it). The old name of a directory renamed away (to another parent: `moved`,
        or within this one) always goes: it lives on under its new name, content and all.
        Also returns the directories found empty here and removed (their manifests go)."""
        out = []
        emptied: set[str] = set()
        moved_ids = {o.entry.id for o in ops if isinstance(o.entry, DirEntry)}
        for op in coalesce(ops):
            base = op.base
            if isinstance(base, DirEntry) and remote.get(op.name) == base \
                    and op.name not in moved and base.id not in moved_ids \
                    and not (isinstance(op.entry, DirEntry) and op.entry.id == base.id):
                if not await self._gained_entries(base.id):
                    emptied.add(base.id)
                elif op.entry is None:
                    log.warning("directory %r was removed here but another machine added "
                                "files to it; keeping it", op.name)
                    continue
                else:
                    op = Op(op.name, op.entry, None)
            out.append(op)
        return out, emptied

    async def _gained_entries(self, dir_id: str) -> bool:
        """Whether a directory holds anything this machine is not about to take out of it
        (its pending ops are read first: ops that land meanwhile are then in the manifest
        read, and applying them again changes nothing)."""
        own = self.journal.ops_for(dir_id)
        try:
            child, _ = await self.read_manifest(dir_id)
        except ManifestError:
            return False
        child = dict(child)
        apply_ops(child, own, self.host)
        return bool(child)
