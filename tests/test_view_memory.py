"""Memory of a mount with many folders (issue 14): directory views share their manifest's
entries until a local change, stay within a bound (never evicting one something still
needs), come back from the local state without a request, and forgotten inodes go."""

from __future__ import annotations

from pathlib import Path

import trio

from fsrepo.inodes import ROOT_INO
from fsrepo.store.base import Store

try:
    from .coreutil import list_dir, resolve, running_engine, write_file
except ImportError:
    from coreutil import list_dir, resolve, running_engine, write_file  # type: ignore[no-redef]

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
