"""Memory of a mount with many folders (issue 14): directory views share their manifest's
entries until a local change, stay within a bound (never evicting one something still
needs), come back from the local state without a request, and forgotten inodes go."""

from __future__ import annotations

import json
import os
import random
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fsrepo.engine import Engine
from fsrepo.inodes import ROOT_INO
from fsrepo.manifest import DirEntry, FileEntry, parse_manifest
from fsrepo.namespace import Namespace
from fsrepo.store.base import Store

from .coreutil import (
    list_dir,
    overwrite_file,
    read_file,
    remove,
    resolve,
    running_engine,
    write_file,
)
from .mountutil import file_tree, poll

FOLDERS, FILES = 30, 10


def count_gets(store: Store) -> list[str]:
    """Record the keys `store.get` is asked for (the views' reads)."""
    keys: list[str] = []
    get = store.get

    async def counted(key: str, *args: object, **kw: object) -> object:
        keys.append(key)
        return await get(key, *args, **kw)

    store.get = counted  # type: ignore[method-assign]
    return keys


def seed(url: str, cache: Path) -> None:
    async def main() -> None:
        async with running_engine(url, None, cache) as eng:
            for d in range(FOLDERS):
                for f in range(FILES):
                    await write_file(eng, f"d{d:02d}/f{f}", f"{d}/{f}".encode())
            await eng.uploader.wait_idle()
    trio.run(main)


def test_views_share_entries_until_a_local_change(tmp_path):
    url = "file://" + str(tmp_path / "repo")
    seed(url, tmp_path / "seed")

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", upload=False) as eng:
            await list_dir(eng, "d00")
            node, _ = await resolve(eng, "d00")
            view = eng.ns.views.get(node.dir_id)
            assert view.entries is view.remote
            await write_file(eng, "d00/new", b"x")
            assert view.entries is not view.remote
            assert b"new" in view.entries and b"new" not in view.remote
    trio.run(main)


def test_the_view_cache_stays_bounded_and_reloads_without_a_request(tmp_path):
    url = "file://" + str(tmp_path / "repo")
    seed(url, tmp_path / "seed")

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", upload=False,
                                  view_cache_entries=5 * FILES) as eng:
            views = eng.ns.views
            held = await resolve(eng, "d00/f0")  # a name the kernel knows: d00 must stay
            eng.ns.looked_up(held[0])
            for d in range(FOLDERS):
                await list_dir(eng, f"d{d:02d}")
            # the bound, plus the views a change may hold across a load, plus d00
            assert views.entries_held <= 5 * FILES + 17 * FILES + 1 + FOLDERS
            assert len(views) < FOLDERS + 1
            d00 = (await resolve(eng, "d00"))[0].dir_id
            assert views.get(d00) is not None, "evicted a view a known inode needs"
            evicted = [d for d in range(FOLDERS)
                       if views.get((await resolve(eng, f"d{d:02d}"))[0].dir_id) is None]
            assert evicted
            gets = count_gets(views.store)
            names = await list_dir(eng, f"d{evicted[0]:02d}")
            assert sorted(names) == [f"f{f}".encode() for f in range(FILES)]
            assert gets == [], "an evicted view came back with a request"
            # The kernel forgets d00/f0: nothing pins d00 any more.
            eng.ns.forget(held[0].ino, 1)
            assert eng.ns.inodes.get(held[0].ino) is None
            assert views.evictable(d00)
    trio.run(main)


def test_forgotten_inodes_leave_the_table(tmp_path):
    url = "file://" + str(tmp_path / "repo")
    seed(url, tmp_path / "seed")

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", upload=False) as eng:
            before = len(eng.ns.inodes.nodes)
            nodes = []
            for f in range(FILES):
                node, _ = await eng.ns.lookup((await resolve(eng, "d01"))[0].ino,
                                              f"f{f}".encode())
                nodes.append(node)
            d01 = (await resolve(eng, "d01"))[0]
            eng.ns.looked_up(d01)
            assert eng.ns.inodes.has_children(d01.ino)
            for node in nodes:
                eng.ns.forget(node.ino, 1)
            assert not eng.ns.inodes.has_children(d01.ino)
            eng.ns.forget(d01.ino, 1)
            assert not eng.ns.inodes.has_children(ROOT_INO)
            assert len(eng.ns.inodes.nodes) == before
    trio.run(main)


