"""Local state in SQLite (WAL): cached manifests, the upload journal, the blob index.

This is the durable half of the write path: an operation is acknowledged to the user only
after the transaction recording it has committed (WAL, fsync'd: see `append_many`). After a
crash, whatever is in `ops` and in `blobs` with pending=1 is still owed to the bucket.

All methods are synchronous and must run in a worker thread (see `StateDB`), never on the
trio loop; one connection, used by one thread at a time.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .manifest import Entry, entry_from_json, entry_to_json
from .workers import Workers

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS manifests (
    dir_id TEXT PRIMARY KEY, etag TEXT, body BLOB, checked REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY,
    dir_id TEXT NOT NULL, name BLOB NOT NULL, entry TEXT, base TEXT,
    requires INTEGER, created REAL NOT NULL);
DROP INDEX IF EXISTS ops_by_dir;
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, pending INTEGER NOT NULL,
    atime REAL NOT NULL);
CREATE TABLE IF NOT EXISTS remote_blobs (sha256 TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class JournalOp:
    """One pending namespace operation, as recorded."""

    seq: int
    dir_id: str
    name: bytes
    entry: Entry | None
    base: Entry | None
    requires: int | None  # seq of an op that must reach the bucket first (renames)
    created: float


def _dump(entry: Entry | None) -> str | None:
    return None if entry is None else json.dumps(entry_to_json(entry))


def _load(text: str | None) -> Entry | None:
    return None if text is None else entry_from_json(json.loads(text))


class LocalState:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # Bookkeeping (uploaded marks, cache atimes, manifests) need not be fsync'd: if a
        # crash loses it, the next run re-checks with the bucket. Only journal appends that
        # a user was promised are, by switching to FULL for their transaction.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- meta and counters ------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def add_counter(self, key: str, delta: int) -> None:
        self.db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                        "SET value = value + excluded.value", (key, delta))

    def counters(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT key, value FROM counters"))

    # -- cached manifests -------------------------------------------------------------
    def load_manifest(self, dir_id: str) -> tuple[str | None, bytes | None, float] | None:
        row = self.db.execute("SELECT etag, body, checked FROM manifests WHERE dir_id=?",
                              (dir_id,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def save_manifest(self, dir_id: str, etag: str | None, body: bytes | None,
                      checked: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)",
                        (dir_id, etag, body, checked))

    # -- the journal ------------------------------------------------------------------
    def append_many(self, batch: list[tuple[Iterable, Iterable[tuple[str, int]], int]],
                    durable: bool = True) -> None:
        """Several callers' ops (dir_id, name, entry, base, requires, seq) and newly cached
        blobs that still need uploading, in one transaction: one fsync for all (group
        commit). `durable=False` skips the fsync: the next durable commit covers it (the WAL
        is written in order), enough for changes no user was promised yet."""
        now = time.time()
        if durable:
            self.db.execute("PRAGMA synchronous=FULL")
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for ops, new_blobs, dedup_bytes in batch:
                    for sha, size in new_blobs:
                        self.db.execute(
                            "INSERT INTO blobs VALUES (?, ?, 1, ?) ON CONFLICT(sha256) DO "
                            "UPDATE SET atime=excluded.atime, pending=1", (sha, size, now))
                    self.db.executemany(
                        "INSERT INTO ops (seq, dir_id, name, entry, base, requires, created) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(seq, dir_id, name, _dump(entry), _dump(base), requires, now)
                         for dir_id, name, entry, base, requires, seq in ops])
                    if dedup_bytes:
                        self.add_counter("dedup_bytes", dedup_bytes)
        finally:
            if durable:
                self.db.execute("PRAGMA synchronous=NORMAL")

    def pending_ops(self) -> list[JournalOp]:
        rows = self.db.execute(
            "SELECT seq, dir_id, name, entry, base, requires, created FROM ops ORDER BY seq")
        return [JournalOp(r[0], r[1], bytes(r[2]), _load(r[3]), _load(r[4]), r[5], r[6])
                for r in rows]

    def commit_dir(self, dir_id: str, etag: str, body: bytes, seqs: list[int]) -> None:
        """The manifest write succeeded: cache it and retire the ops it carried."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)",
                            (dir_id, etag, body, time.time()))
            self.db.executemany("DELETE FROM ops WHERE seq=?", [(s,) for s in seqs])

    def drop_ops(self, seqs: list[int]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM ops WHERE seq=?", [(s,) for s in seqs])

    # -- blobs ------------------------------------------------------------------------
    def cached_blobs(self) -> list[tuple[str, int, bool, float]]:
        return [(r[0], r[1], bool(r[2]), r[3]) for r in
                self.db.execute("SELECT sha256, size, pending, atime FROM blobs ORDER BY atime")]

    def add_cached_blob(self, sha: str, size: int) -> None:
        self.db.execute("INSERT INTO blobs VALUES (?, ?, 0, ?) ON CONFLICT(sha256) DO UPDATE "
                        "SET atime=excluded.atime", (sha, size, time.time()))

    def touch_blobs(self, items: list[tuple[str, float]]) -> None:
        with self.db:
            self.db.executemany("UPDATE blobs SET atime=? WHERE sha256=?",
                                [(t, s) for s, t in items])

    def remove_blobs(self, shas: list[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM blobs WHERE sha256=? AND pending=0",
                                [(s,) for s in shas])

    def mark_uploaded(self, shas: list[str]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("UPDATE blobs SET pending=0 WHERE sha256=?", [(s,) for s in shas])
            self.db.executemany("INSERT OR IGNORE INTO remote_blobs VALUES (?)",
                                [(s,) for s in shas])

    def remote_blobs(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT sha256 FROM remote_blobs")}


class StateDB:
    """Runs `LocalState` calls one at a time in a thread of its own, off the trio loop (see
    `workers`: every close() waits for one of these calls, its journal entry)."""

    def __init__(self, state: LocalState) -> None:
        self.state = state
        self._thread = Workers("imgrepo-state")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._thread.run(_disk_errors, fn, *args)

    def close(self) -> None:
        """Stop the thread (after the last call returned) and close the database."""
        self._thread.close()
        self.state.close()


_SQLITE_ERRNO = {13: errno.ENOSPC, 8: errno.EROFS, 5: errno.EBUSY, 6: errno.EBUSY}


def _disk_errors(fn: Callable[..., T], *args: Any) -> T:
    """SQLite's failures of the disk under it (full, read-only, I/O error, damaged file) as
    OSErrors with an errno, which every caller already handles as it handles a failing local
    disk (the user sees ENOSPC, the uploader retries later) instead of dying on them."""
    try:
        return fn(*args)
    except sqlite3.OperationalError as exc:
        code = _SQLITE_ERRNO.get(getattr(exc, "sqlite_errorcode", 0) & 0xFF, errno.EIO)
        raise OSError(code, f"the local state database failed: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError:
            raise  # IntegrityError, ProgrammingError...: bugs, not the disk
        raise OSError(errno.EIO, f"the local state database is damaged: {exc}") from exc
