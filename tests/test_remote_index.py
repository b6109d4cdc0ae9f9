"""The dedup trust index: a confirmation goes once too old to decide anything, a start
loads only the uploaded blobs its pending changes need, and a blob a loaded view shows stays
known (a rename's commit needs it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio

from fsrepo.engine import Engine
from fsrepo.remote_index import TRUST_REMOTE, RemoteIndex

from .coreutil import list_dir, resolve, running_engine, write_file
from .test_view_memory import CountingHeap


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sha(n: int) -> str:
    return f"{n:064x}"


def test_confirmations_older_than_the_trust_period_are_let_go():
    clock = Clock()
    index = RemoteIndex(clock)
    for n in range(1000):
        index.seen_in_bucket(sha(n))
    clock.now += TRUST_REMOTE / 2
    index.seen_in_bucket(sha(5))  # seen again: its newer confirmation counts
    assert len(index.confirmed) == 1000
    clock.now += TRUST_REMOTE / 2
    index.seen_in_bucket(sha(2000))
    assert set(index.confirmed) == {sha(5), sha(2000)}
    # what is let go was untrusted already: a re-use is checked (one HEAD), not uploaded
    assert index.reuse_or_recheck(sha(5)) and index.reuse_or_recheck(sha(2000))
    assert not index.reuse_or_recheck(sha(7)) and sha(7) in index.unconfirmed
    assert index.needs_upload(sha(7)) and not index.needs_upload(sha(5))
    assert index.known(sha(7))  # uploaded by this machine: still known to be there


def test_a_start_loads_only_the_uploaded_blobs_pending_changes_need(tmp_path):
    """A machine that sent a million photos does not load a million ids at every start:
    of what it uploaded in earlier runs, only what its pending changes name is known."""
    url = "file://" + str(tmp_path / "repo")
    a, b = b"uploaded before the restart", b"not uploaded yet"
    old = hashlib.sha256(b"sent long ago").hexdigest()
    sha_a, sha_b = hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", upload=False) as eng:
            await write_file(eng, "a.jpg", a)
            await write_file(eng, "b.jpg", b)
            await eng.db.run(eng.db.state.mark_uploaded, [sha_a, old])
        async with running_engine(url, None, tmp_path / "c", upload=False) as eng:
            index = eng.remote_index
            assert index.known(sha_a) and not index.needs_upload(sha_a)
            assert index.needs_upload(sha_b)
            assert not index.known(old)  # re-used content is checked with a HEAD anyway
            assert set(eng.uploader.schedule.pending_blobs()) == {sha_b}
    trio.run(main)


async def a_file_from_another_machine(url: str, cache: Path) -> None:
    """d/f.jpg, written and committed by another machine: only the bucket has it."""
    async with running_engine(url, None, cache) as eng:
        await write_file(eng, "d/f.jpg", b"taken on the other machine")
        await eng.uploader.wait_idle()


async def commits_within(eng: Engine, seconds: float) -> None:
    with trio.fail_after(seconds):
        await eng.uploader.wait_idle()
    assert not eng.journal.by_seq


async def another_machine_sees_the_rename(url: str, cache: Path) -> None:
    async with running_engine(url, None, cache) as eng:
        assert set(await list_dir(eng, "d")) == {b"g.jpg"}


def test_a_rename_of_a_file_only_the_bucket_has_commits_after_an_idle_release(tmp_path):
    """A name moved within a folder carries the manifest's entry: its blob must stay known
    for as long as a view shows it, or the commit would wait for an upload that cannot
    start (the content is not in this machine's cache). The idle release keeps the views
    loaded last: their blobs stay known through it."""
    url = "file://" + str(tmp_path / "repo")

    async def main() -> None:
        await a_file_from_another_machine(url, tmp_path / "a")
        async with running_engine(url, None, tmp_path / "b") as eng:
            ns = eng.ns
            ns.idle_after, ns.idle_check, ns.forget_wait = 0.2, 0.05, 0.05
            heap = ns.heap = CountingHeap()
            dnode, _ = await resolve(eng, "d")
            await ns.lookup(dnode.ino, b"f.jpg")
            eng.nursery.start_soon(ns.release_when_idle)
            with trio.fail_after(5):
                while not heap.given_back:
                    await trio.sleep(0.05)
            assert ns.views.get(dnode.dir_id) is not None  # kept: loaded last
            await ns.rename(dnode.ino, b"f.jpg", dnode.ino, b"g.jpg")
            await commits_within(eng, 10)
        await another_machine_sees_the_rename(url, tmp_path / "c")
    trio.run(main)


def test_a_rename_recorded_before_a_crash_commits_after_the_restart(tmp_path):
    """A rename of a file only the bucket has, recorded but not committed when the mount
    stopped: after the start its content is neither in the cache nor among the blobs this
    machine uploaded. The uploader asks the bucket (one HEAD) and the rename commits,
    without anyone listing the folder first (on main it waited until something did)."""
    url = "file://" + str(tmp_path / "repo")

    async def main() -> None:
        await a_file_from_another_machine(url, tmp_path / "a")
        async with running_engine(url, None, tmp_path / "b", upload=False) as eng:
            dnode, _ = await resolve(eng, "d")
            await eng.ns.rename(dnode.ino, b"f.jpg", dnode.ino, b"g.jpg")
        async with running_engine(url, None, tmp_path / "b") as eng:
            await commits_within(eng, 10)
        await another_machine_sees_the_rename(url, tmp_path / "c")
    trio.run(main)