def needed_views_are_loaded(eng) -> None:  # noqa: ANN001
    """Every inode named in a directory has that directory's view in memory, and so has
    every directory with a pending op."""
    ns = eng.ns
    for node in list(ns.inodes.nodes.values()):
        if node.ino == ROOT_INO or node.parent == 0:
            continue
        parent = ns.inodes.get(node.parent)
        assert parent is not None and parent.dir_id is not None
        assert ns.views.get(parent.dir_id) is not None, f"evicted the view {node.name!r} needs"
    for dir_id in list(eng.journal.by_dir):
        if eng.journal.ops_for(dir_id):
            assert ns.views.get(dir_id) is not None, "evicted a view with pending ops"


def kernel_forgets_all_but(eng, held: list[int]) -> None:  # noqa: ANN001
    """What the kernel does under memory pressure: forget every inode it is not using
    (a known inode's directories stay known: its dentry holds theirs)."""
    keep: set[int] = set()
    for ino in held:
        node = eng.ns.inodes.get(ino)
        while node is not None and node.ino not in keep and node.parent != 0:
            keep.add(node.ino)
            node = eng.ns.inodes.get(node.parent)
    for node in list(eng.ns.inodes.nodes.values()):
        if node.ino != ROOT_INO and node.ino not in keep and node.lookups > 0:
            eng.ns.forget(node.ino, node.lookups)
        elif node.ino != ROOT_INO and node.ino not in keep:
            eng.ns.inodes.drop_if_unused(node)


def test_random_changes_with_a_tiny_view_cache_never_lose_a_needed_view(tmp_path):
    url = "file://" + str(tmp_path / "repo")
    rng = random.Random(14)
    dirs = ["a", "a/b", "c", "c/d", "e"]
    model: dict[str, bytes] = {}

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", view_cache_entries=3) as eng:
            eng.ns.views.recent_kept = 3  # what one change holds across its loads, at most
            held: list[int] = []
            for step in range(250):
                choice = rng.random()
                if choice < 0.35 or not model:
                    path = f"{rng.choice(dirs)}/f{rng.randrange(6)}"
                    data = b"%d" % step
                    if path in model:
                        await overwrite_file(eng, path, data)
                    else:
                        await write_file(eng, path, data)
                    model[path] = data
                elif choice < 0.5:
                    path = rng.choice(sorted(model))
                    await remove(eng, path)
                    del model[path]
                elif choice < 0.6:
                    path = rng.choice(sorted(model))
                    target = f"{rng.choice(dirs)}/r{step}"
                    old, _ = await resolve(eng, path.rsplit("/", 1)[0])
                    new, _ = await resolve(eng, target.rsplit("/", 1)[0])
                    await eng.ns.rename(old.ino, path.rsplit("/", 1)[1].encode(), new.ino,
                                        target.rsplit("/", 1)[1].encode())
                    model[target] = model.pop(path)
                elif choice < 0.75:
                    path = rng.choice(sorted(model))
                    parent, _ = await resolve(eng, path.rsplit("/", 1)[0])
                    node, _ = await eng.ns.lookup(parent.ino, path.rsplit("/", 1)[1].encode())
                    held.append(node.ino)  # the kernel keeps it
                elif choice < 0.85 and held:
                    eng.ns.forget(held.pop(rng.randrange(len(held))), 1)
                elif choice < 0.95:
                    d = rng.choice(dirs)
                    names = {n.decode() for n, e in (await list_dir(eng, d)).items()
                             if not isinstance(e, DirEntry)}
                    assert names == {p.rsplit("/", 1)[1] for p in model
                                     if p.rsplit("/", 1)[0] == d}
                else:
                    await eng.uploader.wait_idle()
                needed_views_are_loaded(eng)
                if step % 5 == 0:
                    kernel_forgets_all_but(eng, held)
                    eng.ns.views.trim(0)
                    needed_views_are_loaded(eng)
            await eng.uploader.wait_idle()
            assert eng.ns.views.evictions > 10
            for path, data in model.items():
                assert await read_file(eng, path) == data
    trio.run(main)


