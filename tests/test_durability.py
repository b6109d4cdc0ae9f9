"""The durability contract (SEMANTICS.md): close() survives a crash of the process at once
and a power loss after the next group commit; fsync() survives a power loss before it
returns, without turning a file still open into a blob; a power loss leaves what was not
committed absent, never torn.

A power loss is simulated at core level (tests/powerloss.py): the engine's group commit
syncs through a disk that remembers what each sync covered, and a new engine is started on
exactly that. The kill -9 side is tests/test_faults.py and tests/test_crash_dedup.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import subprocess
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from fsrepo.closed_log import LOG_NAME, ClosedLog, current_boot_id
from fsrepo.engine import Engine
from fsrepo.errors import FsError
from fsrepo.fdlimit import MAX_UNNAMED_COPIES, unnamed_copies_cap
from fsrepo.files import AttrChange
from fsrepo.inodes import ROOT_INO, Node
from fsrepo.salvage import pending_count, salvage
from fsrepo.state import SyncedCopy
from fsrepo.store.base import Store
from fsrepo.store.counting import PUT_FILE_CREATED, CountingStore

from .coreutil import (
    list_dir,
    overwrite_file,
    read_file,
    resolve,
    running_engine,
    settings_for,
    start_uploader,
    write_file,
)
from .powerloss import PowerLossDisk

MANUAL = 3600.0  # a commit interval that never comes round: only fsync() commits


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def url_of(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'bucket'}"


def cached_blobs(state_dir: Path) -> set[str]:
    return {p.name for p in (state_dir / "blobs").glob("??/*")}


def power_loss(disk: PowerLossDisk, tmp_path: Path, name: str) -> Path:
    """A cache root holding what `disk` had synced; returns it."""
    root = tmp_path / name
    disk.image(settings_for(url_of(tmp_path), None, root).state_dir())
    return root


def version(n: int) -> bytes:
    """A database-like file: 64 KiB, every version different."""
    return (b"%08d" % n) * (64 * 1024 // 8)


def disk_for(tmp_path: Path) -> tuple[Path, PowerLossDisk]:
    """The state folder of the cache at tmp_path/cache, and a disk that records what each
    sync of it covered."""
    state_dir = settings_for(url_of(tmp_path), None, tmp_path / "cache").state_dir()
    return state_dir, PowerLossDisk(state_dir)


def engine_before(tmp_path: Path, disk: PowerLossDisk, commit_interval: float = MANUAL
                  ) -> AbstractAsyncContextManager[Engine]:
    """The engine (no uploads) on tmp_path/cache whose group commits sync through `disk`."""
    return running_engine(url_of(tmp_path), None, tmp_path / "cache", upload=False,
                          disk=disk, commit_interval=commit_interval)


def engine_after(tmp_path: Path, lost_at: Path) -> AbstractAsyncContextManager[Engine]:
    """The engine (no uploads) started on the cache a power loss left at `lost_at`."""
    return running_engine(url_of(tmp_path), None, lost_at, upload=False)



def test_fsync_of_an_open_file_is_power_safe_before_it_returns_and_makes_no_blob(tmp_path):
    state_dir, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            handle, _ = await eng.files.create(ROOT_INO, b"db.sqlite", 0o644)
            before = cached_blobs(state_dir)
            for n in range(50):
                await eng.files.write(handle.fh, 0, version(n))
                commits = eng.durable.commits
                await eng.files.fsync(handle.fh)
                assert eng.durable.commits == commits + 1  # committed before fsync returned
            # 50 fsyncs of a file still open: not one blob more in the cache
            assert cached_blobs(state_dir) == before
            assert disk.filesystem_syncs == 0  # only the file and the journal were synced
            await eng.files.write(handle.fh, 0, version(50))  # not fsync'd: not promised
            lost_at = power_loss(disk, tmp_path, "after-fsync")
            await eng.files.flush(handle.fh)
            await eng.files.release(handle.fh)
            assert cached_blobs(state_dir) == before | {sha(version(50))}  # one, at close
        # After the power loss, the file holds its last fsync'd content, as a blob.
        async with engine_after(tmp_path, lost_at) as eng:
            assert await read_file(eng, "db.sqlite") == version(49)
            recovered = settings_for(url_of(tmp_path), None, lost_at).state_dir()
            assert sha(version(49)) in cached_blobs(recovered)
            assert not eng.files.staging.copies_on_disk()

    trio.run(main)


def test_closed_files_survive_a_power_loss_once_committed_and_are_absent_before(tmp_path):
    _, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            await write_file(eng, "a.jpg", b"A" * 300_000)
            await eng.ns.mkdir(ROOT_INO, b"album", 0o755)
            assert eng.durable.dirty  # closed: survives kill -9, not yet a power loss
            await eng.files.fsyncdir()  # what the interval does
            assert not eng.durable.dirty
            assert f"blobs/{sha(b'A' * 300_000)[:2]}/{sha(b'A' * 300_000)}" in disk.synced
            await write_file(eng, "b.jpg", b"B" * 300_000)
            await trio.sleep(0.3)  # the new name's write-behind has run as well
            lost_at = power_loss(disk, tmp_path, "lost")
        async with engine_after(tmp_path, lost_at) as eng:
            names = await list_dir(eng)
            assert set(names) == {b"a.jpg", b"album"}  # b.jpg was never committed: absent
            assert await read_file(eng, "a.jpg") == b"A" * 300_000

    trio.run(main)


def test_the_background_commit_makes_a_closed_file_power_safe(tmp_path):
    _, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk, commit_interval=0.2) as eng:
            await write_file(eng, "c.jpg", b"C" * 100_000)
            commits = eng.durable.commits
            with trio.fail_after(60):  # a bound for a stuck test, not a speed assertion
                while eng.durable.dirty:
                    await trio.sleep(0.05)
            assert eng.durable.commits > commits  # done by the background committer
            lost_at = power_loss(disk, tmp_path, "lost")
        async with engine_after(tmp_path, lost_at) as eng:
            assert await read_file(eng, "c.jpg") == b"C" * 100_000

    trio.run(main)


def torn_after_power_loss(tmp_path: Path, content: bytes) -> Path:
    """A power loss that kept the journal naming `content` (b.jpg, closed after a commit
    that kept a.jpg) but tore its blob: the order the group commit avoids, which a disk
    writing back the WAL on its own can still produce. Returns the cache root after it."""
    _, disk = disk_for(tmp_path)

    async def before() -> None:
        async with engine_before(tmp_path, disk) as eng:
            await write_file(eng, "a.jpg", b"A" * 1000)
            await eng.files.fsyncdir()
            await write_file(eng, "b.jpg", content)
            await eng.files.name_closed()  # named and journaled, as a commit starts to
            await eng.db.run(disk.sync_files, eng.db.state.files())  # the journal only

    trio.run(before)
    lost_at = power_loss(disk, tmp_path, "lost")
    torn = settings_for(url_of(tmp_path), None, lost_at).state_dir() / "blobs" / \
        sha(content)[:2] / sha(content)
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(content[:4096])
    return lost_at


def bucket_blobs(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "bucket" / "blobs").rglob("*") if p.is_file()}


@pytest.mark.expected_logs(r"damaged \(it hashes to", r"dropping 1 pending change",
                           reason="the power loss tore a blob the journal names")
def test_a_blob_torn_by_a_power_loss_is_never_served_nor_uploaded(tmp_path):
    """Recovery hashes the blob before anything reads or uploads it, and drops the change:
    the name never holds torn content."""
    content = os.urandom(200_000)
    lost_at = torn_after_power_loss(tmp_path, content)

    async def main() -> None:
        async with engine_after(tmp_path, lost_at) as eng:
            with pytest.raises(FsError) as err:
                await read_file(eng, "b.jpg")  # before the uploader got to it
            assert err.value.errno == errno.EIO
            start_uploader(eng)
            with trio.fail_after(120):
                await eng.uploader.wait_idle()
            names = await list_dir(eng)
            assert await read_file(eng, "a.jpg") == b"A" * 1000
            if b"b.jpg" in names:  # its name was journaled at create: empty, never torn
                assert await read_file(eng, "b.jpg") == b""
        assert sha(content) not in bucket_blobs(tmp_path)

    trio.run(main)


def test_a_torn_blob_is_replaced_by_the_next_close_of_that_content(tmp_path):
    """A file closed after the restart with the torn blob's content is not taken for a
    duplicate of the torn copy: its good copy replaces it, and is what gets uploaded. (The
    uploader starts after that close: had it found the torn copy first, b.jpg's change
    would rightly be dropped, its content never having been committed.)"""
    content = os.urandom(200_000)
    lost_at = torn_after_power_loss(tmp_path, content)

    async def main() -> None:
        async with running_engine(url_of(tmp_path), None, lost_at, upload=False) as eng:
            await write_file(eng, "c.jpg", content)
            start_uploader(eng)
            with trio.fail_after(120):
                await eng.uploader.wait_idle()
            assert await read_file(eng, "c.jpg") == content
            assert await read_file(eng, "b.jpg") == content  # its close had returned
        uploaded = tmp_path / "bucket" / "blobs"
        assert sha(content) in bucket_blobs(tmp_path)
        assert [p.read_bytes() for p in uploaded.rglob(sha(content))] == [content]

    trio.run(main)


def test_a_file_rewritten_again_and_again_uploads_its_last_version(tmp_path):
    """Rewrites of a file wait until it has been unchanged for the write-back delay (5 s):
    the versions in between never reach the bucket. Someone waiting (--status --wait)
    does not wait for the delay."""
    counting: list[CountingStore] = []

    def wrap(store: Store) -> Store:
        counting.append(CountingStore(store))
        return counting[0]

    async def main() -> None:
        async with running_engine(url_of(tmp_path), None, tmp_path / "cache",
                                  wrap_store=wrap) as eng:
            await write_file(eng, "notes.txt", version(0))  # a new file: uploaded at once
            with trio.fail_after(120):
                await eng.uploader.wait_idle()
            before = counting[0].snapshot()
            for n in range(1, 6):
                await overwrite_file(eng, "notes.txt", version(n))
                await trio.sleep(0.3)  # the uploader looks at the journal meanwhile
            assert counting[0].since(before)[PUT_FILE_CREATED] == 0  # all held back
            with trio.fail_after(120):
                await eng.uploader.wait_idle()
            assert counting[0].since(before)[PUT_FILE_CREATED] == 1
        assert bucket_blobs(tmp_path) == {sha(version(0)), sha(version(5))} | (
            bucket_blobs(tmp_path) & {sha(b"")})

    trio.run(main)


def test_an_fsynced_file_unlinked_while_open_is_not_brought_back(tmp_path):
    """POSIX: an unlinked file's content goes with its last close, fsync'd or not."""
    state_dir, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            handle, _ = await eng.files.create(ROOT_INO, b"tmp.db", 0o644)
            await eng.files.write(handle.fh, 0, b"x" * 5000)
            await eng.files.fsync(handle.fh)
            await eng.ns.remove(ROOT_INO, b"tmp.db", is_dir=False)
            await eng.files.release(handle.fh)
            await eng.files.fsyncdir()
            assert not eng.files.staging.copies_on_disk()  # the copy went after commit
            lost_at = power_loss(disk, tmp_path, "lost")
        async with engine_after(tmp_path, lost_at) as eng:
            assert b"tmp.db" not in await list_dir(eng)
            with pytest.raises(FsError):
                await read_file(eng, "tmp.db")

    trio.run(main)


# -- on a real mount ---------------------------------------------------------------------------
def test_sqlite_in_wal_mode_keeps_one_version_and_uploads_only_the_final_one(mounter, tmp_path):
    """A database fsyncs its WAL at every transaction: each fsync is a group commit (the
    mount's counter says so), none makes a blob; the cache and the bucket get the version
    at close only."""
    import sqlite3

    repo = tmp_path / "repository"
    m = mounter(f"file://{repo}", "--commit-interval", "3600")
    commits_before = m.status()["disk_commits"]
    con = sqlite3.connect(m.path / "app.sqlite", isolation_level=None)
    try:
        assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        con.execute("PRAGMA synchronous=FULL")  # an fsync of the WAL at every commit
        con.execute("CREATE TABLE t (n INTEGER, body TEXT)")
        for n in range(200):
            con.execute("INSERT INTO t VALUES (?, ?)", (n, f"row {n} " * 20))
    finally:
        con.close()
    # Not asked while the database is open: a fork+exec closes the child's copies of open
    # descriptors, and the kernel reports each such close as a flush (a version).
    # Every commit was power-safe before it returned: one group commit each at least.
    assert m.status()["disk_commits"] - commits_before >= 200
    final = (m.path / "app.sqlite").read_bytes()
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(final)
    assert sqlite3.connect(copy).execute("SELECT count(*) FROM t").fetchone()[0] == 200
    m.wait_idle()
    cache_blobs = list((m.cache_dir / "repos").glob("*/blobs/??/*"))
    versions = [p for p in cache_blobs if p.read_bytes()[:16] == b"SQLite format 3\0"]
    assert [p.name for p in versions] == [sha(final)]
    uploaded = {p.name for p in (repo / "blobs").rglob("*") if p.is_file()}
    empty = sha(b"")
    assert uploaded - {empty} == {sha(final)}


def killed(cache_root: Path, tmp_path: Path, name: str) -> Path:
    """What a `kill -9` of a running engine leaves: its state folder as the page cache holds
    it now, every file as written (synced or not). Returns the cache root holding it."""
    root = tmp_path / name
    source = settings_for(url_of(tmp_path), None, cache_root).state_dir()
    target = settings_for(url_of(tmp_path), None, root).state_dir()
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("lock", "state.db-shm"))
    return root


async def closed_not_named(eng: Engine) -> dict[str, bytes]:
    """Files closed and left unnamed (the group commit never came round): new ones, one
    twice the same content, one overwritten, one with its mode and mtime set after close.
    Returns each name's content."""
    files = {f"new{i}.jpg": os.urandom(50_000 + i) for i in range(5)}
    files["twin.jpg"] = files["new0.jpg"]
    files["touched.jpg"] = b"T" * 70_000
    await write_file(eng, "old.jpg", b"old" * 1000)
    await eng.files.fsyncdir()  # old.jpg named and committed before the rest
    for name, data in files.items():
        await write_file(eng, name, data)
    await overwrite_file(eng, "old.jpg", b"new" * 2000)
    files["old.jpg"] = b"new" * 2000
    node, _ = await resolve(eng, "touched.jpg")
    await eng.files.setattr(node.ino, AttrChange(mode=0o600, mtime_ns=TOUCHED_NS), None)
    assert len(eng.files.commits.closed) == len(files)  # nothing named yet
    for data in files.values():
        assert not eng.cache.has(sha(data))
    return files


TOUCHED_NS = 1_199_261_847_000_000_007


def test_closed_files_not_named_yet_survive_a_kill_9_whole_and_named(tmp_path):
    """close() only logs the staging copy; a kill -9 before it is named loses nothing: the
    next start names each copy (its blob in the cache under its hash, its entry
    journaled), with the attributes set after close."""
    _, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            files = await closed_not_named(eng)
            after_kill = killed(tmp_path / "cache", tmp_path, "killed")
        async with engine_after(tmp_path, after_kill) as eng:
            state_dir = settings_for(url_of(tmp_path), None, after_kill).state_dir()
            for name, data in files.items():
                assert await read_file(eng, name) == data
                assert sha(data) in cached_blobs(state_dir)
                assert eng.journal and any(
                    p.op.name == name.encode() and p.op.entry.sha256 == sha(data)
                    for p in eng.journal.by_seq.values())
            _, entry = await resolve(eng, "touched.jpg")
            assert (entry.mode, entry.mtime_ns) == (0o600, TOUCHED_NS)
            assert not eng.files.staging.copies_on_disk()
            assert not (state_dir / "closed.log").exists()

    trio.run(main)


def test_a_closed_copy_back_at_an_earlier_content_survives_a_kill_9(tmp_path):
    """X, then Y, then X again under one name, the last close not named when the mount is
    killed: the next start keeps X, the last content, though an earlier pending op of the
    name put X there too (only the name's last op says whether this copy was named)."""
    _, disk = disk_for(tmp_path)
    x, y = b"X" * 32_000, b"Y" * 32_000

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            await write_file(eng, "a.jpg", x)
            await eng.files.name_closed()
            await overwrite_file(eng, "a.jpg", y)
            await overwrite_file(eng, "a.jpg", x)  # (names y first: its copy is rewritten)
            node, _ = await resolve(eng, "a.jpg")
            assert eng.files.commits.is_closed(node.ino)
            after_kill = killed(tmp_path / "cache", tmp_path, "killed")
        async with engine_after(tmp_path, after_kill) as eng:
            assert await read_file(eng, "a.jpg") == x

    trio.run(main)


def test_a_closed_copy_logged_under_another_boot_is_dropped(tmp_path):
    """After a power loss (a new boot id) an unnamed copy may be torn and has no hash to be
    checked against: its log line is not trusted, the content is absent (never torn), the
    name committed before keeps its committed content."""
    _, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            files = await closed_not_named(eng)
            after = killed(tmp_path / "cache", tmp_path, "rebooted")
        state_dir = settings_for(url_of(tmp_path), None, after).state_dir()
        log_file = state_dir / "closed.log"
        lines = log_file.read_text().splitlines()
        assert len(lines) == len(files) + 1  # (touched.jpg twice: closed, then its attrs)
        boot = current_boot_id()
        log_file.write_text("".join(line.replace(boot, "another-boot") + "\n"
                                    for line in lines))
        async with engine_after(tmp_path, after) as eng:
            assert await read_file(eng, "old.jpg") == b"old" * 1000  # as last committed
            for name, data in files.items():
                if name != "old.jpg" and name.encode() in await list_dir(eng):
                    assert await read_file(eng, name) == b""  # its name alone, empty
                assert sha(data) not in cached_blobs(state_dir)
            assert not eng.files.staging.copies_on_disk()

    trio.run(main)


def test_a_closed_file_truncated_by_path_keeps_its_content(tmp_path):
    """Found by the model: a truncate by path names the closed copy first, and the file
    it then truncates is the same inode (not one forgotten by the naming)."""
    _, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            await write_file(eng, "a", b"123456789")
            node, _ = await resolve(eng, "a")
            assert eng.files.commits.is_closed(node.ino)
            eng.ns.inodes.forget(node.ino, node.lookups)  # the kernel forgot it (a walk)
            assert eng.ns.inodes.get(node.ino) is node  # kept: its closed copy pins it
            await eng.files.truncate(node, 4)
            assert await read_file(eng, "a") == b"1234"

    trio.run(main)


def test_a_close_during_a_group_commit_is_named_by_the_next_one(tmp_path):
    """A close() recorded while a group commit writes the journal, after that commit named
    the closed files, is not covered by it: the next commit (the interval's, an fsync's)
    names it and makes it power-safe instead of finding nothing to do."""
    _, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            await write_file(eng, "a.jpg", b"A" * 1000)
            await write_file(eng, "b.jpg", b"B" * 1000)
            await eng.durable.commit()
            write_queued = eng.journal.write_queued

            async def close_meanwhile() -> None:
                eng.journal.write_queued = write_queued  # (once)
                await overwrite_file(eng, "b.jpg", b"b" * 2000)  # no new name: only logged
                await write_queued()

            eng.journal.write_queued = close_meanwhile  # type: ignore[method-assign]
            await write_file(eng, "c.jpg", b"C" * 1000)
            await eng.durable.commit()
            node, _ = await resolve(eng, "b.jpg")
            assert eng.files.commits.is_closed(node.ino)  # closed after that commit's naming
            await eng.durable.commit()
            assert not eng.files.commits.is_closed(node.ino)
            lost_at = power_loss(disk, tmp_path, "lost")
        async with engine_after(tmp_path, lost_at) as eng:
            assert await read_file(eng, "b.jpg") == b"b" * 2000
            assert await read_file(eng, "c.jpg") == b"C" * 1000

    trio.run(main)


def test_a_naming_cut_short_by_a_cancellation_is_finished_and_its_file_kept(tmp_path):
    """An unmount cancels the uploader, which may be naming closed files: the naming, once
    begun, is finished, so the unmount's commit neither drops the file's log line nor
    leaves it out; after a power loss (a reboot after the unmount) the file is there."""
    _, disk = disk_for(tmp_path)
    data = os.urandom(300_000)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            handle, _ = await eng.files.create(ROOT_INO, b"edited.jpg", 0o644)
            await eng.files.write(handle.fh, 0, b"x" * 1000)
            await eng.files.write(handle.fh, 0, data)  # not sequential: hashed by a thread
            await eng.files.flush(handle.fh)
            await eng.files.release(handle.fh)
            with trio.CancelScope() as scope:
                scope.cancel()  # (the uploader's naming, cancelled at its first await)
                await eng.files.name_closed()
            await eng.durable.commit()  # the unmount's
            lost_at = power_loss(disk, tmp_path, "lost")
        async with engine_after(tmp_path, lost_at) as eng:
            assert await read_file(eng, "edited.jpg") == data

    trio.run(main)


def test_a_release_leaves_alone_the_copy_of_a_handle_opened_meanwhile(tmp_path):
    """FUSE sends RELEASE after close() returned: the file may be open again, and written,
    while the release waits for its copy being named. The release leaves the new handle's
    copy alone (dropping it lost what was written through that handle)."""
    _, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            await write_file(eng, "a.jpg", b"A" * 1000)
            node, _ = await resolve(eng, "a.jpg")
            first = await eng.files.open(node, os.O_WRONLY)
            await eng.files.write(first.fh, 0, b"B" * 1000)
            await eng.files.flush(first.fh)
            assert eng.files.commits.is_closed(node.ino)
            close = eng.files.commits.close
            handles = []

            async def reopened_meanwhile(closing: Node) -> None:
                await close(closing)
                await eng.files.name_closed()  # (the uploader, which the release waited for)
                handles.append(await eng.files.open(node, os.O_WRONLY))
                await eng.files.write(handles[0].fh, 1000, b"C" * 1000)

            eng.files.commits.close = reopened_meanwhile  # type: ignore[method-assign]
            await eng.files.release(first.fh)
            eng.files.commits.close = close  # type: ignore[method-assign]
            await eng.files.flush(handles[0].fh)
            await eng.files.release(handles[0].fh)
            assert await read_file(eng, "a.jpg") == b"B" * 1000 + b"C" * 1000

    trio.run(main)


def test_a_log_line_cut_short_by_a_full_disk_is_refused_and_spoils_no_other(tmp_path,
                                                                            monkeypatch):
    """A short write to the closed-file log (a full disk) fails the append, so close()
    names the file at once; the torn line does not swallow the next one."""
    log = ClosedLog(tmp_path / "closed.log", boot_id="this-boot")

    def copy(n: int) -> SyncedCopy:
        return SyncedCopy(f"copy{n}", "dir", b"f%d.jpg" % n, None, 0o644, n)

    log.append(copy(1))
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, data[:20]))
    with pytest.raises(OSError):
        log.append(copy(2))
    monkeypatch.setattr(os, "write", write)
    log.append(copy(3))
    assert [c.path for c in log.trusted()] == ["copy1", "copy3"]


