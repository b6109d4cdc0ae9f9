"""What a cold walk (an empty cache, the prefetcher running, as in the mount) sends to the
bucket, counted at the store on both backends: one GET per folder's manifest and nothing
else per folder (no HEAD, no listing, no manifest read twice). The cold `find` of issue 14
is these GETs, so they are what the S3 store's direct path and its limiter of small
requests serve."""

from __future__ import annotations

import trio

from fsrepo.manifest import ROOT_ID, DirEntry
from fsrepo.store.counting import GET

from .coreutil import EngineDriver
from .test_request_counts import Counted, counted  # noqa: F401 - the fixture

YEARS, EVENTS = 3, 4


async def _walk(fs: EngineDriver, path: bytes = b"") -> int:
    folders = 0
    for name, entry in (await fs.listdir(path)).items():
        if isinstance(entry, DirEntry):
            folders += 1 + await _walk(fs, path + b"/" + name if path else name)
    return folders


def test_a_cold_walk_sends_one_get_per_folder_and_nothing_else(
        counted: Counted) -> None:  # noqa: F811 - the fixture
    from fsrepo.head_watcher import HeadWatcher

    async def main() -> None:
        async with counted.engine("camera") as eng:
            fs = EngineDriver(eng)
            for y in range(YEARS):
                await fs.mkdir(f"y{y}")
                for e in range(EVENTS):
                    await fs.mkdir(f"y{y}/e{e}")
                    await fs.create(f"y{y}/e{e}/img.jpg", b"%d %d" % (y, e))
            await fs.drain()
        async with counted.engine("laptop") as eng:  # another cache: nothing known
            eng.nursery.start_soon(eng.ns.prefetcher.run)  # type: ignore[attr-defined]
            await HeadWatcher(eng.store, eng.db, eng.ns.views, 10).poll()  # as the mount
            opened = counted.snapshot()  # (the first poll: a few requests, once a mount)
            await eng.ns.views.fetch_ahead(ROOT_ID)  # as the mount does before serving
            assert await _walk(EngineDriver(eng)) == YEARS * (1 + EVENTS)
            await trio.sleep(0.2)  # whatever the prefetcher would still send
            cost = counted.since(opened)
        folders = 1 + YEARS * (1 + EVENTS)
        manifests = cost.under("dirs/")
        assert manifests.calls == {GET: folders}, cost.by_key
        assert all(n == 1 for n in cost.by_key.values()), cost.by_key  # none read twice
        assert cost.total() == folders, cost

    trio.run(main)
