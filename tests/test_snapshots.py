"""Snapshots at the core (no FUSE): recording, reading back through the snapshot tree, the
cost counted at the store, names, deletion, and that a copy back uploads nothing."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import trio

from fsrepo.engine import Engine
from fsrepo.errors import FsError, ImgrepoError, PreconditionFailed
from fsrepo.manifest import DirEntry, SymlinkEntry
from fsrepo.snapshot_views import TOP_INO, SnapshotTree
from fsrepo.snapshots import (
    COPY_PREFIX,
    SNAPSHOT_PREFIX,
    Snapshot,
    check_snapshot_name,
    default_name,
    parse_snapshot,
    serialise_snapshot,
)
from fsrepo.store import Store
from fsrepo.store.counting import (
    GET,
    LIST,
    PUT,
    PUT_FILE_CREATED,
    PUT_IF_NONE_MATCH,
    CountingStore,
)

from .coreutil import EngineDriver, engine_on, running_engine
from .targets import StorageTarget


async def snap_tree(tree: SnapshotTree, ino: int = TOP_INO, prefix: bytes = b""
                    ) -> dict[bytes, bytes | None]:
    """Every file under a snapshot-tree directory with its content (None: directory)."""
    out: dict[bytes, bytes | None] = {}
    for name, entry in await tree.listing(ino):
        node = await tree.lookup(ino, name)
        path = prefix + name
        if isinstance(entry, DirEntry):
            out[path] = None
            out.update(await snap_tree(tree, node.ino, path + b"/"))
        elif isinstance(entry, SymlinkEntry):
            out[path] = b"-> " + tree.readlink(node.ino)
        else:
            fh = tree.open(node.ino, False)
            try:
                out[path] = await tree.read(fh, 0, entry.size + 1)  # type: ignore[union-attr]
            finally:
                tree.release(fh)
        tree.forget(node.ino, 1)
    return out


async def snapshot_root(tree: SnapshotTree, name: str) -> int:
    return (await tree.lookup(TOP_INO, name.encode())).ino


async def snapshot_of(eng: Engine, name: str, made: dict[str, bytes | None] | None = None
                      ) -> Snapshot | None:
    """Makes `made` (path: content, None: a folder; in order), then takes snapshot `name`
    once this machine's changes have landed (what a snapshot records)."""
    fs = EngineDriver(eng)
    for path, data in (made or {}).items():
        if data is None:
            await fs.mkdir(path)
        else:
            await fs.create(path, data)
    await eng.uploader.wait_idle()
    return await eng.take_snapshot(name)


def test_names() -> None:
    assert default_name(0) == "1970-01-01T000000Z"
    assert check_snapshot_name("before-cleanup_2") == "before-cleanup_2"
    for bad in ("", ".hidden", "a/b", "x" * 101, "a b", "snap.json", "-x"):
        with pytest.raises(ImgrepoError, match="bad snapshot name"):
            check_snapshot_name(bad)


def test_format_round_trips_and_refuses_damage() -> None:
    from fsrepo.errors import RepositoryFormatError
    from fsrepo.snapshots import DirRecord, Snapshot
    snap = Snapshot("s", 12.5, "m", "hourly:2026-12-05T14", {"root": DirRecord("a" * 64, "t")})
    assert parse_snapshot(serialise_snapshot(snap), "s") == snap
    for bad in (b"{", b"[]", b'{"imgrepo_snapshot": 2}',
                b'{"imgrepo_snapshot":1,"created":1,"machine":"m","dirs":{"root":["x","t"]}}',
                b'{"imgrepo_snapshot":1,"created":1,"machine":"m","dirs":{"../x":["' + b"a" * 64
                + b'","t"]}}'):
        with pytest.raises(RepositoryFormatError):
            parse_snapshot(bad, "s")


