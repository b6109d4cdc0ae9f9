"""The upload journal, in memory and on disk.

Every namespace change is recorded here and stays until the manifest write that carries
it has succeeded. The effective view of a directory is always "its last known manifest +
its pending ops", computed by `merge.apply_ops`, so the same function decides what the user
sees now and what the bucket will hold.

Recording is synchronous (the op takes its place in order at once, so callers need no lock
between checking a name and changing it); writing it is a separate await, and concurrent
callers share one SQLite transaction. A written op survives a crash of the process (the
WAL is in the kernel's hands); the group commit (group_commit.py) makes it survive a power
loss, once per interval or when an fsync asks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from .manifest import DirEntry, Entry, FileEntry
from .merge import Op
from .merge_record import OpRow, write_dir_merge
from .state import JournalOp, StateDB

log = logging.getLogger(__name__)


@dataclass
class PendingOp:
    seq: int
    dir_id: str
    op: Op
    requires: int | None
    written: bool = True  # in the database (the uploader carries only those)
    # When it created, removed or renamed a name (the directory's new mtime); None for a
    # change of an entry's content or attributes. Kept in memory; after a restart a pending
    # creation or removal counts from `recorded`.
    names_at: int | None = None
    # When it was recorded (time.time()), written with it: not when the write happened,
    # which may come after a later utimens of the folder (whose time must still win).
    recorded: float = field(default_factory=time.time)


@dataclass
class Record:
    """One caller's ops on their way into the database."""

    pending: list[PendingOp]
    new_blobs: list[tuple[str, int]]
    dedup_bytes: int
    done: bool = False
    error: BaseException | None = None
    dirs: set[str] = field(default_factory=set)


