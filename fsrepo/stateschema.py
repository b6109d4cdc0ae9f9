"""The local state database's schema, versioned with SQLite's `user_version`.

`MIGRATIONS[n]` takes a database from version n to n + 1; `migrate` applies the ones a
database lacks when it is opened, each in its own transaction with the version it reaches,
so a crash leaves the database at a version it really has. A database from before versions
were kept is version 0 with the tables of migration 1 already there (every statement of
that migration is a no-op on it). A database from a newer imgrepo is refused, not guessed at.

To change the schema: append a migration; never edit one that was released.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .errors import ImgrepoError

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the tables; the journal's old per-directory index goes (nothing queries by it)
    (
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS manifests ("
        " dir_id TEXT PRIMARY KEY, etag TEXT, body BLOB, checked REAL NOT NULL)",
        "CREATE TABLE IF NOT EXISTS ops ("
        " seq INTEGER PRIMARY KEY,"
        " dir_id TEXT NOT NULL, name BLOB NOT NULL, entry TEXT, base TEXT,"
        " requires INTEGER, created REAL NOT NULL)",
        "DROP INDEX IF EXISTS ops_by_dir",
        "CREATE TABLE IF NOT EXISTS blobs ("
        " sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, pending INTEGER NOT NULL,"
        " atime REAL NOT NULL)",
        "CREATE TABLE IF NOT EXISTS remote_blobs (sha256 TEXT PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    ),
    # 2: change records (heads.py). A cached manifest is trusted until another machine's
    # head names its directory (`stale`); those cached before heads existed are not. Our
    # own head's ring (`head_changes`, seq NULL: committed, not yet numbered) and the last
    # seq seen of every other writer (`heads_seen`).
    (
        "ALTER TABLE manifests ADD COLUMN stale INTEGER NOT NULL DEFAULT 1",
        "CREATE TABLE head_changes (dir_id TEXT PRIMARY KEY, seq INTEGER)",
        "CREATE TABLE heads_seen ("
        " writer TEXT PRIMARY KEY, seq INTEGER NOT NULL, etag TEXT NOT NULL)",
    ),
    # 3: staging copies of files fsync'd while still open (staging.py): the copy `path` (a
    # name in the staging folder) is the content of `name` in `dir_id`, made from `base`.
    (
        "CREATE TABLE synced_copies ("
        " path TEXT PRIMARY KEY, dir_id TEXT NOT NULL, name BLOB NOT NULL, base TEXT,"
        " mode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the database at `path` (opened in autocommit mode) to SCHEMA_VERSION."""
    while True:
        db.execute("BEGIN IMMEDIATE")  # the version read and the migration, as one
        try:
            version = schema_version(db)
            if version > SCHEMA_VERSION:
                raise ImgrepoError(
                    f"the local state {path} was written by a newer imgrepo (schema version "
                    f"{version}; this one knows up to {SCHEMA_VERSION}): upgrade imgrepo, or "
                    "use another cache folder")
            if version == SCHEMA_VERSION:
                db.execute("COMMIT")
                return
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