def test_each_earlier_state_reads_back(storage: StorageTarget, tmp_path: Path) -> None:
    """Delete a folder, overwrite a file, rename a tree: each snapshot reads back byte for
    byte, also from a second machine with an empty cache."""
    async def main() -> None:
        async with engine_on(storage, tmp_path / "a") as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("2024")
            await fs.mkdir("2024/trip")
            await fs.create("2024/trip/a.jpg", b"A" * 5000)
            await fs.create("2024/b.jpg", b"B original")
            await fs.symlink("link", b"2024/b.jpg")
            first = await snapshot_of(eng, "first")
            assert set(first.dirs) >= {"root"}
            await fs.rename("2024/trip", "trip-moved")
            await fs.create("2024/b.jpg.new", b"B edited!")
            await fs.rename("2024/b.jpg.new", "2024/b.jpg")
            await snapshot_of(eng, "second")
            await fs.unlink("trip-moved/a.jpg")
            await fs.rmdir("trip-moved")
            await eng.uploader.wait_idle()
            with pytest.raises(PreconditionFailed):
                await eng.take_snapshot("second")
        expected_first = {b"2024": None, b"2024/trip": None, b"2024/trip/a.jpg": b"A" * 5000,
                          b"2024/b.jpg": b"B original", b"link": b"-> 2024/b.jpg"}
        expected_second = {b"2024": None, b"trip-moved": None,
                           b"trip-moved/a.jpg": b"A" * 5000, b"2024/b.jpg": b"B edited!",
                           b"link": b"-> 2024/b.jpg"}
        async with engine_on(storage, tmp_path / "b") as eng:
            tree = eng.snapshot_tree
            assert [n for n, _ in await tree.listing(TOP_INO)] == [b"first", b"second"]
            assert await snap_tree(tree, await snapshot_root(tree, "first")) == expected_first
            assert await snap_tree(tree, await snapshot_root(tree, "second")) == expected_second
            # and the live tree has moved on
            with pytest.raises(FsError):
                await EngineDriver(eng).node("trip-moved")

    trio.run(main)


def test_a_snapshot_is_read_only_and_deleted_by_rmdir(storage: StorageTarget,
                                                      tmp_path: Path) -> None:
    async def main() -> None:
        async with engine_on(storage, tmp_path / "a") as eng:
            await snapshot_of(eng, "s1", {"x.jpg": b"x"})
            tree = eng.snapshot_tree
            root = await snapshot_root(tree, "s1")
            node = await tree.lookup(root, b"x.jpg")
            with pytest.raises(FsError) as err:
                tree.open(node.ino, True)
            assert err.value.errno == 30  # EROFS
            with pytest.raises(FsError) as err:
                await tree.delete(root, b"x.jpg")
            assert err.value.errno == 30
            await tree.delete(TOP_INO, b"s1")
            assert await tree.listing(TOP_INO) == []
            with pytest.raises(FsError) as err:
                await tree.delete(TOP_INO, b"s1")
            assert err.value.errno == 2

    trio.run(main)


def test_copying_a_file_back_uploads_nothing(storage: StorageTarget, tmp_path: Path) -> None:
    async def main() -> None:
        async with engine_on(storage, tmp_path / "a") as eng:
            fs = EngineDriver(eng)
            await snapshot_of(eng, "s1", {"2024": None, "2024/x.jpg": b"precious" * 1000})
            await fs.unlink("2024/x.jpg")
            await eng.uploader.wait_idle()
        counting: list[CountingStore] = []

        def wrap(inner: Store) -> Store:
            counting.append(CountingStore(inner))
            return counting[0]

        async with engine_on(storage, tmp_path / "b", wrap_store=wrap) as eng:
            tree = eng.snapshot_tree
            files = await snap_tree(tree, await snapshot_root(tree, "s1"))
            before = counting[0].snapshot()
            await EngineDriver(eng).create("2024/x.jpg", files[b"2024/x.jpg"])  # type: ignore[arg-type]
            await eng.uploader.wait_idle()
            cost = counting[0].since(before)
            assert cost.calls.get(PUT_FILE_CREATED, 0) == 0
            assert await EngineDriver(eng).read("2024/x.jpg") == b"precious" * 1000

    trio.run(main)