def test_the_subdirectories_fetched_ahead_are_those_the_full_parse_finds():
    """Fetching ahead reads a manifest's subdirectories without building its file entries:
    the same ids as the full parse, the same refusal of a document that is unusable."""
    import base64

    import pytest

    from fsrepo.errors import ManifestError
    from fsrepo.manifest import manifest_subdirs

    entries = {"a.jpg": GOOD, "sub": {"type": "dir", "id": "d2", "mtime_ns": 1},
               "bad dir": {"type": "dir", "id": "../x"}, "root": {"type": "dir", "id": "root"},
               "link": {"type": "symlink", "target": "a.jpg", "mtime_ns": 0}}
    raw = {base64.b64encode(b"\xff\xfe").decode(): {"type": "dir", "id": "d3"}}
    body = json.dumps({"imgrepo_manifest": 1, "dir_id": "d1", "entries": entries,
                       "raw_entries": raw}).encode()
    manifest, _ = parse_manifest(body, "d1")
    full = sorted(e.id for e in manifest.entries.values() if isinstance(e, DirEntry))
    assert sorted(manifest_subdirs(body, "d1")) == full == ["d2", "d3"]
    for bad in (b"[]", b"{", json.dumps({"imgrepo_manifest": 1, "dir_id": "other"}).encode(),
                json.dumps({"imgrepo_manifest": 9, "dir_id": "d1"}).encode(),
                json.dumps({"imgrepo_manifest": 1, "dir_id": "d1", "entries": []}).encode()):
        with pytest.raises(ManifestError):
            parse_manifest(bad, "d1")
        with pytest.raises(ManifestError):
            manifest_subdirs(bad, "d1")


GOOD = {"type": "file", "sha256": "ab" * 32, "size": 5, "mtime_ns": 7, "mode": 0o600}


def test_the_quick_parse_of_file_entries_refuses_what_the_full_check_refuses():
    """A remount parses every cached manifest a walk opens, through a one-pass check of
    plain file entries: it must keep nothing the full check refuses."""
    bad_values = [dict(GOOD, sha256="ab" * 32 + "\n"), dict(GOOD, sha256="AB" * 32),
                  dict(GOOD, size=True), dict(GOOD, size=-1), dict(GOOD, size=1 << 51),
                  dict(GOOD, mode=0o10000), dict(GOOD, mtime_ns=1.5),
                  dict(GOOD, mtime_ns=1 << 63)]
    bad_names = ["a/b", "a\0b", ".", "..", "x" * 256]
    doc = {"imgrepo_manifest": 1, "dir_id": "d1",
           "entries": {"ok": GOOD, **{f"v{i}": v for i, v in enumerate(bad_values)},
                       **{name: GOOD for name in bad_names}}}
    manifest, problems = parse_manifest(json.dumps(doc).encode(), "d1")
    assert manifest.entries == {b"ok": FileEntry("ab" * 32, 5, 7, 0o600)}
    assert len(problems) == len(bad_values) + len(bad_names)