@pytest.mark.expected_logs(r"cannot store a closed file locally",
                           reason="the test fails the disk under one naming")
def test_a_copy_that_could_not_be_named_keeps_its_line_alone_and_comes_back(tmp_path):
    """A naming that fails (the cache's disk refuses the link) leaves the copy and its log
    line; the log is still emptied of every named copy's line, and the next start names
    the copy that failed."""
    state_dir, disk = disk_for(tmp_path)

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            await write_file(eng, "failed.jpg", b"F" * 5000)
            link_in = eng.cache.link_in

            def refused(*args: object, **kw: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            eng.cache.link_in = refused  # type: ignore[method-assign]
            await eng.files.name_closed()
            eng.cache.link_in = link_in  # type: ignore[method-assign]
            for n in range(3):
                await write_file(eng, f"named{n}.jpg", b"%d" % n * 5000)
            await eng.files.name_closed()
            assert len((state_dir / "closed.log").read_text().splitlines()) == 1
            after_kill = killed(tmp_path / "cache", tmp_path, "killed")
        async with engine_after(tmp_path, after_kill) as eng:
            assert await read_file(eng, "failed.jpg") == b"F" * 5000
            assert await read_file(eng, "named2.jpg") == b"2" * 5000

    trio.run(main)


def test_a_named_blob_is_in_the_cache_index_as_soon_as_its_entry_is_seen(tmp_path):
    """A naming records the entry (the folder's view shows the new content), then waits for
    the journal write: the blob is indexed in the cache before that wait, so a reader of
    the folder meanwhile (the read-ahead's guesses) does not fetch it from the bucket
    (where it is not yet: the fetch failed, logged as an error)."""
    _, disk = disk_for(tmp_path)
    data = b"R" * 40_000

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            await write_file(eng, "r.jpg", data)
            settle = eng.ns.settle
            seen: list[bool] = []

            async def indexed_first(rec):  # type: ignore[no-untyped-def]
                seen.append(eng.cache.has(sha(data)))
                await settle(rec)

            eng.ns.settle = indexed_first  # type: ignore[method-assign]
            await eng.files.name_closed()
            assert seen == [True]

    trio.run(main)


async def staging_descriptors(eng: Engine) -> int:
    """This process's open descriptors on staging copies (not on those made ahead: once
    the thread that makes them is done, as it opens each before it queues it)."""
    blanks = eng.files.staging.blanks
    with trio.fail_after(10):
        while blanks._refilling:
            await trio.sleep(0.01)
    staging = str(eng.files.staging.directory)
    waiting = blanks.waiting()
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # (closed meanwhile)
        count += path.startswith(staging + "/") and os.path.basename(path) not in waiting
    return count


def test_past_the_cap_close_names_at_once_and_keeps_no_descriptor(tmp_path):
    """A closed copy keeps its descriptor until named: past `max_unnamed` of them, close()
    names the file at once (its blob in the cache, no descriptor kept), so a burst of
    closes cannot run the mount out of descriptors; every file survives a kill -9 either
    way."""
    state_dir, disk = disk_for(tmp_path)
    files = {f"f{i}.jpg": os.urandom(20_000 + i) for i in range(8)}

    async def main() -> None:
        async with engine_before(tmp_path, disk) as eng:
            eng.files.commits.max_unnamed = 3
            for name, data in files.items():
                await write_file(eng, name, data)
            assert len(eng.files.commits.closed) == 3
            assert await staging_descriptors(eng) == 3
            named = [name for name, data in files.items() if eng.cache.has(sha(data))]
            assert named == [f"f{i}.jpg" for i in range(3, 8)]  # those past the cap
            after_kill = killed(tmp_path / "cache", tmp_path, "killed")
        async with engine_after(tmp_path, after_kill) as eng:
            for name, data in files.items():
                assert await read_file(eng, name) == data

    trio.run(main)


def test_the_open_files_limit_is_raised_to_the_hard_one_and_sets_the_cap() -> None:
    """A mount started under the usual soft limit (here 256) raises it to the hard limit;
    closed copies may hold a quarter of the soft limit, at most MAX_UNNAMED_COPIES."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    out = subprocess.run(
        [sys.executable, "-c", "import resource; from fsrepo.fdlimit import "
         "raise_open_files_limit as r; print(r(), resource.getrlimit(resource.RLIMIT_NOFILE))"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    soft, limits = out.stdout.split(" ", 1)
    assert int(soft) > 256 and limits.strip() == f"({soft}, {hard})"
    assert unnamed_copies_cap(1024) == 256 and unnamed_copies_cap(100) == 25
    assert unnamed_copies_cap(1 << 20) == unnamed_copies_cap(resource.RLIM_INFINITY) \
        == MAX_UNNAMED_COPIES


def test_salvage_copies_the_files_closed_or_fsyncd_and_not_named_yet(tmp_path):
    """A cache a mount left by a `kill -9` before its closed copies were named, and with a
    file fsync'd while still open: `--salvage` (which reads the cache and changes nothing
    in it) copies each of them out with its content and attributes, and the advice to
    salvage counts them; a copy logged under an earlier boot is absent, as for the mount."""
    _, disk = disk_for(tmp_path)

    async def main() -> tuple[dict[str, bytes], Path]:
        async with engine_before(tmp_path, disk) as eng:
            handle, _ = await eng.files.create(ROOT_INO, b"open.db", 0o640)
            await eng.files.write(handle.fh, 0, version(1))
            await eng.files.fsync(handle.fh)  # (its copy recorded: kept as it is now)
            files = await closed_not_named(eng)  # (after it: an fsync names closed copies)
            files["open.db"] = version(1)
            killed_at = killed(tmp_path / "cache", tmp_path, "killed")
            await eng.files.flush(handle.fh)
            await eng.files.release(handle.fh)
        return files, killed_at

    files, killed_at = trio.run(main)
    state_dir = settings_for(url_of(tmp_path), None, killed_at).state_dir()
    def files_kept() -> dict[Path, bytes]:  # (the database: SQLite checkpoints on close)
        return {p: p.read_bytes() for p in state_dir.rglob("*")
                if p.is_file() and not p.name.startswith("state.db")}

    before = files_kept()
    pending = pending_count(state_dir)
    assert pending >= len(files)  # (what the journal holds and the staged copies)
    report = salvage(state_dir, tmp_path / "out")
    assert sorted(report.copied) == sorted(files) and not report.missing
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data, name
    touched = os.stat(tmp_path / "out" / "touched.jpg")
    assert (touched.st_mode & 0o7777, touched.st_mtime_ns) == (0o600, TOUCHED_NS)
    assert files_kept() == before
    assert pending_count(state_dir) == pending  # (no op journaled, no copy named)

    log_file = state_dir / LOG_NAME  # the same lines, written under another boot
    boot = current_boot_id()
    log_file.write_text(log_file.read_text().replace(boot, "another-boot"))
    out = tmp_path / "out-rebooted"
    report = salvage(state_dir, out)
    assert (out / "open.db").read_bytes() == version(1)  # (its fsync made it a promise)
    assert (out / "old.jpg").read_bytes() == b"old" * 1000  # as last committed (not uploaded)
    for name in files.keys() - {"open.db", "old.jpg"}:  # the names alone, empty
        assert name not in report.copied or (out / name).read_bytes() == b"", name
