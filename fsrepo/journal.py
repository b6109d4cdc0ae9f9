"""The upload journal, in memory and on disk.

Every namespace change is appended here (durably, before the user is answered) and stays
until the manifest write that carries it has succeeded. The effective view of a directory
is always "its last known manifest + its pending ops", computed by `merge.apply_ops`, so the
same function decides what the user sees now and what the bucket will hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from .manifest import Entry
from .merge import Op
from .state import JournalOp, StateDB


@dataclass
class PendingOp:
    seq: int
    dir_id: str
    op: Op
    requires: int | None


class Journal:
    def __init__(self, db: StateDB) -> None:
        self.db = db
        self.by_dir: dict[str, list[PendingOp]] = {}
        self.by_seq: dict[int, PendingOp] = {}
        self.changed = trio.Event()  # set whenever something is appended

    def load(self, rows: list[JournalOp]) -> None:
        for row in rows:
            self._add(PendingOp(row.seq, row.dir_id, Op(row.name, row.entry, row.base),
                                row.requires))

    def _add(self, pending: PendingOp) -> None:
        self.by_dir.setdefault(pending.dir_id, []).append(pending)
        self.by_seq[pending.seq] = pending

    async def append(self, ops: list[tuple[str, Op, int | None]],
                     new_blobs: list[tuple[str, int]] = (),  # type: ignore[assignment]
                     dedup_bytes: int = 0, durable: bool = True) -> list[PendingOp]:
        """Record ops (dir_id, op, requires: negative = index into this call), fsync'd
        unless `durable` is False."""
        rows = [(d, op.name, op.entry, op.base, req) for d, op, req in ops]
        seqs = await self.db.run(self.db.state.append, rows, list(new_blobs), dedup_bytes,
                                 durable)
        added = []
        for seq, (dir_id, op, req) in zip(seqs, ops, strict=True):
            if req is not None and req < 0:
                req = seqs[-req - 1]
            pending = PendingOp(seq, dir_id, op, req)
            self._add(pending)
            added.append(pending)
        self.changed.set()
        self.changed = trio.Event()
        return added

    def ops_for(self, dir_id: str) -> list[Op]:
        return [p.op for p in self.by_dir.get(dir_id, ())]

    def retire(self, dir_id: str, seqs: list[int]) -> None:
        done = set(seqs)
        for seq in done:
            self.by_seq.pop(seq, None)
        remaining = [p for p in self.by_dir.get(dir_id, ()) if p.seq not in done]
        if remaining:
            self.by_dir[dir_id] = remaining
        else:
            self.by_dir.pop(dir_id, None)

    def redirect(self, dir_id: str, seq: int, name: bytes) -> None:
        for p in self.by_dir.get(dir_id, ()):
            if p.seq == seq:
                p.op = Op(name, p.op.entry, None)

    def referenced_blobs(self) -> set[str]:
        from .manifest import FileEntry
        return {p.op.entry.sha256 for p in self.by_seq.values()
                if isinstance(p.op.entry, FileEntry)}

    def __len__(self) -> int:
        return len(self.by_seq)


def entry_blob(entry: Entry | None) -> str | None:
    from .manifest import FileEntry
    return entry.sha256 if isinstance(entry, FileEntry) else None