def test_a_file_entry_is_packed_and_reads_back_every_field():
    """A walked million files hold a million entries: each is one packed bytes object
    (~100 bytes, not ~245), and reads back exactly what it was made of; chunk lists ride
    along without taking part in equality; an out-of-range time is clamped to what a
    manifest may say (other machines refuse more), not an error."""
    import hashlib
    import sys
    import tracemalloc

    from fsrepo.manifest import (
        Chunks,
        Manifest,
        entry_from_json,
        entry_to_json,
        serialise_manifest,
    )

    sha = "0f" * 32
    entry = FileEntry(sha, (1 << 50), -(1 << 62), 0o7777)
    assert (entry.sha256, entry.size, entry.mtime_ns, entry.mode, entry.chunks) == \
        (sha, 1 << 50, -(1 << 62), 0o7777, None)
    assert entry_from_json(entry_to_json(entry)) == entry
    chunks = Chunks(1 << 16, ("aa" * 32, "bb" * 32))
    chunked = FileEntry(sha, (1 << 16) + 1, 5, 0o600, chunks)
    assert chunked.chunks == chunks and chunked.blobs() == [("aa" * 32, 1 << 16),
                                                           ("bb" * 32, 1)]
    assert chunked == FileEntry(sha, (1 << 16) + 1, 5, 0o600)  # storage is not identity
    assert hash(chunked) == hash(FileEntry(sha, (1 << 16) + 1, 5, 0o600))
    assert entry_from_json(entry_to_json(chunked)).chunks == chunks
    assert chunked.with_attrs(mode=0o644).chunks == chunks
    assert chunked.with_attrs(mtime_ns=9).mtime_ns == 9
    assert entry != FileEntry(sha, 1 << 50, -(1 << 62), 0o7776)
    assert entry != bytes(entry) and entry != DirEntry("d1", -(1 << 62))
    assert FileEntry(sha, 1, 1 << 63).mtime_ns == 1 << 62
    try:
        entry.size = 1  # type: ignore[misc]
    except AttributeError:
        pass
    else:
        raise AssertionError("a file entry must be immutable")
    assert sys.getsizeof(entry) <= 100

    files = 20_000
    body = serialise_manifest(Manifest("d1", {
        b"IMG_%05d.JPG" % i: FileEntry(hashlib.sha256(b"%d" % i).hexdigest(), 3_000_000 + i,
                                       1_700_000_000_000_000_000 + i)
        for i in range(files)}))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        manifest, _ = parse_manifest(body, "d1")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(manifest.entries) == files
    assert held / files < 230, held / files  # name, dict slot and entry (was ~347)


class KernelThatForgets:
    """The kernel's side of an entry invalidation: the file's inode is forgotten."""

    def __init__(self, eng) -> None:  # noqa: ANN001
        self.eng, self.asked = eng, []

    def entry(self, parent_ino: int, name: bytes) -> None:
        self.asked.append((parent_ino, name))
        node = self.eng.ns.inodes.of_name(parent_ino, name)
        if node is not None and node.lookups > 0:
            self.eng.ns.forget(node.ino, node.lookups)

    def inode(self, ino: int) -> None:
        pass


@pytest.fixture
def seeded(tmp_path: Path) -> str:
    """The URL of a repository holding the seeded folders."""
    url = "file://" + str(tmp_path / "repo")
    seed(url, tmp_path / "seed")
    return url


@asynccontextmanager
async def engine_with_a_cap(url: str, tmp_path: Path) -> AsyncIterator[Engine]:
    """An engine on the seeded folders whose kernel may keep five folders' files: only the
    cap sheds (no idle release here), and the last two folders loaded keep theirs."""
    async with running_engine(url, None, tmp_path / "c", upload=False,
                              view_cache_entries=5 * FILES) as eng:
        eng.ns.idle_after = 3600.0
        eng.ns.views.recent_kept = 2
        eng.nursery.start_soon(eng.ns.release_when_idle)
        yield eng


async def walk_every_file(eng: Engine, after_folder: Callable[[], None] = lambda: None) -> int:
    """Every folder's files looked up, as a `find` leaves the kernel; returns the most
    inodes the table held after a folder (the shed runs in the background)."""
    ns, most = eng.ns, 0
    for d in range(FOLDERS):
        dnode, _ = await resolve(eng, f"d{d:02d}")
        ns.looked_up(dnode)
        for f in range(FILES):
            await ns.lookup(dnode.ino, f"f{f}".encode())
        await trio.sleep(0.01)
        most = max(most, len(ns.inodes.nodes))
        after_folder()
    return most


