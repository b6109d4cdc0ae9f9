"""The local state's side of a folder merge: one transaction that moves a directory's
pending ops into the directory it merged into, and the markers of merged-away directories
whose manifest is still to be deleted from the bucket.

Runs in the state database's thread (`StateDB.run`), like every `LocalState` method.
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

from .manifest import Entry, entry_to_json
from .state import LocalState

MARKER = "merged:"  # meta key prefix: merged-away directory id -> the id it went into


class OpRow(NamedTuple):
    seq: int
    dir_id: str
    name: bytes
    entry: Entry | None
    base: Entry | None
    requires: int | None


def _dump(entry: Entry | None) -> str | None:
    return None if entry is None else json.dumps(entry_to_json(entry))


def write_dir_merge(state: LocalState, ours: str, theirs: str, dropped: list[int],
                    added: list[OpRow], rewritten: list[OpRow]) -> None:
    """Directory `ours` merged into `theirs`, durably and all at once: its ops (`dropped`)
    give way to `added`, ops naming it are `rewritten`, its cached manifest goes (so a
    repeated merge finds nothing left to move) and the marker says its manifest in the
    bucket is to be deleted."""
    db = state.db
    db.execute("PRAGMA synchronous=FULL")
    try:
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("DELETE FROM ops WHERE seq=?", [(s,) for s in dropped])
            now = time.time()
            db.executemany(
                "INSERT INTO ops (seq, dir_id, name, entry, base, requires, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(r.seq, r.dir_id, r.name, _dump(r.entry), _dump(r.base), r.requires, now)
                 for r in added])
            db.executemany("UPDATE ops SET entry=?, base=?, requires=? WHERE seq=?",
                           [(_dump(r.entry), _dump(r.base), r.requires, r.seq)
                            for r in rewritten])
            db.execute("DELETE FROM manifests WHERE dir_id=?", (ours,))
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (MARKER + ours, theirs))
    finally:
        db.execute("PRAGMA synchronous=NORMAL")


def merge_markers(state: LocalState) -> dict[str, str]:
    """Merged-away directories whose manifest may still be in the bucket -> where they went."""
    rows = state.db.execute("SELECT key, value FROM meta WHERE key >= ? AND key < ?",
                            (MARKER, MARKER[:-1] + chr(ord(MARKER[-1]) + 1)))
    return {key[len(MARKER):]: value for key, value in rows}


def drop_marker(state: LocalState, ours: str) -> None:
    state.db.execute("DELETE FROM meta WHERE key=?", (MARKER + ours,))
