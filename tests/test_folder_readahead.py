"""The folder read-ahead (fsrepo/folder_readahead.py): a folder read in order has its next
files' blobs fetched before they are opened, each blob once, within its bounds (files,
bytes, the cache limit beside what must stay), and no further once the order breaks; a
damaged blob fetched ahead fails only its own reader. Core tests count downloads at the
store (CountingStore); the last test counts GETs at an HTTP proxy in front of a real mount.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from fsrepo.engine import Engine
from fsrepo.errors import FsError
from fsrepo.repository import blob_key, manifest_key
from fsrepo.store.base import Store
from fsrepo.store.counting import DOWNLOAD, CountingStore

from .coreutil import engine_on, read_file, resolve, write_file
from .mountutil import poll, run_cli
from .targets import StorageTarget

FILE = 10 * 1024
FOLDER = "album"


def photo(i: int) -> bytes:
    return hashlib.sha256(b"photo %d" % i).digest() * (FILE // 32)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def name(i: int) -> str:
    return f"IMG_{i:04d}.jpg"


async def put_folder(storage: StorageTarget, count: int, damaged: int | None = None) -> None:
    """A repository whose folder `album` holds `count` photos, put through the store API
    (as another machine left them); photo `damaged` has one byte flipped in the bucket."""
    from .test_chunks import put_repository  # (the descriptor of a current repository)

    store = storage.open()
    try:
        await put_repository(store)
        dir_id = uuid.uuid4().hex
        entries = {}
        for i in range(count):
            data = photo(i)
            body = data if i != damaged else bytes([data[0] ^ 1]) + data[1:]
            await store.put(blob_key(sha(data)), body)
            entries[name(i)] = {"type": "file", "sha256": sha(data), "size": len(data),
                                "mtime_ns": 0, "mode": 0o644}
        await store.put(manifest_key(dir_id), json.dumps(
            {"imgrepo_manifest": 1, "dir_id": dir_id, "entries": entries}).encode())
        await store.put(manifest_key("root"), json.dumps(
            {"imgrepo_manifest": 1, "dir_id": "root", "entries": {
                FOLDER: {"type": "dir", "id": dir_id, "mtime_ns": 0, "mode": 0o755}}}).encode())
    finally:
        await store.aclose()


class GatedStore(CountingStore):
    """Counts requests (by key); downloads of the keys in `held` wait until `release`."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner, by_key=True)
        self.held: set[str] = set()
        self.opened = trio.Event()

    def release(self) -> None:
        self.opened.set()

    async def download(self, key, dest, start=0, on_chunk=None):  # noqa: ANN001, ANN201
        if key in self.held:
            await self.opened.wait()
        return await super().download(key, dest, start, on_chunk)


def gated() -> tuple[list[GatedStore], Callable[[Store], Store]]:
    made: list[GatedStore] = []

    def wrap(inner: Store) -> Store:
        made.append(GatedStore(inner))
        return made[-1]

    return made, wrap


def downloads(store: CountingStore, i: int) -> int:
    return store.snapshot().by_key.get((DOWNLOAD, blob_key(sha(photo(i)))), 0)


def all_downloads(store: CountingStore) -> int:
    return store.snapshot()[DOWNLOAD]


async def settle(engine: Engine) -> None:
    """Wait until no download is in flight and the finished ones' bookkeeping (index rows,
    eviction) has run."""
    while engine.cache.settling:
        await trio.sleep(0.01)


async def read_photo(engine: Engine, i: int) -> bytes:
    return await read_file(engine, f"{FOLDER}/{name(i)}")