def test_a_snapshot_after_changing_one_directory_of_many_costs_a_handful(
        storage: StorageTarget, tmp_path: Path) -> None:
    """1,000 directories, one changed: the second snapshot copies one manifest."""
    dirs = 1000

    async def main() -> None:
        counting: list[CountingStore] = []

        def wrap(inner: Store) -> Store:
            counting.append(CountingStore(inner, by_key=True))
            return counting[0]

        async with engine_on(storage, tmp_path / "a", wrap_store=wrap) as eng:
            fs = EngineDriver(eng)
            for i in range(dirs):
                await fs.mkdir(f"d{i:04}")
                await fs.create(f"d{i:04}/f", str(i).encode())
            await eng.uploader.wait_idle()
            store = counting[0]
            before = store.snapshot()
            first = await eng.take_snapshot("first")
            assert len(first.dirs) == dirs + 1
            full = store.since(before)
            assert full.under(COPY_PREFIX).calls.get(PUT, 0) == dirs + 1
            await fs.create("d0500/g", b"new")
            await eng.uploader.wait_idle()
            before = store.snapshot()
            second = await eng.take_snapshot("second")
            cost = store.since(before)
            d0500 = (await fs.node("d0500"))[1].id  # type: ignore[union-attr]
            assert {d for d in second.dirs if second.dirs[d] != first.dirs[d]} == {d0500}
            # a listing of snapshots/, one of dirs/ (2 pages on s3 at 1000 a page), one
            # manifest copy, the snapshot object; the manifest itself this machine has
            # cached (on s3 the listing's etag proves it; file:// reads it: one GET)
            assert cost.under(COPY_PREFIX).calls.get(PUT, 0) == 1
            assert cost.under(SNAPSHOT_PREFIX).calls.get(PUT_IF_NONE_MATCH, 0) == 1
            assert cost.calls.get(GET, 0) <= 1
            assert cost.calls.get(LIST, 0) <= 3
            assert cost.total() <= 6, cost.calls

    trio.run(main)


def test_snapshot_content_is_kept_locally_and_checked(storage: StorageTarget,
                                                      tmp_path: Path) -> None:
    async def main() -> None:
        async with engine_on(storage, tmp_path / "a") as eng:
            snap = await snapshot_of(eng, "s", {"f": b"1"})
            sha = snap.dirs["root"].sha
            copy = eng.snapshots.cache_dir / "dirs" / sha[:2] / sha
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == snap.dirs["root"].sha

    trio.run(main)


def test_local_copies_go_with_the_last_snapshot_naming_them(storage: StorageTarget,
                                                            tmp_path: Path) -> None:
    async def main() -> None:
        async with engine_on(storage, tmp_path / "a") as eng:
            s1 = await snapshot_of(eng, "s1", {"f": b"1"})
            s2 = await snapshot_of(eng, "s2", {"g": b"2"})
            s3 = await snapshot_of(eng, "s3", {"h": b"3"})
            copies = eng.snapshots.cache_dir / "dirs"

            def local(snap: Snapshot) -> Path:
                sha = snap.dirs["root"].sha
                return copies / sha[:2] / sha

            old = time.time() - 3600  # older than the grace a recording snapshot gets
            for snap in (s1, s2, s3):
                os.utime(local(snap), (old, old))
            young = copies / "ab" / ("ab" + "0" * 62)  # as if a snapshot were being recorded
            young.parent.mkdir(exist_ok=True)
            young.write_bytes(b"{}")
            await eng.snapshots.delete("s1")
            assert not local(s1).exists() and local(s2).exists() and local(s3).exists()
            assert young.exists()
            # deleted by another machine: seen at the next listing, its copy goes too
            await eng.store.delete(SNAPSHOT_PREFIX + "s2.json")
            assert [s.name for s in await eng.snapshots.names()] == ["s3"]
            assert not local(s2).exists() and local(s3).exists()
            assert await snap_tree(eng.snapshot_tree, await snapshot_root(
                eng.snapshot_tree, "s3")) == {b"f": b"1", b"g": b"2", b"h": b"3"}

    trio.run(main)


