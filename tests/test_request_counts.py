"""Exact request counts for dedup, batching and renames, on both backends.

The engine runs on a `CountingStore` (fsrepo/store/counting.py), so what an operation costs
in storage requests is counted in process, the same way on file:// and on S3: a dedup or
batching regression fails here on either backend, not only where an HTTP proxy can count.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from fsrepo.errors import ObjectNotFound
from fsrepo.manifest import ROOT_ID, DirEntry
from fsrepo.repository import manifest_key
from fsrepo.store import Store
from fsrepo.store.counting import (
    DOWNLOAD,
    GET,
    GET_RANGE,
    HEAD,
    PUT_FILE_CREATED,
    PUT_FILE_EXISTED,
    PUT_IF_MATCH,
    PUT_IF_NONE_MATCH,
    CountingStore,
    RequestCounts,
)

from .coreutil import EngineDriver, running_engine
from .targets import StorageTarget


class Counted:
    """Engines on one storage location, each on a CountingStore kept here."""

    def __init__(self, storage: StorageTarget, tmp_path: Path) -> None:
        self.storage = storage
        self.tmp_path = tmp_path
        self.store: CountingStore | None = None

    def _wrap(self, inner: Store) -> Store:
        self.store = CountingStore(inner, by_key=True)
        return self.store

    def engine(self, cache: str, **kw: object):  # noqa: ANN201 - an async context manager
        return running_engine(self.storage.url, self.storage.endpoint_url,
                              self.tmp_path / cache, wrap_store=self._wrap, **kw)

    def snapshot(self) -> RequestCounts:
        assert self.store is not None
        return self.store.snapshot()

    def since(self, earlier: RequestCounts) -> RequestCounts:
        assert self.store is not None
        return self.store.since(earlier)


@pytest.fixture
def counted(storage: StorageTarget, tmp_path: Path) -> Counted:
    return Counted(storage, tmp_path)


def run(fn: Callable[[], object]) -> None:
    trio.run(fn)  # type: ignore[arg-type]


def test_counting_store_counts_each_kind_and_the_bytes(store: Store, tmp_path: Path) -> None:
    async def main() -> None:
        counting = CountingStore(store, by_key=True)
        start = counting.snapshot()
        etag = await counting.put("k", b"12345", if_none_match=True)
        await counting.put("k", b"123456", if_match=etag)
        obj = await counting.get("k")
        assert await counting.get("k", if_none_match=obj.etag) is not None  # NOT_MODIFIED
        assert await counting.get_range("k", 1, 3) == b"23"
        blob = tmp_path / "blob"
        blob.write_bytes(b"x" * 1000)
        sha = hashlib.sha256(b"x" * 1000).hexdigest()
        assert await counting.put_file("blobs/b", blob, sha) is True
        assert await counting.put_file("blobs/b", blob, sha) is False
        assert await counting.head("blobs/b") == 1000
        assert await counting.head("nothing") is None
        await counting.download("blobs/b", tmp_path / "down")
        assert [i.key async for i in counting.list("blobs/")] == ["blobs/b"]
        await counting.delete("k")
        with pytest.raises(ObjectNotFound):
            await counting.get("k")
        cost = counting.since(start)
        assert dict(cost.calls) == {
            "put-if-none-match": 1, "put-if-match": 1, "get": 2, "get-not-modified": 1,
            "get_range": 1, "put_file-created": 1, "put_file-existed": 1, "head": 2,
            "download": 1, "list": 1, "delete": 1}, cost
        assert dict(cost.failed) == {"get": 1}
        assert cost.bytes_sent == 5 + 6 + 1000
        assert cost.bytes_received == 6 + 2 + 1000
        # on blobs/: 2 put_file, 1 head, 1 download, 1 list
        assert cost.under("blobs/").total() == 5
        assert cost.manifest_writes == 2 and cost.uploads == 2
    run(main)


def test_a_second_copy_of_known_content_costs_no_upload_and_no_head(counted: Counted) -> None:
    data = os.urandom(50_000)

    async def main() -> None:
        async with counted.engine("a") as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("one")
            await fs.mkdir("two")
            await fs.drain()
            first = counted.snapshot()
            await fs.create("one/a.jpg", data)
            await fs.drain()
            cost = counted.since(first)
            # New content: one HEAD (is it there already?), one upload, one manifest write.
            assert cost[HEAD] == 1 and cost[PUT_FILE_CREATED] == 1, cost
            assert cost.uploads == 1 and cost.bytes_sent >= len(data), cost
            second = counted.snapshot()
            await fs.create("two/copy.jpg", data)
            await fs.drain()
            cost = counted.since(second)
            # Seen in the bucket moments ago: trusted, so no HEAD and no upload at all.
            assert cost.uploads == 0 and cost[HEAD] == 0, cost
            assert cost.under("dirs/").manifest_writes == 1, cost
            # ... and this machine's change record (its head and the touch object).
            assert cost.under("heads").manifest_writes == 2, cost
            assert cost.manifest_writes == 3, cost
            assert cost.bytes_sent < len(data), cost
    run(main)


def test_another_machine_storing_the_same_bytes_pays_one_head_and_no_upload(
        counted: Counted) -> None:
    data = os.urandom(40_000)

    async def main() -> None:
        async with counted.engine("a") as eng:
            await EngineDriver(eng).create("a.jpg", data)
            await EngineDriver(eng).drain()
        async with counted.engine("b") as other:
            fs = EngineDriver(other)
            await fs.mkdir("elsewhere")
            await fs.drain()
            before = counted.snapshot()
            await fs.create("elsewhere/again.jpg", data)
            await fs.drain()
            cost = counted.since(before)
            assert cost[HEAD] == 1 and cost.uploads == 0, cost
            assert cost[PUT_FILE_EXISTED] == 0 and cost[PUT_FILE_CREATED] == 0, cost
    run(main)


def test_200_files_closed_into_one_directory_take_at_most_10_manifest_writes(
        counted: Counted) -> None:
    async def main() -> None:
        async with counted.engine("a") as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("photos")
            await fs.drain()
            photos = (await fs.node("photos"))[1]
            before = counted.snapshot()
            for i in range(200):
                await fs.create(f"photos/img{i:03d}.jpg", os.urandom(2000) + b"%d" % i)
            await fs.drain()
            cost = counted.since(before)
            key = manifest_key(photos.id)  # type: ignore[union-attr]
            writes = cost.under(key)
            # Batched: each manifest write carries many closes (the bound: 10, for a slow
            # machine whose closes outlast several batching windows), never one per file.
            assert 1 <= writes.manifest_writes <= 10, cost
            # The directory was new: its first write creates its manifest, the others update.
            assert writes[PUT_IF_NONE_MATCH] == 1, cost
            assert writes[PUT_IF_MATCH] == writes.manifest_writes - 1, cost
            # Only this directory's manifest is written (and the change record, at most
            # twice per manifest write), and each blob goes up once.
            assert cost.under("dirs/").manifest_writes == writes.manifest_writes, cost
            assert cost.under("heads").manifest_writes <= 2 * writes.manifest_writes, cost
            assert cost[PUT_FILE_CREATED] == 200 and cost.uploads == 200, cost
            assert cost[HEAD] == 200, cost
    run(main)


def test_a_rename_moves_no_blob_data(counted: Counted) -> None:
    data = os.urandom(80_000)

    async def main() -> None:
        async with counted.engine("a") as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("from")
            await fs.mkdir("to")
            await fs.create("from/big.bin", data)
            await fs.drain()
            before = counted.snapshot()
            await fs.rename("from/big.bin", "to/big.bin")
            await fs.drain()
            cost = counted.since(before)
            assert cost.uploads == 0 and cost[HEAD] == 0, cost
            assert cost.total(DOWNLOAD, GET_RANGE) == 0 and cost.bytes_received < 10_000, cost
            # Two manifest writes: the destination first (created: it was empty), then the
            # source; and no blob key is touched.
            manifests = cost.under("dirs/")
            assert manifests.manifest_writes == 2 and manifests[PUT_IF_MATCH] == 1, cost
            assert cost.under("heads").manifest_writes <= 4, cost  # change record
            assert cost.under("blobs/").total() == 0, cost
            assert await fs.read("to/big.bin") == data
    run(main)


def test_a_new_directory_is_created_with_one_conditional_create_and_no_read(
        counted: Counted) -> None:
    async def main() -> None:
        async with counted.engine("a") as eng:
            fs = EngineDriver(eng)
            await fs.listdir("")  # the root is loaded (one GET: it has no manifest yet)
            before = counted.snapshot()
            await fs.mkdir("fresh")
            await fs.drain()
            fresh = (await fs.node("fresh"))[1]
            cost = counted.since(before)
            # The parent's manifest gains the name; the new directory's own manifest is
            # not written until something is put in it, and nothing is read.
            assert cost.under("dirs/").manifest_writes == 1 and cost[GET] == 0, cost
            assert cost.under("heads").manifest_writes == 2, cost  # change record
            assert cost.under(manifest_key(fresh.id)).total() == 0, cost  # type: ignore[union-attr]
            before = counted.snapshot()
            await fs.create("fresh/x", b"x")
            await fs.drain()
            cost = counted.since(before)
            assert cost.under(manifest_key(fresh.id))[PUT_IF_NONE_MATCH] == 1, cost  # type: ignore[union-attr]
    run(main)


def test_automatic_snapshots_cost_an_idle_mount_nothing_after_its_first_check(
        counted: Counted) -> None:
    """An idle mount's automatic snapshots: the first check lists the snapshots and the
    folders once; after it, while the change records stay unchanged, 24 hourly periods
    send no request at all (the head watcher's one request per --refresh is all). A change
    makes the next period check and take one."""
    from fsrepo.auto_snapshots import AutoSnapshots, changes_seen
    from fsrepo.head_watcher import HeadWatcher
    from fsrepo.snapshot_policy import parse_policy
    from fsrepo.store.counting import LIST

    policy = parse_policy("hourly=24,daily=30,monthly=12")
    assert policy is not None
    now = [1_800_000_000.0]

    async def main() -> None:
        async with counted.engine("a") as eng:
            fs = EngineDriver(eng)
            await fs.create("photo.jpg", b"x")
            await fs.drain()
            watcher = HeadWatcher(eng.store, eng.db, eng.ns.views, 10)
            auto = AutoSnapshots(eng.snapshots, eng.take_snapshot, policy, lambda: True,
                                 clock=lambda: now[0],
                                 seen=lambda: changes_seen(eng.db,
                                                           lambda: eng.uploader.status.commits))
            await watcher.poll()
            first = counted.snapshot()
            assert (await auto.tick() or "").startswith("auto-")
            cost = counted.since(first)
            # is the period's one there? which is the newest? (again to expire) which folders?
            assert cost[HEAD] == 1 and cost.under("snapshots/").total(LIST) == 2, cost
            assert cost.under("dirs/").total(LIST) == 1, cost
            for _ in range(24):
                now[0] += 3600
                await watcher.poll()  # (the mount's own loop; its cost is documented)
                before = counted.snapshot()
                assert await auto.tick() is None
                assert counted.since(before).total() == 0, counted.since(before)
            await fs.create("new.jpg", b"y")
            await fs.drain()
            await watcher.poll()
            now[0] += 3600
            assert (await auto.tick() or "").startswith("auto-")
    run(main)


async def _loaded_folders(fs: EngineDriver, count: int) -> list[str]:
    """`count` folders with a file each, uploaded, and every view loaded: their ids."""
    for i in range(count):
        await fs.mkdir(f"event{i:02d}")
        await fs.create(f"event{i:02d}/img.jpg", b"photo %d" % i)
    await fs.drain()
    ids = []
    for i in range(count):
        await fs.listdir(f"event{i:02d}")
        ids.append((await fs.node(f"event{i:02d}"))[1].id)  # type: ignore[union-attr]
    return ids


def test_an_idle_mount_polls_once_an_interval_and_sweeps_a_listing_per_group(
        counted: Counted) -> None:
    """40 loaded folders, 200 intervals of an hour each (a long --refresh makes the daily
    safety net sweep often enough to count): the change records are polled once an
    interval, and the sweep sends one listing per key-prefix group of folders, never a
    conditional GET per folder (the old sweep: one GET per loaded folder per sweep, 1.25
    requests an interval here). file:// lists no etags: it is swept a GET a folder."""
    from fsrepo.head_watcher import HeadWatcher
    from fsrepo.heads import TOUCH_KEY
    from fsrepo.store.counting import GET_NOT_MODIFIED, LIST
    from fsrepo.view_sweep import SWEEP_PERIOD, SWEEP_SPREAD

    refresh, rounds = 3600.0, 200

    async def main() -> None:
        async with counted.engine("a") as eng:
            fs = EngineDriver(eng)
            ids = await _loaded_folders(fs, 40)
            watcher = HeadWatcher(eng.store, eng.db, eng.ns.views, refresh, legacy=False)
            await watcher.round()  # the first poll reads this machine's own heads listing
            before = counted.snapshot()
            for _ in range(rounds):
                await watcher.round()
            cost = counted.since(before)
            assert cost.under(TOUCH_KEY).total(GET, GET_NOT_MODIFIED) == rounds, cost
            manifests = cost.under("dirs/")
            if counted.storage.url.startswith("s3://"):
                groups = watcher.sweep.groups(ids)
                assert groups <= 16
                lists = manifests[LIST]
                # the pace: `groups` listings per max(day, SPREAD x groups intervals)
                expected = rounds * refresh * groups / max(SWEEP_PERIOD,
                                                           SWEEP_SPREAD * groups * refresh)
                assert expected - 2 <= lists <= expected + 1, cost
                # nothing changed: no folder re-read
                assert manifests.total(GET, GET_NOT_MODIFIED) == 0, cost
                assert cost.total() <= rounds * 1.2, cost
            else:
                assert not watcher.sweep.lists_etags
                assert manifests.total(GET, GET_NOT_MODIFIED) <= rounds / SWEEP_SPREAD + 1, cost
    run(main)


def test_the_safety_net_finds_a_manifest_changed_without_a_change_record(
        counted: Counted) -> None:
    """A writer that crashed between its manifest PUT and its head PUT announced nothing:
    the sweep still finds the folder changed and re-reads it (and only it)."""
    from fsrepo.head_watcher import HeadWatcher
    from fsrepo.manifest import parse_manifest, serialise_manifest

    async def main() -> None:
        async with counted.engine("a") as eng:
            fs = EngineDriver(eng)
            ids = await _loaded_folders(fs, 24)
            target = ids[7]
            got = await eng.store.get(manifest_key(target))
            manifest, _ = parse_manifest(got.data, target)  # type: ignore[union-attr]
            manifest.entries[b"from-elsewhere.jpg"] = manifest.entries[b"img.jpg"]
            await eng.store.put(manifest_key(target), serialise_manifest(manifest),
                                if_match=got.etag)  # type: ignore[union-attr]
            # A huge --refresh: the pace allows a request every SWEEP_SPREAD rounds.
            watcher = HeadWatcher(eng.store, eng.db, eng.ns.views, 1e9, legacy=False)
            before = counted.snapshot()
            for _ in range(8 * len(ids)):  # a whole sweep: <= 4 steps a loaded view
                await watcher.sweep.step()
                if b"from-elsewhere.jpg" in await fs.listdir("event07"):
                    break
            else:
                raise AssertionError("the sweep never re-read the changed folder")
            cost = counted.since(before)
            re_read = {key for (kind, key), n in cost.by_key.items()
                       if kind == GET and key.startswith("dirs/") and n}
            assert re_read == {manifest_key(target)}, cost
    run(main)


def test_a_remount_walks_its_unchanged_cache_with_one_request(counted: Counted) -> None:
    """A remount with its cache, the repository unchanged since its last poll: the first
    poll of the change records is the one request (the descriptor's format is known from
    opening the repository, not asked again); walking every folder (the prefetcher
    running, as in the mount) reads no manifest again. What the scale bench counts during a
    long remount `find` beyond this are the running mount's --refresh polls."""
    from fsrepo.head_watcher import HeadWatcher
    from fsrepo.heads import TOUCH_KEY
    from fsrepo.repository import HEADS_VERSION
    from fsrepo.store.counting import GET_NOT_MODIFIED

    async def walk(fs: EngineDriver, path: bytes = b"") -> int:
        seen = 0
        for name, entry in (await fs.listdir(path)).items():
            seen += 1
            if isinstance(entry, DirEntry):
                seen += await walk(fs, path + b"/" + name if path else name)
        return seen

    async def main() -> None:
        async with counted.engine("laptop") as eng:
            fs = EngineDriver(eng)
            for y in range(3):
                await fs.mkdir(f"y{y}")
                for e in range(4):
                    await fs.mkdir(f"y{y}/e{e}")
                    await fs.create(f"y{y}/e{e}/img.jpg", b"%d %d" % (y, e))
            await fs.drain()
            entries = await walk(fs)
            await HeadWatcher(eng.store, eng.db, eng.ns.views, 10).poll()  # its last poll
        async with counted.engine("laptop") as eng:
            eng.nursery.start_soon(eng.ns.prefetcher.run)  # type: ignore[attr-defined]
            assert eng.format_version is not None and eng.format_version >= HEADS_VERSION
            opened = counted.snapshot()  # the repository is open (the descriptor read)
            watcher = HeadWatcher(eng.store, eng.db, eng.ns.views, 10,
                                  legacy=eng.format_version < HEADS_VERSION)
            await watcher.poll()  # as Mount._first_poll, before serving
            await eng.ns.views.fetch_ahead(ROOT_ID)  # as the mount does before serving
            assert await walk(EngineDriver(eng)) == entries
            await trio.sleep(0.2)  # whatever the prefetcher would still send
            cost = counted.since(opened)
            assert cost.total() == 1, cost.by_key
            assert cost.under(TOUCH_KEY).total(GET, GET_NOT_MODIFIED) == 1, cost
    run(main)
