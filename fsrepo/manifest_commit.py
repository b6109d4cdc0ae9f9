"""Writing a batch of a directory's pending ops into its manifest in the bucket.

One read-modify-write per batch, conditional on the etag read (If-Match; If-None-Match for a
directory's first manifest). On 412 another machine wrote first: its version is re-read and
the ops re-applied onto it, a merge, not a failure.
"""

from __future__ import annotations

import logging

import trio

from .errors import ManifestError, ObjectNotFound, PreconditionFailed, StorageError
from .journal import Journal, PendingOp
from .manifest import DirEntry, Entry, FileEntry, Manifest, parse_manifest, serialise_manifest
from .merge import apply_ops, coalesce
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

    async def read_manifest(self, dir_id: str) -> tuple[dict[bytes, Entry], str | None]:
        try:
            obj = await self.store.get(manifest_key(dir_id))
        except ObjectNotFound:
            return {}, None
        assert isinstance(obj, StoredObject)
        manifest, problems = parse_manifest(obj.data, dir_id)
        for p in problems:
            log.warning("%s", p)
        return manifest.entries, obj.etag

    async def commit(self, dir_id: str, batch: list[PendingOp]) -> int:
        """Write `batch` into the directory's manifest; returns how many names conflicted
        (kept under another name)."""
        view = self.ns.views.get(dir_id)
        cached = None if view is None else (dict(view.remote), view.etag)
        if cached is None:
            row = await self.db.run(self.db.state.load_manifest, dir_id)
            if row is not None and (row[1] is not None or row[0] is None):
                try:
                    entries = (parse_manifest(row[1], dir_id)[0].entries if row[1] else {})
                    cached = (entries, row[0])
                except ManifestError:
                    cached = None
        remote, etag = cached if cached is not None else await self.read_manifest(dir_id)
        ops = [p.op for p in batch]
        # A removal that `requires` an earlier op is the source side of a rename.
        moved = {p.op.name for p in batch if p.op.entry is None and p.requires is not None}
        races = 0
        while True:
            entries = dict(remote)
            ops_now = await self._drop_unsafe_dir_removals(remote, ops, moved)
            diverted = apply_ops(entries, ops_now, self.host)
            body = serialise_manifest(Manifest(dir_id, entries))
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
                remote, etag = await self.read_manifest(dir_id)
                await trio.sleep(MERGE_PAUSE.delay(races))
        for name, where in diverted.items():
            log.warning("conflict in directory %s: %r was changed elsewhere; this "
                        "machine's version is kept as %r", dir_id, name, where)
        seqs = [p.seq for p in batch]
        await self.db.run(self.db.state.commit_dir, dir_id, new_etag, body, seqs)
        self.journal.retire(dir_id, seqs)
        self.remote.note_known({e.sha256 for e in entries.values() if isinstance(e, FileEntry)})
        self.ns.views.set_remote(dir_id, entries, new_etag)
        return len(diverted)

    async def _drop_unsafe_dir_removals(self, remote: dict[bytes, Entry], ops: list,
                                        moved: set[bytes]) -> list:
        """A directory removed here may have gained files on another machine meanwhile:
        then the removal is dropped, so their files stay reachable. The old name of a
        directory renamed away (to another parent: `moved`, or within this one) always
        goes: the directory lives on under its new name, content and all."""
        out = []
        moved_ids = {o.entry.id for o in ops if isinstance(o.entry, DirEntry)}
        for op in coalesce(ops):
            base = op.base
            if op.entry is None and isinstance(base, DirEntry) and remote.get(op.name) == base \
                    and op.name not in moved and base.id not in moved_ids:
                if op.name not in {o.name for o in ops if o.entry is not None}:
                    try:
                        child, _ = await self.read_manifest(base.id)
                    except ManifestError:
                        child = {}
                    if child:
                        # What this machine itself still has to take out of it (files
                        # deleted or moved away, not yet committed) does not count.
                        child = dict(child)
                        apply_ops(child, self.journal.ops_for(base.id), self.host)
                    if child:
                        log.warning("directory %r was removed here but another machine added "
                                    "files to it; keeping it", op.name)
                        continue
            out.append(op)
        return out