def test_gc_keeps_what_snapshots_name_and_frees_what_only_deleted_ones_held(
        storage: StorageTarget, tmp_path: Path) -> None:
    from fsrepo.maintenance.gc import collect
    from fsrepo.repository import blob_key
    from fsrepo.snapshots import copy_key

    gone = b"only a snapshot has me" * 100
    sha = hashlib.sha256(gone).hexdigest()

    async def main() -> None:
        async with engine_on(storage, tmp_path / "a") as eng:
            fs = EngineDriver(eng)
            snap = await snapshot_of(eng, "s1", {
                "2024": None, "2024/x.jpg": gone, "2024/kept.jpg": b"kept"})
            await fs.unlink("2024/x.jpg")
            await eng.uploader.wait_idle()
            store = eng.store
            c = await collect(store, 0, dry_run=False)
            assert c.deleted == 0 and c.snapshot_copies_deleted == 0
            assert await store.head(blob_key(sha)) == len(gone)
            await eng.snapshots.delete("s1")
            dry = await collect(store, 0, dry_run=True)
            assert dry.deleted_shas == [sha] and dry.snapshot_copies_deleted == len(snap.dirs)
            c = await collect(store, 0, dry_run=False)
            assert c.deleted_shas == [sha]
            assert c.snapshot_copies_deleted == len(snap.dirs)
            assert await store.head(blob_key(sha)) is None
            assert await store.head(copy_key(snap.dirs["root"].sha)) is None
            assert await EngineDriver(eng).read("2024/kept.jpg") == b"kept"

    trio.run(main)


def test_gc_keeps_a_young_copy_no_snapshot_names_yet(storage: StorageTarget,
                                                     tmp_path: Path) -> None:
    """A machine recording a snapshot writes its copies first: within the grace period a
    copy (and the blobs it names) stays even though no snapshot names it yet."""
    from fsrepo.maintenance.gc import collect
    from fsrepo.snapshots import copy_key, snapshot_key

    async def main() -> None:
        async with engine_on(storage, tmp_path / "a") as eng:
            fs = EngineDriver(eng)
            snap = await snapshot_of(eng, "s1", {"x.jpg": b"x" * 1000})
            await eng.store.delete(snapshot_key("s1"))  # as if its object were not yet written
            await fs.unlink("x.jpg")
            await eng.uploader.wait_idle()
            now = time.time()
            c = await collect(eng.store, 1, dry_run=False, now=now)
            assert c.deleted == 0 and c.snapshot_copies_deleted == 0
            assert await eng.store.head(copy_key(snap.dirs["root"].sha)) is not None
            # Two hours on, found unnamed an hour ago at least: the copy goes; the blob
            # only it named is found unreferenced now, and goes an hour after that.
            c = await collect(eng.store, 1, dry_run=False, now=now + 2 * 3600)
            assert c.snapshot_copies_deleted == len(snap.dirs) and c.deleted == 0
            assert await eng.store.head(copy_key(snap.dirs["root"].sha)) is None
            c = await collect(eng.store, 1, dry_run=False, now=now + 4 * 3600)
            assert c.deleted_shas == [hashlib.sha256(b"x" * 1000).hexdigest()]

    trio.run(main)


def test_verify_checks_snapshots_and_counts_their_blobs_as_used(storage: StorageTarget,
                                                                tmp_path: Path) -> None:
    from fsrepo.maintenance.verify import verify
    from fsrepo.repository import blob_key
    from fsrepo.snapshots import copy_key

    async def main() -> None:
        async with engine_on(storage, tmp_path / "a") as eng:
            fs = EngineDriver(eng)
            snap = await snapshot_of(eng, "s1", {"d": None, "d/x.jpg": b"snapshot only"})
            await fs.unlink("d/x.jpg")
            await eng.uploader.wait_idle()
            v = await verify(eng.store)
            assert v.snapshots == 1 and not v.problems
            assert not [n for n in v.notes if n["kind"] == "unreferenced-blobs"]
            await eng.store.delete(blob_key(hashlib.sha256(b"snapshot only").hexdigest()))
            v = await verify(eng.store)
            assert [p["path"] for p in v.problems] == ["/d/x.jpg"], v.problems
            assert "snapshot s1: /d/x.jpg: its content" in v.problems[0]["message"]
            d_id = next(d for d in snap.dirs if d != "root")
            await eng.store.delete(copy_key(snap.dirs["root"].sha))
            v = await verify(eng.store)
            kinds = sorted(p["kind"] for p in v.problems)
            assert kinds == ["snapshot-blob", "snapshot-copy"], v.problems
            # (the root's copy gone, the folder is named by its id)
            assert {p["path"] for p in v.problems} == {"/", f"/(folder {d_id})/x.jpg"}

    trio.run(main)