def test_a_folder_read_in_order_fetches_ahead_and_each_blob_once(storage: StorageTarget,
                                                                   tmp_path: Path):
    count = 40

    async def main() -> None:
        await put_folder(storage, count)
        made, wrap = gated()
        async with engine_on(storage, tmp_path / "cache", upload=False,
                             wrap_store=wrap) as engine:
            store = made[0]
            store.held = {blob_key(sha(photo(i))) for i in range(2, count)}
            assert await read_photo(engine, 0) == photo(0)
            assert await read_photo(engine, 1) == photo(1)
            # Two in order: the next 16 are on their way (held at the store), no more.
            assert all_downloads(store) == 2
            while sha(photo(1)) in engine.cache.downloads:  # (its bookkeeping ends)
                await trio.sleep(0.01)
            assert len(engine.cache.downloads) == 16
            assert all(sha(photo(i)) in engine.cache.downloads for i in range(2, 18))
            # Opened while its blob is fetched ahead: it waits for that download.
            node, _ = await resolve(engine, f"{FOLDER}/{name(2)}")
            handle = await engine.files.open(node, os.O_RDONLY)
            assert handle.download is engine.cache.downloads[sha(photo(2))]
            got: list[bytes] = []

            async def reader() -> None:
                got.append(await engine.files.read(handle.fh, 0, FILE))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.sleep(0.05)
                assert not got  # still waiting for the held download
                store.release()
            await engine.files.release(handle.fh)
            assert got == [photo(2)]
            for i in range(3, count):
                assert await read_photo(engine, i) == photo(i)
            await settle(engine)
            # One GET per blob, never two; every one of them read.
            assert [downloads(store, i) for i in range(count)] == [1] * count
            assert engine.files.ahead.started == count - 2 == engine.files.ahead.used
            assert engine.files.ahead.guessed_bytes == 0

    trio.run(main)


def test_the_read_ahead_is_bounded_in_files_bytes_and_by_the_cache_limit(tmp_path: Path):
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def started_after_two(cache: str, **options: object) -> int:
        made, wrap = gated()
        async with engine_on(storage, tmp_path / cache, upload=False, wrap_store=wrap,
                             **options) as engine:
            if cache == "bytes":
                engine.files.ahead.max_bytes = 3 * FILE
            mine = os.urandom(6 * FILE)
            if cache == "full":  # a file written here, not in the bucket yet: must stay
                await write_file(engine, "mine.bin", mine)
                await engine.files.name_closed()  # (a blob in the cache from now on)
            await read_photo(engine, 0)
            await read_photo(engine, 1)
            started = engine.files.ahead.started
            await settle(engine)
            if cache == "full":
                assert sha(mine) in engine.cache.pending and engine.cache.has(sha(mine))
                assert engine.cache.path(sha(mine)).read_bytes() == mine
                assert engine.cache.used <= engine.cache.limit
            return started

    async def main() -> None:
        await put_folder(storage, 40)
        assert await started_after_two("files", read_ahead_files=4) == 4
        assert await started_after_two("bytes") == 3
        # 10 files' room, 6 taken by the pending file, 2 by the photos read (evictable):
        # the guesses may only take what is left beside the pending file.
        assert await started_after_two("full", cache_size=10 * FILE) == 4
        assert await started_after_two("off", read_ahead_files=0) == 0

    trio.run(main)


def test_the_read_ahead_stops_when_the_order_breaks(tmp_path: Path):
    storage = StorageTarget(url=f"file://{tmp_path}/repository")
    count = 60

    async def main() -> None:
        await put_folder(storage, count)
        made, wrap = gated()
        async with engine_on(storage, tmp_path / "cache", upload=False,
                             wrap_store=wrap) as engine:
            store, ahead = made[0], engine.files.ahead
            # Jumps: never two in order, so nothing is fetched ahead.
            jumps = [0, 20, 5, 30, 10, 40, 15, 45]
            for i in jumps:
                assert await read_photo(engine, i) == photo(i)
            await settle(engine)
            assert ahead.started == 0 and all_downloads(store) == len(jumps)
            # In order (51, 52): 16 fetched ahead; then the reader jumps away.
            await read_photo(engine, 51)
            await read_photo(engine, 52)
            assert ahead.started == count - 53  # (to the folder's end: 7)
            for i in (25, 3, 35, 8):
                await read_photo(engine, i)
            await settle(engine)
            assert ahead.started == count - 53  # nothing more
            assert ahead.guessed_bytes == 0  # the guesses were let go ...
            assert all_downloads(store) == len(jumps) + 2 + (count - 53) + 4
            # ... and kept: reading them later costs nothing more.
            before = all_downloads(store)
            for i in range(53, count):
                assert await read_photo(engine, i) == photo(i)
            assert all_downloads(store) == before

    trio.run(main)


