"""Local state in SQLite (WAL): cached manifests, the upload journal, the blob index.

This is the durable half of the write path: an operation is acknowledged to the user only
after the transaction recording it has committed to the WAL (no fsync: the kernel keeps it
through a crash of the process). The group commit (group_commit.py) makes it survive a power
loss, by `mark_committed` and an fsync of `files`. After a crash, whatever is in `ops` and
in `blobs` with pending=1 is still owed to the bucket.

All methods are synchronous and must run in a worker thread (see `StateDB`), never on the
trio loop; one connection, used by one thread at a time.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import errno_for
from .manifest import Entry, FileEntry, entry_from_json, entry_to_json
from .stateschema import migrate
from .workers import Workers

T = TypeVar("T")


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


@dataclass(frozen=True)
class SyncedCopy:
    """A staging copy fsync'd while its file stayed open: the file's content as promised."""

    path: str  # the copy's name in the staging folder
    dir_id: str
    name: bytes
    base: Entry | None  # the entry the copy was made from (for the merge)
    mode: int
    mtime_ns: int  # when first recorded (recovery takes the copy's own, of its last write)


def _dump(entry: Entry | None) -> str | None:
    return None if entry is None else json.dumps(entry_to_json(entry))


def _load(text: str | None) -> Entry | None:
    return None if text is None else entry_from_json(json.loads(text))


class LocalState:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA busy_timeout=10000")
        try:
            migrate(self.db, path)  # first: a database we refuse is left exactly as it was
        except BaseException:
            self.db.close()
            raise
        self.db.execute("PRAGMA journal_mode=WAL")
        # No transaction is fsync'd by SQLite itself (but around checkpoints): a committed
        # WAL transaction survives a crash of the process; the group commit fsyncs `files`
        # once per interval, which makes everything written before it survive a power loss.
        self.db.execute("PRAGMA synchronous=NORMAL")

    def files(self) -> list[Path]:
        """The database's files, as the group commit fsyncs them (the database itself
        holds what checkpoints moved out of the WAL)."""
        return [self.path, self.path.with_name(self.path.name + "-wal")]

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
    def load_manifest(self, dir_id: str) -> tuple[str | None, bytes | None, bool] | None:
        """(etag, body, stale): stale when another machine changed the directory since it
        was cached (or it was cached before change records existed)."""
        row = self.db.execute("SELECT etag, body, stale FROM manifests WHERE dir_id=?",
                              (dir_id,)).fetchone()
        return (row[0], row[1], bool(row[2])) if row else None

    def cached_manifests(self, dir_ids: list[str]) -> set[str]:
        """Which of these directories have a manifest cached (one query for a listing's
        subdirectories, not one per directory)."""
        found: set[str] = set()
        for i in range(0, len(dir_ids), 500):
            chunk = dir_ids[i:i + 500]
            found.update(row[0] for row in self.db.execute(
                "SELECT dir_id FROM manifests WHERE dir_id IN "
                f"({','.join('?' * len(chunk))})", chunk))
        return found

    def save_manifest(self, dir_id: str, etag: str | None, body: bytes | None,
                      checked: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO manifests (dir_id, etag, body, checked, stale)"
                        " VALUES (?, ?, ?, ?, 0)", (dir_id, etag, body, checked))

    def manifest_checked(self, dir_id: str, etag: str | None) -> None:
        """The cached manifest was revalidated and is still the bucket's (unless the etag
        moved on meanwhile: then it stays stale)."""
        self.db.execute("UPDATE manifests SET stale=0, checked=? WHERE dir_id=? AND etag IS ?",
                        (time.time(), dir_id, etag))

    def mark_stale(self, dir_ids: Iterable[str] | None) -> None:
        """Another machine changed these directories (None: maybe any): revalidate the
        cached manifests before their next use."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if dir_ids is None:
                self.db.execute("UPDATE manifests SET stale=1")
            else:
                self.db.executemany("UPDATE manifests SET stale=1 WHERE dir_id=?",
                                    [(d,) for d in dir_ids])

    # -- change records (heads.py) ------------------------------------------------------
    def number_head_changes(self, keep: int) -> tuple[int, int, list[tuple[int, str]]]:
        """Give the directories committed since the last head a new seq, forget the oldest
        beyond `keep`; returns (seq, forgotten, ring): what our head must say now.
        `forgotten` is the newest seq dropped from the ring (changes up to it may be
        missing from it)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = int(self.get_meta("head_seq") or 0)
            forgotten = int(self.get_meta("head_forgotten") or 0)
            if self.db.execute("SELECT 1 FROM head_changes WHERE seq IS NULL").fetchone():
                seq += 1
                self.db.execute("UPDATE head_changes SET seq=? WHERE seq IS NULL", (seq,))
                self.set_meta("head_seq", str(seq))
            ring = [(int(r[0]), r[1]) for r in self.db.execute(
                "SELECT seq, dir_id FROM head_changes ORDER BY seq DESC, dir_id")]
            if len(ring) > keep:
                dropped = ring[keep:]
                ring = ring[:keep]
                self.db.executemany("DELETE FROM head_changes WHERE dir_id=?",
                                    [(d,) for _, d in dropped])
                forgotten = max(forgotten, max(s for s, _ in dropped))
                self.set_meta("head_forgotten", str(forgotten))
        return seq, forgotten, ring

    def writer_id(self) -> str:
        """This local state's id as a writer of change records: random, made once."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            writer = self.get_meta("writer_id")
            if writer is None:
                writer = uuid.uuid4().hex
                self.set_meta("writer_id", writer)
        return writer

    def head_published(self, seq: int) -> None:
        self.set_meta("head_published", str(seq))

    def head_unpublished(self) -> bool:
        """Whether changes committed here are not in our head in the bucket yet (a crash, or
        the storage went away, between a manifest commit and the head write)."""
        if self.db.execute("SELECT 1 FROM head_changes WHERE seq IS NULL").fetchone():
            return True
        return int(self.get_meta("head_seq") or 0) > int(self.get_meta("head_published") or 0)

    def heads_seen(self) -> dict[str, tuple[int, str]]:
        """writer -> (last seq applied, etag of the head that said it)."""
        return {r[0]: (int(r[1]), r[2])
                for r in self.db.execute("SELECT writer, seq, etag FROM heads_seen")}

    def saw_head(self, writer: str, seq: int, etag: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO heads_seen VALUES (?, ?, ?)",
                        (writer, seq, etag))

    # -- the journal ------------------------------------------------------------------
    def append_many(self, batch: list[tuple[Iterable, Iterable[tuple[str, int]], int]]) -> None:
        """Several callers' ops (dir_id, name, entry, base, requires, seq, when recorded)
        and newly cached blobs that still need uploading, in one transaction (not fsync'd:
        the group commit makes it power-safe; the WAL is written in order)."""
        now = time.time()
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
                    [(seq, dir_id, name, _dump(entry), _dump(base), requires, recorded)
                     for dir_id, name, entry, base, requires, seq, recorded in ops])
                if dedup_bytes:
                    self.add_counter("dedup_bytes", dedup_bytes)

    # -- the group commit and fsync'd open files ---------------------------------------
    def mark_committed(self, kept: list[SyncedCopy], retired: list[str]) -> None:
        """The group commit's transaction: staging copies fsync'd while open are recorded
        (`kept`) or forgotten (`retired`: closed or dropped since). The caller fsyncs
        `files()` right after."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT OR REPLACE INTO synced_copies VALUES (?, ?, ?, ?, ?, ?)",
                [(c.path, c.dir_id, c.name, _dump(c.base), c.mode, c.mtime_ns) for c in kept])
            self.db.executemany("DELETE FROM synced_copies WHERE path=?",
                                [(p,) for p in retired])

    def synced_copies(self) -> list[SyncedCopy]:
        return [SyncedCopy(r[0], r[1], bytes(r[2]), _load(r[3]), r[4], r[5])
                for r in self.db.execute("SELECT path, dir_id, name, base, mode, mtime_ns "
                                         "FROM synced_copies ORDER BY rowid")]

    def recover_synced_copy(self, copy: SyncedCopy, entry: Entry | None) -> None:
        """A synced copy of a run that ended before closing it became `entry` (None: it
        was already journaled, or is gone): its op and blob, one transaction."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if entry is not None:
                assert isinstance(entry, FileEntry)
                seq = int(self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM ops")
                          .fetchone()[0])
                now = time.time()
                self.db.execute(
                    "INSERT INTO blobs VALUES (?, ?, 1, ?) ON CONFLICT(sha256) DO "
                    "UPDATE SET atime=excluded.atime, pending=1", (entry.sha256, entry.size, now))
                self.db.execute(
                    "INSERT INTO ops (seq, dir_id, name, entry, base, requires, created) "
                    "VALUES (?, ?, ?, ?, ?, NULL, ?)",
                    (seq, copy.dir_id, copy.name, _dump(entry), _dump(copy.base), now))
            self.db.execute("DELETE FROM synced_copies WHERE path=?", (copy.path,))

    def journaled(self, dir_id: str, name: bytes, sha: str, last: bool = False) -> bool:
        """Whether a pending op already puts this content under the name (`last`: the
        name's last pending op)."""
        for (text,) in self.db.execute("SELECT entry FROM ops WHERE dir_id=? AND name=? "
                                       "ORDER BY seq DESC LIMIT ?",
                                       (dir_id, name, 1 if last else -1)):
            entry = _load(text)
            if isinstance(entry, FileEntry) and entry.sha256 == sha:
                return True
        return False

    def pending_ops(self) -> list[JournalOp]:
        rows = self.db.execute(
            "SELECT seq, dir_id, name, entry, base, requires, created FROM ops ORDER BY seq")
        return [JournalOp(r[0], r[1], bytes(r[2]), _load(r[3]), _load(r[4]), r[5], r[6])
                for r in rows]

    def commit_dir(self, dir_id: str, etag: str, body: bytes, seqs: list[int]) -> None:
        """The manifest write succeeded: cache it, retire the ops it carried, and record the
        directory for our next head (in the same transaction: a crash before the head write
        leaves it to announce at the next start)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR REPLACE INTO manifests (dir_id, etag, body, checked, "
                            "stale) VALUES (?, ?, ?, ?, 0)", (dir_id, etag, body, time.time()))
            self.db.execute("INSERT OR REPLACE INTO head_changes VALUES (?, NULL)", (dir_id,))
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

    def add_cached_blobs(self, rows: dict[str, int]) -> None:
        """Downloaded blobs (sha -> size), in one transaction: a batch of downloads costs
        one WAL write, not one per blob."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO blobs VALUES (?, ?, 0, ?) ON CONFLICT(sha256) "
                                "DO UPDATE SET atime=excluded.atime",
                                [(sha, size, now) for sha, size in rows.items()])

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

    def remote_blobs(self, among: Iterable[str]) -> set[str]:
        """Which of these blobs this machine uploaded (a few hundred asked at a time: the
        table holds every blob it ever sent, a million for a big library)."""
        wanted = list(among)
        found: set[str] = set()
        for i in range(0, len(wanted), 500):
            part = wanted[i:i + 500]
            found.update(r[0] for r in self.db.execute(
                f"SELECT sha256 FROM remote_blobs WHERE sha256 IN ({','.join('?' * len(part))})",
                part))
        return found


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


def _disk_errors(fn: Callable[..., T], *args: Any) -> T:
    """SQLite's failures of the disk under it (full, read-only, I/O error, damaged file) as
    OSErrors with an errno, which every caller already handles as it handles a failing local
    disk (the user sees ENOSPC, the uploader retries later) instead of dying on them."""
    try:
        return fn(*args)
    except sqlite3.OperationalError as exc:
        raise OSError(errno_for(exc), f"the local state database failed: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError:
            raise  # IntegrityError, ProgrammingError...: bugs, not the disk
        raise OSError(errno.EIO, f"the local state database is damaged: {exc}") from exc