class Journal:
    def __init__(self, db: StateDB) -> None:
        self.db = db
        self.by_dir: dict[str, list[PendingOp]] = {}
        self.by_seq: dict[int, PendingOp] = {}
        self.changed = trio.Event()  # set whenever something is recorded
        self._next_seq = 1
        self._queue: list[Record] = []
        self._writer = trio.Lock()
        self.merged: dict[str, str] = {}  # directory merged away -> the one it went into
        self.writes = 0  # transactions written so far (the group commit covers them)

    def load(self, rows: list[JournalOp]) -> None:
        for row in rows:
            # A name change replayed after a restart keeps the time it was recorded at (not
            # this start's), so a later utimens of the folder still wins over it.
            names_at = int(row.created * 1e9) if row.entry is None or row.base is None \
                else None
            self._add(PendingOp(row.seq, row.dir_id, Op(row.name, row.entry, row.base),
                                row.requires, names_at=names_at, recorded=row.created))
            self._next_seq = max(self._next_seq, row.seq + 1)

    def _add(self, pending: PendingOp) -> None:
        self.by_dir.setdefault(pending.dir_id, []).append(pending)
        self.by_seq[pending.seq] = pending

    def record(self, ops: list[tuple[str, Op, int | None]],
               new_blobs: list[tuple[str, int]] | tuple = (), dedup_bytes: int = 0) -> Record:
        """Take ops (dir_id, op, requires: negative = index into this call) into the
        journal's order now; `write` then writes them."""
        pending: list[PendingOp] = []
        for dir_id, op, req in ops:
            dir_id = self.merged.get(dir_id, dir_id)  # a caller that still had the old id
            seq = self._next_seq
            self._next_seq += 1
            if req is not None and req < 0:
                req = pending[-req - 1].seq
            p = PendingOp(seq, dir_id, op, req, written=False)
            self._add(p)
            pending.append(p)
        rec = Record(pending, list(new_blobs), dedup_bytes, dirs={d for d, _, _ in ops})
        self._queue.append(rec)
        return rec

    async def write(self, rec: Record) -> None:
        """Write the record (and whatever else is queued) in one transaction. On failure
        the record's ops leave the journal again."""
        async with self._writer:
            if not rec.done:
                batch, self._queue = self._queue, []
                rows = [([(p.dir_id, p.op.name, p.op.entry, p.op.base, p.requires, p.seq,
                           p.recorded)
                          for p in b.pending if p.seq in self.by_seq], b.new_blobs, b.dedup_bytes) for b in batch]
                try:
                    await self.db.run(self.db.state.append_many, rows)
                except BaseException as exc:
                    for b in batch:
                        b.done, b.error = True, exc
                        self.forget(b.pending)
                    raise
                self.writes += 1
                for b in batch:
                    b.done = True
                    for p in b.pending:
                        p.written = True
                self.changed.set()
                self.changed = trio.Event()
        if rec.error is not None:
            raise rec.error

    async def write_queued(self) -> None:
        """Write whatever is recorded and not written yet (new files' names)."""
        if self._queue:
            await self.write(self._queue[-1])

    @property
    def unwritten(self) -> bool:
        return bool(self._queue)

    @property
    def version(self) -> tuple[int, int, int, int]:
        """Changes whenever ops are recorded, written, retired, dropped or re-targeted by a
        merge: what a cache of something computed from the ops compares."""
        return self._next_seq, len(self.by_seq), self.writes, len(self.merged)

    async def write_behind(self, interval: float = 0.1) -> None:
        """Write records nobody waits for (new files' names) soon, even if no other
        change comes along to carry them."""
        while True:
            await trio.sleep(interval)
            try:
                await self.write_queued()
            except Exception as exc:  # noqa: BLE001 - logged; the next round retries
                log.error("cannot write the journal: %s", exc)

    def forget(self, pending: list[PendingOp]) -> None:
        for p in pending:
            self.by_seq.pop(p.seq, None)
            ops = self.by_dir.get(p.dir_id)
            if ops is not None:
                ops[:] = [q for q in ops if q.seq != p.seq]
                if not ops:
                    del self.by_dir[p.dir_id]

    async def merge_dir(self, ours: str, theirs: str, content: dict[bytes, Entry],
                        seen: list[int]) -> set[str] | None:
        """Directory `ours` is merged into `theirs`: its pending ops are replaced by puts of
        its whole `content` (its manifest with those ops applied) into `theirs`, and every
        op naming `ours` as an entry or base names `theirs` instead. One transaction, which
        also leaves the merge marker; returns the directories whose ops changed. None if
        the ops of `ours` are no longer `seen` (the seqs `content` was computed with:
        some were committed or added meanwhile): compute it again."""
        while self._queue:  # everything recorded so far is in the database first
            await self.write(self._queue[-1])
        async with self._writer:
            dropped = list(self.by_dir.get(ours, ()))
            if [p.seq for p in dropped] != seen:
                return None
            added = [PendingOp(self._next_seq + i, theirs, Op(name, entry, None), None,
                               written=False)
                     for i, (name, entry) in enumerate(sorted(content.items()))]
            self._next_seq += len(added)
            by_name = {p.op.name: p.seq for p in added}
            gone = {p.seq: by_name.get(p.op.name) for p in dropped}
            rewritten: list[tuple[PendingOp, Op, int | None]] = []
            for p in self.by_seq.values():
                if p.dir_id == ours:
                    continue
                op = Op(p.op.name, _renamed(p.op.entry, ours, theirs),
                        _renamed(p.op.base, ours, theirs), p.op.passed)
                requires = gone.get(p.requires, p.requires) if p.requires in gone \
                    else p.requires
                if op != p.op or requires != p.requires:
                    rewritten.append((p, op, requires))
            # Memory first (no await in between: what is recorded meanwhile sees the
            # merge), then the database; a failed write puts memory back.
            self.forget(dropped)
            for p in added:
                self._add(p)
            undo = [(p, p.op, p.requires) for p, _, _ in rewritten]
            for p, op, req in rewritten:
                p.op, p.requires = op, req
            self.merged[ours] = theirs
            try:
                await self.db.run(
                    write_dir_merge, self.db.state, ours, theirs, [p.seq for p in dropped],
                    [OpRow(p.seq, p.dir_id, p.op.name, p.op.entry, p.op.base, None)
                     for p in added],
                    [OpRow(p.seq, p.dir_id, op.name, op.entry, op.base, req)
                     for p, op, req in rewritten if p.written])
            except BaseException:
                del self.merged[ours]
                self.forget(added)
                for p in dropped:
                    self._add(p)
                for p, op, req in undo:
                    p.op, p.requires = op, req
                raise
            for p in added:
                p.written = True
            for source, into in self.merged.items():
                if into == ours:
                    self.merged[source] = theirs
            self.changed.set()
            self.changed = trio.Event()
        return {theirs} | {p.dir_id for p, _, _ in rewritten}

    def ops_for(self, dir_id: str) -> list[Op]:
        return [p.op for p in self.by_dir.get(dir_id, ())]

    def blobs_needed(self) -> set[str]:
        """The blobs the pending ops' file entries name."""
        return {p.op.entry.sha256 for p in self.by_seq.values()
                if isinstance(p.op.entry, FileEntry)}

    def names_changed_at(self, dir_id: str) -> int | None:
        """When pending ops last created, removed or renamed a name in the directory."""
        return max((p.names_at for p in self.by_dir.get(dir_id, ()) if p.names_at),
                   default=None)

    def retire(self, dir_id: str, seqs: list[int]) -> None:
        done = set(seqs)
        for seq in done:
            self.by_seq.pop(seq, None)
        remaining = [p for p in self.by_dir.get(dir_id, ()) if p.seq not in done]
        if remaining:
            self.by_dir[dir_id] = remaining
        else:
            self.by_dir.pop(dir_id, None)

    def __len__(self) -> int:
        return len(self.by_seq)


def _renamed(entry: Entry | None, old: str, new: str) -> Entry | None:
    """The entry with directory id `old` replaced by `new` (other entries as they are)."""
    if isinstance(entry, DirEntry) and entry.id == old:
        return DirEntry(new, entry.mtime_ns, entry.mode)
    return entry