class Unplugged(Store):
    """A store that can be cut off: while `plugged` is False it says it is offline and
    every request fails, as the connectivity guard makes them."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url, self.plugged = inner, inner.url, True

    @property
    def online(self) -> bool:
        return self.plugged

    def _check(self) -> None:
        if not self.plugged:
            raise self.offline_error()

    async def get(self, key, if_none_match=None):  # noqa: ANN001, ANN201
        self._check()
        return await self.inner.get(key, if_none_match)

    async def get_range(self, key, start, end):  # noqa: ANN001, ANN201
        self._check()
        return await self.inner.get_range(key, start, end)

    async def download(self, key, dest, start=0, on_chunk=None):  # noqa: ANN001, ANN201
        self._check()
        return await self.inner.download(key, dest, start, on_chunk)

    async def put(self, key, data, *, if_match=None, if_none_match=False):  # noqa: ANN001, ANN201
        self._check()
        return await self.inner.put(key, data, if_match=if_match, if_none_match=if_none_match)

    async def put_file(self, key, path, sha256_hex):  # noqa: ANN001, ANN201
        self._check()
        return await self.inner.put_file(key, path, sha256_hex)

    async def head(self, key):  # noqa: ANN001, ANN201
        self._check()
        return await self.inner.head(key)

    async def list(self, prefix):  # noqa: ANN001, ANN201
        self._check()
        async for info in self.inner.list(prefix):
            yield info

    async def delete(self, key):  # noqa: ANN001, ANN201
        self._check()
        return await self.inner.delete(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_snapshot_read_once_reads_again_offline(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/repo"

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "a") as eng:
            await snapshot_of(eng, "s1", {"d": None, "d/x.jpg": b"kept offline"})
        plugs: list[Unplugged] = []

        def wrap(inner: Store) -> Store:
            plugs.append(Unplugged(inner))
            return plugs[-1]

        async with running_engine(url, None, tmp_path / "b", wrap_store=wrap) as eng:
            tree = eng.snapshot_tree
            expected = {b"d": None, b"d/x.jpg": b"kept offline"}
            assert await snap_tree(tree, await snapshot_root(tree, "s1")) == expected
        async with running_engine(url, None, tmp_path / "b", wrap_store=wrap) as eng:
            plugs[-1].plugged = False  # a new process, offline: from the local copies
            tree = eng.snapshot_tree
            assert [n for n, _ in await tree.listing(TOP_INO)] == [b"s1"]
            assert await snap_tree(tree, await snapshot_root(tree, "s1")) == expected

    trio.run(main)


def test_a_name_taken_again_shows_the_new_snapshot_under_new_inodes(tmp_path: Path) -> None:
    """The kernel keeps a file's pages by inode: a snapshot deleted and taken again under
    the same name must not show the old content through an inode it still holds."""
    async def main() -> None:
        async with running_engine(f"file://{tmp_path}/repo", None, tmp_path / "a") as eng:
            fs = EngineDriver(eng)
            await snapshot_of(eng, "s", {"f": b"version 1"})
            tree = eng.snapshot_tree
            held = await tree.lookup(await snapshot_root(tree, "s"), b"f")  # kernel holds it
            await tree.delete(TOP_INO, b"s")
            await fs.create("f.new", b"version 2!")
            await fs.rename("f.new", "f")
            await snapshot_of(eng, "s")
            again = await tree.lookup(await snapshot_root(tree, "s"), b"f")
            assert again.ino != held.ino
            assert await snap_tree(tree, await snapshot_root(tree, "s")) == {b"f": b"version 2!"}

    trio.run(main)
