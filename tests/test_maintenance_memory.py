"""--verify and --gc hold a million files in compact tables, not their manifests: a level
of the tree (10,000 photo folders, ~150 MB of manifests at 1M files) is read a batch at a
time. Counted by the manifest bodies alive at once, not by timing or RSS."""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from fsrepo.maintenance.gc import collect
from fsrepo.maintenance.verify import BATCH, verify
from fsrepo.maintenance.walk import PARALLEL
from fsrepo.store.base import ObjectInfo, StoredObject
from scripts.maintenance_memory import MemoryRepository


class LiveBodies:
    """Counts the manifest bodies handed out and not yet freed (CPython frees at once)."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def body(self, data: bytes) -> bytes:
        counter = self

        class Body(bytes):
            def __del__(self) -> None:
                counter.now -= 1

        self.now += 1
        self.most = max(self.most, self.now)
        return Body(data)


class CountedRepository:
    """MemoryRepository whose manifest GETs hand out counted bodies."""

    def __init__(self, repo: MemoryRepository, live: LiveBodies) -> None:
        self.repo = repo
        self.live = live

    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject:
        got = await self.repo.get(key, if_none_match)
        if key.startswith("dirs/"):
            await trio.sleep(0)  # others get fetched meanwhile, as over a network
            return StoredObject(self.live.body(got.data), got.etag)
        return got

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        return self.repo.list(prefix)


def test_verify_and_gc_never_hold_a_whole_level_of_manifests() -> None:
    folders = 3 * BATCH  # one level of event folders under the root
    repo = MemoryRepository(folders * 2, folders)
    live = LiveBodies()

    async def main() -> None:
        v = await verify(CountedRepository(repo, live))  # type: ignore[arg-type]
        assert (v.files, v.directories, v.problems) == (folders * 2, folders + 1, [])
        assert live.now == 0
        assert live.most <= BATCH + PARALLEL, live.most
        live.most = 0
        c = await collect(CountedRepository(repo, live), 24, dry_run=True)  # type: ignore[arg-type]
        assert (c.blobs, c.referenced) == (folders * 2, folders * 2)
        assert live.most <= PARALLEL + 1, live.most

    trio.run(main)
