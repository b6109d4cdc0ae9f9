"""A walk through the mount does not wait one round trip per folder (issue 14): opening a
directory fetches its subdirectories' manifests ahead, several at once, into the local
state; their loads then make no request. A `--sync` walk reads several folders at once."""

from __future__ import annotations

from pathlib import Path

import trio

from fsrepo.inodes import ROOT_INO
from fsrepo.manifest import ROOT_ID, DirEntry
from fsrepo.prefetch import PREFETCH_PARALLEL
from fsrepo.repository import manifest_key
from fsrepo.store.base import Store

from .coreutil import running_engine, write_file

FOLDERS = 24
RTT = 0.02


class SlowGets:
    """Wraps a store's `get` with a round trip's delay; counts calls and the most at once."""

    def __init__(self, store: Store) -> None:
        self.keys: list[str] = []
        self.in_flight = self.most = 0
        self._get = store.get
        store.get = self.get  # type: ignore[method-assign]

    async def get(self, key: str, *args: object, **kw: object) -> object:
        self.keys.append(key)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await trio.sleep(RTT)
            return await self._get(key, *args, **kw)
        finally:
            self.in_flight -= 1


def seed(url: str, cache: Path) -> None:
    async def main() -> None:
        async with running_engine(url, None, cache) as eng:
            for d in range(FOLDERS):
                await write_file(eng, f"d{d:02d}/sub/f", b"%d" % d)
            await eng.uploader.wait_idle()
    trio.run(main)


def test_opening_a_directory_fetches_its_subdirectories_ahead(tmp_path):
    url = "file://" + str(tmp_path / "repo")
    seed(url, tmp_path / "seed")

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", upload=False) as eng:
            eng.nursery.start_soon(eng.ns.prefetcher.run)
            await trio.sleep(0)
            gets = SlowGets(eng.ns.views.store)
            names = await eng.ns.open_listing(ROOT_INO)
            assert len(names) == FOLDERS
            with trio.fail_after(10):
                while not eng.ns.prefetcher.idle:
                    await trio.sleep(0.01)
            assert 2 <= gets.most <= PREFETCH_PARALLEL, gets.most
            fetched = len(gets.keys)
            assert fetched >= FOLDERS
            for name, _ in names:  # the walk's lookups: no request each
                node, _ = await eng.ns.lookup(ROOT_INO, name)
                await eng.ns.views.load(node.dir_id)
            assert len(gets.keys) == fetched
            eng.ns.close_listing(ROOT_INO)
    trio.run(main)


def test_a_walk_finds_the_next_level_fetched_and_nothing_fetched_twice(tmp_path):
    """Opening the root fetches its subdirectories and theirs; a depth-first walk then
    waits for no manifest, and every manifest is read once."""
    url = "file://" + str(tmp_path / "repo")
    seed(url, tmp_path / "seed")

    async def settled(eng, gets: SlowGets) -> None:
        with trio.fail_after(10):
            while not eng.ns.prefetcher.idle:
                await trio.sleep(0.01)

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", upload=False) as eng:
            eng.nursery.start_soon(eng.ns.prefetcher.run)
            await trio.sleep(0)
            gets = SlowGets(eng.ns.views.store)
            await eng.ns.open_listing(ROOT_INO)
            await settled(eng, gets)
            root = manifest_key(ROOT_ID)
            ahead = [k for k in gets.keys if k != root]
            assert len(ahead) == 2 * FOLDERS  # d00..d23 and each one's "sub"
            walked: list[str] = []

            async def visit(ino: int) -> None:
                names = await eng.ns.open_listing(ino)
                for name, entry in names:
                    node, _ = await eng.ns.lookup(ino, name)
                    if isinstance(entry, DirEntry):
                        walked.append(entry.id)
                        await visit(node.ino)
                eng.ns.close_listing(ino)

            await visit(ROOT_INO)
            await settled(eng, gets)
            assert len(walked) == 2 * FOLDERS
            assert [k for k in gets.keys if k != root] == ahead  # nothing more, nothing twice
            assert len(set(ahead)) == len(ahead)
    trio.run(main)


def test_a_sync_walk_reads_several_directories_at_once(tmp_path):
    url = "file://" + str(tmp_path / "repo")
    seed(url, tmp_path / "seed")

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "c", upload=False) as eng:
            gets = SlowGets(eng.ns.views.store)
            started = trio.current_time()
            files = await eng.syncer.walk(ROOT_ID)
            took = trio.current_time() - started
            assert sorted(f.size for _, f in files) == sorted(len(b"%d" % d) for d in range(FOLDERS))
            assert gets.most > 1
            # 49 directories one round trip each: sequentially at least 49 RTTs
            assert took < (2 * FOLDERS + 1) * RTT / 2, took
    trio.run(main)