def at_most_the_cap(ns: Namespace) -> int:
    """Folders (31 inodes) stay; files at most the cap, a tenth more, a folder's worth."""
    return ns.kernel_files + ns.kernel_files // 10 + FOLDERS + 1 + 2 * FILES


def test_a_walk_over_more_files_than_the_cap_has_the_kernel_forget_the_oldest(seeded, tmp_path):
    """A `find` over a million files would leave the kernel holding an inode for each (and
    each pins its folder's view): past `kernel_files`, the least recently loaded folders'
    files are asked to be forgotten while the walk goes on, never a file held open nor the
    folders loaded last; every name still resolves afterwards."""
    async def main() -> None:
        async with engine_with_a_cap(seeded, tmp_path) as eng:
            ns = eng.ns
            kernel = ns.invalidator = KernelThatForgets(eng)
            kept, _ = await resolve(eng, "d00/f1")  # a file a process keeps open
            ns.looked_up(kept)
            kept.opens += 1
            most = await walk_every_file(eng, lambda: needed_views_are_loaded(eng))
            assert kernel.asked, "the cap never made the kernel forget"
            assert all(name != b"f1" or parent != kept.parent for parent, name in kernel.asked)
            assert most <= at_most_the_cap(ns)
            assert most < FOLDERS * FILES
            for d in range(FOLDERS):
                for f in range(FILES):
                    assert await read_file(eng, f"d{d:02d}/f{f}") == f"{d}/{f}".encode()
            assert ns.inodes.get(kept.ino) is kept
    trio.run(main)


class KernelStarvedOfTheGil:
    """The kernel's forgets as a busy walk lets them come: pyfuse3 sends invalidations from
    a thread of its own, which runs only while the loop gives up the GIL (`ns.pause`)."""

    def __init__(self, eng) -> None:  # noqa: ANN001
        self.ns, self.queued, self.pauses = eng.ns, deque(), 0

    def entry(self, parent_ino: int, name: bytes) -> None:
        self.queued.append((parent_ino, name))

    def inode(self, ino: int) -> None:
        pass

    def pause(self, seconds: float) -> None:
        self.pauses += 1
        for _ in range(min(len(self.queued), 50)):  # what a pause lets through
            node = self.ns.inodes.of_name(*self.queued.popleft())
            if node is not None and node.lookups > 0:
                self.ns.forget(node.ino, node.lookups)


def test_a_walk_past_the_cap_waits_for_the_forgets_it_asked_for(seeded, tmp_path):
    """A walk that keeps the loop busy starves the thread that sends the shed's
    invalidations: at 1M files the kernel held 420k inodes after one warm `find`, 890k
    after the third, with a cap of 100k. Past the cap, with forgets asked for, each lookup
    first gives the GIL up for a moment; the table stays near the cap."""
    async def main() -> None:
        async with engine_with_a_cap(seeded, tmp_path) as eng:
            ns = eng.ns
            kernel = ns.invalidator = KernelStarvedOfTheGil(eng)
            ns.pause = kernel.pause
            most = await walk_every_file(eng)
            assert kernel.pauses > 0
            assert most <= at_most_the_cap(ns)
            paused = kernel.pauses
            kernel.queued.clear()
            while len(ns.inodes.nodes) > ns.kernel_files:  # under the cap: no pause
                node = next(n for n in ns.inodes.nodes.values() if n.dir_id is None
                            and n.lookups > 0)
                ns.forget(node.ino, node.lookups)
            await ns.lookup((await resolve(eng, "d00"))[0].ino, b"f0")
            assert kernel.pauses == paused
    trio.run(main)


class CountingHeap:
    def __init__(self) -> None:
        self.given_back = 0

    def give_back(self) -> bool:
        self.given_back += 1
        return True