def test_a_reader_gone_idle_lets_its_guesses_go(tmp_path: Path):
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await put_folder(storage, 40)
        async with engine_on(storage, tmp_path / "cache", upload=False) as engine:
            ahead, now = engine.files.ahead, [1000.0]
            ahead.clock = lambda: now[0]
            await read_photo(engine, 0)
            await read_photo(engine, 1)
            assert ahead.started == 16 and ahead.guessed_bytes == 16 * FILE
            now[0] += 31  # the reader went away; whoever opens the next one starts afresh
            assert await read_photo(engine, 2) == photo(2)
            assert ahead.guessed_bytes == 0 and ahead.started == 16

    trio.run(main)


@pytest.mark.expected_logs(r"corrupt|download of blob .* failed|read failed",
                           reason="photo 4 is damaged in the bucket on purpose")
def test_a_damaged_blob_fetched_ahead_fails_only_its_own_reader(tmp_path: Path):
    storage = StorageTarget(url=f"file://{tmp_path}/repository")
    count, bad = 12, 4

    async def main() -> None:
        await put_folder(storage, count, damaged=bad)
        made, wrap = gated()
        async with engine_on(storage, tmp_path / "cache", upload=False,
                             wrap_store=wrap) as engine:
            store = made[0]
            for i in range(count):
                if i == bad:
                    with pytest.raises(FsError) as failed:
                        await read_photo(engine, i)
                    assert failed.value.errno == errno.EIO
                else:
                    assert await read_photo(engine, i) == photo(i)
            await settle(engine)
            assert engine.files.ahead.started == count - 2
            assert [downloads(store, i) for i in range(count)] == [1] * count
            assert not engine.cache.has(sha(photo(bad)))
            # Opened again, it is fetched again (perhaps repaired meanwhile): still EIO.
            with pytest.raises(FsError):
                await read_photo(engine, bad)
            assert downloads(store, bad) == 2

    trio.run(main)


def test_cat_of_a_folder_on_a_real_mount_sends_one_get_per_blob(s3_bucket, s3_proxy,
                                                                 mounter):
    count = 60
    writer = mounter(s3_bucket.url, name="writer", endpoint_url=s3_bucket.endpoint_url)
    folder = writer.path / FOLDER
    folder.mkdir()
    for i in range(count):
        (folder / name(i)).write_bytes(photo(i))
    writer.unmount()
    reader = mounter(s3_bucket.url, name="reader", endpoint_url=s3_proxy.url)
    s3_proxy.reset_counts()

    def gets(i: int) -> int:
        return s3_proxy.count("GET", path=blob_key(sha(photo(i))) + "$")

    # Two photos read in order: the next 16 are fetched without being opened, no more.
    assert (reader.path / FOLDER / name(0)).read_bytes() == photo(0)
    assert (reader.path / FOLDER / name(1)).read_bytes() == photo(1)
    poll(lambda: all(gets(i) == 1 for i in range(2, 18)), timeout=60,
         what="the next 16 photos fetched ahead")
    assert gets(18) == 0
    out = subprocess.run(["sh", "-c", 'cat -- "$1"/*', "sh", str(reader.path / FOLDER)],
                         capture_output=True, timeout=120, check=True).stdout
    assert out == b"".join(photo(i) for i in range(count))
    assert [gets(i) for i in range(count)] == [1] * count  # one GET per blob, never two
    assert s3_proxy.count("GET", path="/blobs/") == count
    # What the guesses cost, for the user to see: the first 16 at least (a file `cat` got
    # to first was fetched for its reader, not ahead), each photo once.
    status = reader.status()
    ahead = status["read_ahead_files"]
    assert 16 <= ahead <= count - 2
    sizes = sorted(len(photo(i)) for i in range(2, count))
    assert sum(sizes[:ahead]) <= status["read_ahead_bytes"] <= sum(sizes[-ahead:])
    text = run_cli(["--status", str(reader.path)], reader.env).stdout
    assert f"read ahead:   {ahead} files" in text and "fetched ahead of readers" in text


def test_read_ahead_files_is_a_setting_and_bad_values_are_refused(tmp_path: Path):
    from fsrepo.config import ConfigError, load_settings

    none = tmp_path / "none.toml"
    assert load_settings({}, none).read_ahead_files == 16
    assert load_settings({"read_ahead_files": "0"}, none).read_ahead_files == 0
    for bad in ("-1", "1001", "many"):
        with pytest.raises(ConfigError, match="read-ahead-files|bad setting"):
            load_settings({"read_ahead_files": bad}, none)
