"""The local state database's schema versions (fsrepo/stateschema.py): a database of the code
before versions were kept opens and is migrated in place, keeping what it owes the bucket; a
database from a newer imgrepo is refused in one line and left as it was."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from fsrepo.config import Settings
from fsrepo.errors import ImgrepoError
from fsrepo.state import LocalState
from fsrepo.stateschema import SCHEMA_VERSION, schema_version

from .mountutil import force_unmount, run_cli

# The schema as the code before versioning created it (user_version 0), with the index an
# even older one had.
UNVERSIONED = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE manifests (dir_id TEXT PRIMARY KEY, etag TEXT, body BLOB, checked REAL NOT NULL);
CREATE TABLE ops (
    seq INTEGER PRIMARY KEY,
    dir_id TEXT NOT NULL, name BLOB NOT NULL, entry TEXT, base TEXT,
    requires INTEGER, created REAL NOT NULL);
CREATE INDEX ops_by_dir ON ops (dir_id);
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, pending INTEGER NOT NULL,
    atime REAL NOT NULL);
CREATE TABLE remote_blobs (sha256 TEXT PRIMARY KEY);
CREATE TABLE counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('repo_id', 'r1');
INSERT INTO ops VALUES (7, 'root', X'612e6a7067', NULL, NULL, NULL, 1.0);
INSERT INTO blobs VALUES ('ab', 3, 1, 2.0);
INSERT INTO counters VALUES ('dedup_bytes', 42);
"""


def _sqlite(path: Path, script: str) -> None:
    db = sqlite3.connect(str(path))
    try:
        db.executescript(script)
    finally:
        db.close()


def _version(path: Path) -> int:
    db = sqlite3.connect(str(path))
    try:
        return schema_version(db)
    finally:
        db.close()


def test_an_unversioned_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _sqlite(path, UNVERSIONED)
    assert _version(path) == 0
    state = LocalState(path)
    try:
        assert schema_version(state.db) == SCHEMA_VERSION >= 1
        assert state.get_meta("repo_id") == "r1"
        [op] = state.pending_ops()
        assert (op.seq, op.dir_id, op.name) == (7, "root", b"a.jpg")
        assert state.cached_blobs() == [("ab", 3, True, 2.0)]
        assert state.counters() == {"dedup_bytes": 42}
        indexes = state.db.execute("SELECT name FROM sqlite_master WHERE type='index' "
                                   "AND name='ops_by_dir'").fetchall()
        assert indexes == []
    finally:
        state.close()
    reopened = LocalState(path)  # a migrated database opens as it is
    try:
        assert schema_version(reopened.db) == SCHEMA_VERSION
        assert len(reopened.pending_ops()) == 1
    finally:
        reopened.close()


def test_a_new_database_starts_at_the_current_version(tmp_path: Path) -> None:
    state = LocalState(tmp_path / "state.db")
    try:
        assert schema_version(state.db) == SCHEMA_VERSION
        assert state.pending_ops() == [] and state.counters() == {}
    finally:
        state.close()


def _newer(path: Path) -> None:
    LocalState(path).close()
    _sqlite(path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}; "
                  "CREATE TABLE from_the_future (x);")


def test_a_database_from_a_newer_imgrepo_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _newer(path)
    with pytest.raises(ImgrepoError, match="newer imgrepo") as info:
        LocalState(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert _version(path) == SCHEMA_VERSION + 1


def test_the_mount_refuses_a_newer_database_in_one_line(tmp_path: Path, mount_env) -> None:
    repo, cache, mnt = tmp_path / "repo", tmp_path / "cache", tmp_path / "mnt"
    mnt.mkdir()
    storage = f"file://{repo}"
    state_dir = Settings(storage=storage, cache_root=cache).state_dir()
    state_dir.mkdir(parents=True)
    _newer(state_dir / "state.db")
    try:
        res: subprocess.CompletedProcess = run_cli(
            [str(mnt), "--storage", storage, "--cache-dir", str(cache)], mount_env,
            check=False, timeout=120)
    finally:
        mounted = mnt.is_mount()
        force_unmount(mnt)
    assert not mounted
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "newer imgrepo" in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert _version(state_dir / "state.db") == SCHEMA_VERSION + 1
