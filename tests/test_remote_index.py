"""The dedup trust index holds what this machine did: a confirmation goes once too old to
decide anything, a start loads only the uploaded blobs its pending changes need, a walk adds
nothing, and an op that carries a file from a manifest notes that file's blob (its commit
needs it known)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from fsrepo.engine import Engine
from fsrepo.errors import StorageError
from fsrepo.files import AttrChange
from fsrepo.manifest import ROOT_ID
from fsrepo.remote_index import TRUST_REMOTE, RemoteIndex
from fsrepo.repository import manifest_key
from fsrepo.store.base import Store
from fsrepo.store.counting import CountingStore

from .coreutil import list_dir, read_file, resolve, running_engine, write_file
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


async def a_file_from_another_machine(url: str, cache: Path, *more: str) -> None:
    """d/f.jpg (and `more` names in d), written and committed by another machine: only the
    bucket has them."""
    async with running_engine(url, None, cache) as eng:
        for name in ("f.jpg", *more):
            await write_file(eng, f"d/{name}", f"{name}, taken on the other machine".encode())
        await eng.uploader.wait_idle()


async def commits_within(eng: Engine, seconds: float) -> None:
    with trio.fail_after(seconds):
        await eng.uploader.wait_idle()
    assert not eng.journal.by_seq


async def another_machine_sees_the_rename(url: str, cache: Path) -> None:
    async with running_engine(url, None, cache) as eng:
        assert set(await list_dir(eng, "d")) == {b"g.jpg"}


def test_a_walk_adds_nothing_and_files_only_the_bucket_has_move_without_a_blob_request(
        tmp_path):
    """A library of a million photos has a million blobs: reading its folders gives the
    index none of them (it held ~40 MB of ids at 1M). A rename or a chmod of a file only
    the bucket has carries the entry of the folder's manifest: its blob is noted as the op
    is recorded, and the commit sends no blob request (were it unknown, the commit would
    wait for an upload that cannot start)."""
    url = "file://" + str(tmp_path / "repo")
    counting: list[CountingStore] = []

    def count(store: Store) -> Store:
        counting.append(CountingStore(store, by_key=True))
        return counting[0]

    async def main() -> None:
        await a_file_from_another_machine(url, tmp_path / "a", "h.jpg", "k.jpg")
        async with running_engine(url, None, tmp_path / "b", wrap_store=count) as eng:
            index = eng.remote_index
            assert set(await list_dir(eng, "d")) == {b"f.jpg", b"h.jpg", b"k.jpg"}
            assert len(index.remote) == 0
            before = counting[0].snapshot()
            dnode, _ = await resolve(eng, "d")
            await eng.ns.rename(dnode.ino, b"f.jpg", dnode.ino, b"g.jpg")
            node, entry = await eng.ns.lookup(dnode.ino, b"h.jpg")
            await eng.files.setattr(node.ino, AttrChange(mode=0o600), None)
            await commits_within(eng, 10)
            assert counting[0].since(before).under("blobs/").total() == 0
            assert len(index.remote) == 2 and index.known(entry.sha256)  # type: ignore[union-attr]
        async with running_engine(url, None, tmp_path / "c") as eng:
            assert set(await list_dir(eng, "d")) == {b"g.jpg", b"h.jpg", b"k.jpg"}
            _, entry = await eng.ns.lookup((await resolve(eng, "d"))[0].ino, b"h.jpg")
            assert entry.mode == 0o600  # type: ignore[union-attr]
    trio.run(main)


def test_a_rename_of_a_file_only_the_bucket_has_commits_after_an_idle_release(tmp_path):
    """A name moved within a folder carries the manifest's entry: its blob is noted as the
    rename is recorded, or the commit would wait for an upload that cannot start (the
    content is not in this machine's cache). The idle release between the folder's reading
    and the rename changes nothing."""
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


class RootHeldBack(CountingStore):
    """Refuses writes of the root's manifest: a folder's own commit lands, the root's put
    of its name does not."""

    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: bool = False) -> str:
        if key == manifest_key(ROOT_ID):
            raise StorageError("the root's manifest is held back by the test")
        return await super().put(key, data, if_match=if_match, if_none_match=if_none_match)


@pytest.mark.expected_logs(r"update of folder / failed \(will retry\): the root's manifest is held",
                           reason="the first mount's root commit is refused until it stops")
def test_a_folder_merged_after_a_restart_commits_files_only_the_bucket_has(tmp_path):
    """A folder this machine made, whose own manifest landed but whose name did not before
    the mount stopped, while another machine made a folder of the same name: the merge
    carries its files into theirs. Their content may be only in the bucket by then (the
    cache let it go) and unknown to the new process: the merge notes it from the folder's
    manifest, or the commit would wait for an upload that cannot start."""
    url = "file://" + str(tmp_path / "repo")
    ours = b"made on this machine"

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "a",
                                  wrap_store=lambda s: RootHeldBack(s)) as eng:
            await write_file(eng, "x/f.jpg", ours)
            with trio.fail_after(10):
                while any(p.dir_id != ROOT_ID for p in eng.journal.by_seq.values()):
                    await trio.sleep(0.05)  # all but the root's op committed
        async with running_engine(url, None, tmp_path / "b") as eng:
            await write_file(eng, "x/g.jpg", b"made on the other machine")
            await eng.uploader.wait_idle()
        async with running_engine(url, None, tmp_path / "a", upload=False) as eng:
            eng.cache.discard(hashlib.sha256(ours).hexdigest())  # the cache let it go
        async with running_engine(url, None, tmp_path / "a") as eng:
            await commits_within(eng, 10)
        async with running_engine(url, None, tmp_path / "c") as eng:
            assert set(await list_dir(eng, "x")) == {b"f.jpg", b"g.jpg"}
            assert await read_file(eng, "x/f.jpg") == ours
    trio.run(main)