def test_an_idle_mount_has_the_kernel_forget_and_gives_its_memory_back(tmp_path):
    url = "file://" + str(tmp_path / "repo")
    seed(url, tmp_path / "seed")

    async def walk(eng) -> list:  # noqa: ANN001
        """Every folder listed, every name looked up and kept, as `find` leaves the kernel."""
        nodes = []
        for d in range(FOLDERS):
            dnode, _ = await resolve(eng, f"d{d:02d}")
            eng.ns.looked_up(dnode)
            nodes.append(dnode)
            for f in range(FILES):
                node, _ = await eng.ns.lookup(dnode.ino, f"f{f}".encode())
                nodes.append(node)
        return nodes

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", upload=False,
                                  view_cache_entries=5 * FILES) as eng:
            ns = eng.ns
            ns.idle_after, ns.idle_check, ns.forget_wait = 0.3, 0.05, 0.05
            ns.kernel_files = 10 * FOLDERS * FILES  # the walk stays under the cap
            heap = ns.heap = CountingHeap()
            kept = await resolve(eng, "d03/f1")  # a file a process keeps open
            ns.looked_up(kept[0])
            kept[0].opens += 1
            kernel = ns.invalidator = KernelThatForgets(eng)
            eng.nursery.start_soon(ns.release_when_idle)
            await walk(eng)
            walked = ns.views.entries_held
            assert walked >= FOLDERS * FILES and heap.given_back == 0
            await trio.sleep(0.15)  # not idle long enough yet
            assert kernel.asked == [] and heap.given_back == 0
            with trio.fail_after(5):
                while not heap.given_back:
                    await trio.sleep(0.05)
            assert len(kernel.asked) == FOLDERS * FILES - 1  # every file but the open one
            files = [n.ino for n in ns.inodes.nodes.values() if n.dir_id is None]
            assert files == [kept[0].ino]  # the folders stay known (working directories)
            # what trim keeps: the 16 views loaded last, the root (its folders are known)
            assert ns.views.entries_held <= 16 * FILES + FOLDERS < walked
            needed_views_are_loaded(eng)
            asked = len(kernel.asked)
            await trio.sleep(1)  # idle on: asked once per idle period, not again
            assert len(kernel.asked) == asked
            await walk(eng)  # in use again, then idle: asked again
            with trio.fail_after(5):
                while len(kernel.asked) == asked:
                    await trio.sleep(0.05)
    trio.run(main)


def test_an_idle_mount_has_the_kernel_forget_what_a_walk_left(mounter, mount_env, tmp_path):
    """A real kernel: after `idle-release` seconds without use, the file inodes a walk left
    go, but not an open file's; the open file still reads, a process's working directory
    in the mount still works (getcwd), and the next walk sees the same."""
    conf = Path(mount_env["XDG_CONFIG_HOME"]) / "imgrepo"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "config.toml").write_text("idle-release = 1\n")
    m = mounter("file://" + str(tmp_path / "repo"), "--verbose")
    root = m.path
    for d in range(4):
        for s in range(3):
            (root / f"d{d}" / f"s{s}").mkdir(parents=True)
            for f in range(5):
                (root / f"d{d}" / f"s{s}" / f"f{f}").write_bytes(b"%d%d%d" % (d, s, f))
    here = os.getcwd()
    try:
        with open(root / "d1" / "s2" / "f3", "rb") as held:
            seen = len(m.logtext())
            tree = file_tree(root)  # the walk: the kernel now knows every name
            assert len(tree) == 60
            os.chdir(root / "d2")  # a folder of the root, as a shell may sit in

            def released() -> list[str]:
                return re.findall(r"idle release: .* (\d+) inodes and", m.logtext()[seen:])

            inodes = int(poll(released, timeout=60, what="the idle release")[-1])
            assert inodes <= 1 + 4 + 12 + 1, inodes  # root, folders, the open file
            assert held.read() == b"123"
            assert os.getcwd() == str(root / "d2")
            assert sorted(os.listdir(".")) == [f"s{s}" for s in range(3)]
    finally:
        os.chdir(here)
    assert file_tree(root) == tree
    assert not m.unexpected_log_lines(), m.logtext()
