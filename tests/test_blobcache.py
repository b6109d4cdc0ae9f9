"""Downloads into the blob cache are checked against the blob's hash before anyone reads
their end; these cover the bytes that do not arrive in one piece: a download that breaks and
is started again (by the next read) from where readers were told it stands must still be
checked whole."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from fsrepo.blobcache import BlobCache, Download
from fsrepo.errors import IntegrityError, StorageError
from fsrepo.repository import blob_key
from fsrepo.state import LocalState, StateDB
from fsrepo.store.local import LocalStore

MiB = 1 << 20


class BreaksOnce(LocalStore):
    """Its first download fails after `after` bytes, as one does when a connection keeps
    dropping beyond the backend's own retries; `on_break` may then change the object."""

    def __init__(self, root: Path, after: int, on_break: bytes | None = None) -> None:
        super().__init__(root)
        self.after = after
        self.on_break = on_break
        self.starts: list[int] = []

    async def download(self, key: str, dest: Path, start: int = 0,
                       on_chunk: Callable[[int], None] | None = None) -> None:
        self.starts.append(start)
        if len(self.starts) > 1:
            return await super().download(key, dest, start, on_chunk)

        def until_break(end: int) -> None:
            if on_chunk is not None:
                on_chunk(end)
            if end >= self.after:
                raise StorageError("the connection dropped")

        await super().download(key, dest, start, until_break)
        raise AssertionError("the download should have broken")

    async def break_now(self, key: str) -> None:
        if self.on_break is not None:
            await self.put(key, self.on_break)


async def _fetch(tmp_path: Path, store: BreaksOnce, data: bytes) -> tuple[BlobCache, Path]:
    digest = hashlib.sha256(data).hexdigest()
    await store.put(blob_key(digest), data)
    db = StateDB(LocalState(tmp_path / "state.db"))
    cache = BlobCache(tmp_path / "blobs", db, store, 1 << 30)
    original = store.download

    async def download(key: str, dest: Path, start: int = 0,
                       on_chunk: Callable[[int], None] | None = None) -> None:
        try:
            await original(key, dest, start, on_chunk)
        except StorageError:
            await store.break_now(key)
            raise

    store.download = download  # type: ignore[method-assign]
    failure: IntegrityError | None = None
    try:
        async with trio.open_nursery() as nursery:
            cache.nursery = nursery
            try:
                try:
                    path = await cache.ensure(digest, len(data))
                except StorageError:  # the break fails that read; the next one resumes
                    path = await cache.ensure(digest, len(data))
            except IntegrityError as exc:
                failure = exc
    finally:
        db.close()
    if failure is not None:
        assert not cache.has(digest) and not cache.path(digest).exists()
        raise failure
    return cache, path


@pytest.mark.expected_logs(r"download of blob \w+ failed", reason="the connection is dropped on purpose")
@pytest.mark.parametrize("after", [2 * MiB, 5 * MiB + 3], ids=["midway", "at-the-end"])
def test_a_download_resumed_after_a_break_is_verified_whole(tmp_path: Path, after: int) -> None:
    # At the end, readers were told one byte less than arrived (the last byte waits for the
    # check), so the resume starts one byte before the end.
    data = os.urandom(5 * MiB + 3)
    store = BreaksOnce(tmp_path / "repo", after=after)

    async def main() -> None:
        cache, path = await _fetch(tmp_path, store, data)
        assert path.read_bytes() == data
        assert cache.has(hashlib.sha256(data).hexdigest())

    trio.run(main)
    assert store.starts[0] == 0 and min(after, len(data) - 1) == store.starts[1]


@pytest.mark.expected_logs(r"from the bucket is corrupt", reason="the test corrupts the "
                           "blob on purpose; the cache must say so as it refuses it")
@pytest.mark.expected_logs(r"download of blob \w+ failed", reason="the connection is dropped and the bytes changed on purpose")
def test_bytes_changed_behind_a_break_are_caught(tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 3)
    changed = data[:4 * MiB] + bytes(b ^ 0xFF for b in data[4 * MiB:])  # same size
    store = BreaksOnce(tmp_path / "repo", after=2 * MiB, on_break=changed)

    async def main() -> None:
        with pytest.raises(IntegrityError):
            await _fetch(tmp_path, store, data)

    trio.run(main)
    assert len(store.starts) == 2 and store.starts[1] > 0  # the resume was taken


@pytest.mark.expected_logs(r"cannot record blob .* in the cache index", reason="the test "
                           "fills the disk under the cache index on purpose")
def test_a_verified_download_is_served_even_if_the_cache_index_cannot_record_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The index row is bookkeeping (cache accounting across restarts): a full disk under
    # the database must not turn good, verified bytes into a read error.
    data = os.urandom(MiB + 1)
    digest = hashlib.sha256(data).hexdigest()
    store = LocalStore(tmp_path / "repo")

    class FullDisk(LocalState):
        def add_cached_blobs(self, rows: dict[str, int]) -> None:
            raise OSError(28, "No space left on device")

    async def main() -> None:
        await store.put(blob_key(digest), data)
        db = StateDB(FullDisk(tmp_path / "state.db"))
        cache = BlobCache(tmp_path / "blobs", db, store, 1 << 30)
        try:
            async with trio.open_nursery() as nursery:
                cache.nursery = nursery
                path = await cache.ensure(digest, len(data))
        finally:
            db.close()
        assert path.read_bytes() == data and cache.has(digest)

    with caplog.at_level(logging.WARNING, logger="fsrepo"):
        trio.run(main)
    assert any("cache index" in r.getMessage() for r in caplog.records)


def test_a_blob_evicted_as_its_download_ends_is_fetched_again_not_joined(
        tmp_path: Path) -> None:
    # A download fetched ahead (nobody holds it) can be evicted by the cache limit during
    # its own bookkeeping, while it is still listed: a reader arriving then must start a
    # new download, not join the finished one whose file is gone (it answered ENOENT).
    data = os.urandom(3 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    store = LocalStore(tmp_path / "repo")

    async def main() -> None:
        await store.put(blob_key(digest), data)
        db = StateDB(LocalState(tmp_path / "state.db"))
        cache = BlobCache(tmp_path / "blobs", db, store, MiB)  # smaller than the blob
        try:
            async with trio.open_nursery() as nursery:
                cache.nursery = nursery
                first = cache.start_download(digest, len(data))
                await first.finished.wait()
                while cache.has(digest) or cache.path(digest).exists():
                    await trio.sleep(0.01)  # evicted: over the limit, and nobody holds it
                assert cache.downloads.get(digest) in (first, None)
                cache.downloads[digest] = first  # as during its bookkeeping
                cache.acquire(digest)
                again = cache.start_download(digest, len(data))
                assert again is not first
                await again.finished.wait()
                assert again.error is None and cache.path(digest).read_bytes() == data
                cache.release(digest)
        finally:
            db.close()

    trio.run(main)


def test_a_name_made_while_its_eviction_is_on_its_way_survives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Eviction takes a blob out of the index at once and removes its file on a worker
    # thread; a close of the same content in between names the blob again: the removal
    # must leave the new file alone (it may be the only copy of a closed file).
    store = LocalStore(tmp_path / "repo")
    data = os.urandom(2 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    gate = trio.Event()
    to_thread = trio.to_thread.run_sync

    async def after_the_gate(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        await gate.wait()
        return await to_thread(fn, *args, **kwargs)

    async def main() -> None:
        db = StateDB(LocalState(tmp_path / "state.db"))
        cache = BlobCache(tmp_path / "blobs", db, store, MiB)
        try:
            old = tmp_path / "old"
            old.write_bytes(data)
            cache.place(old, digest)
            cache.register(digest, len(data), pending=False)
            monkeypatch.setattr(trio.to_thread, "run_sync", after_the_gate)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cache.evict)
                while cache.has(digest):
                    await trio.sleep(0.01)
                closed = tmp_path / "closed"  # a close of the same content, meanwhile
                closed.write_bytes(data)
                cache.place(closed, digest)
                gate.set()  # the removal runs now
            monkeypatch.undo()
            assert cache.path(digest).read_bytes() == data
        finally:
            db.close()

    trio.run(main)


class RecordingCalls(LocalState):
    """Counts the batches of downloaded blobs written to the cache index's table."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    def add_cached_blobs(self, rows: dict[str, int]) -> None:
        self.batches.append(len(rows))
        super().add_cached_blobs(rows)


class Silent(LocalStore):
    """Streams like any store but never reports progress (on_chunk is not called)."""

    async def download(self, key: str, dest: Path, start: int = 0,
                       on_chunk: Callable[[int], None] | None = None) -> None:
        await super().download(key, dest, start, None)


def _blobs(count: int, size: int) -> list[tuple[str, bytes]]:
    return [(hashlib.sha256(data).hexdigest(), data)
            for data in (os.urandom(size) for _ in range(count))]


def test_downloads_cost_no_verify_hop_and_share_one_index_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-blob bookkeeping is what a cold read of small files spends its CPU on
    # (docs/perf-log.md): a blob is hashed from the store's buffer as it lands (never read
    # back from its file) and sealed without a hop to the verifying threads, and blobs
    # downloaded one after another within the recording's wait are written to the cache
    # index in one call to the database's thread; a mount stopping before the wait is
    # over (its nursery cancelled) still writes them.
    blobs = _blobs(20, 64 * 1024)
    store = LocalStore(tmp_path / "repo")
    state = RecordingCalls(tmp_path / "state.db")
    read_back: list[int] = []
    monkeypatch.setattr(Download, "hash_arrived",
                        lambda self, fd, end: read_back.append(end))

    async def main() -> None:
        for digest, data in blobs:
            await store.put(blob_key(digest), data)
        db = StateDB(state)
        cache = BlobCache(tmp_path / "blobs", db, store, 1 << 30)
        cache.record_after = 3600.0  # (the stop, not the wait, ends this one)
        try:
            async with trio.open_nursery() as nursery:
                cache.nursery = nursery
                for digest, data in blobs:
                    assert (await cache.ensure(digest, len(data))).read_bytes() == data
                assert not cache.downloads and state.batches == []
                nursery.cancel_scope.cancel()
            assert not cache._sealers._threads  # no verifying thread was ever needed
        finally:
            db.close()

    trio.run(main)
    assert read_back == []
    assert state.batches == [len(blobs)]
    rows = {sha: size for sha, size, _, _ in LocalState(tmp_path / "state.db").cached_blobs()}
    assert rows == {digest: len(data) for digest, data in blobs}


@pytest.mark.expected_logs(r"download of blob \w+ failed", reason="the blob is corrupt "
                           "in the bucket on purpose")
def test_a_store_that_reports_no_progress_still_has_each_blob_verified(
        tmp_path: Path) -> None:
    # Without progress calls nothing was hashed as it landed: a verifying thread reads the
    # file back; a good blob is served, a corrupt one is refused and leaves no file.
    (good, data), (bad, other) = _blobs(2, 300_000)
    store = Silent(tmp_path / "repo")

    async def main() -> None:
        await store.put(blob_key(good), data)
        await store.put(blob_key(bad), other[:-1] + bytes([other[-1] ^ 1]))
        db = StateDB(LocalState(tmp_path / "state.db"))
        cache = BlobCache(tmp_path / "blobs", db, store, 1 << 30)
        try:
            async with trio.open_nursery() as nursery:
                cache.nursery = nursery
                assert (await cache.ensure(good, len(data))).read_bytes() == data
                with pytest.raises(IntegrityError, match="corrupt"):
                    await cache.ensure(bad, len(other))
            assert cache._sealers._threads  # the read-back ran on a verifying thread
            assert not cache.has(bad) and not cache.path(bad).exists()
            assert not (cache.partial_dir / bad).exists()
        finally:
            cache.close()
            db.close()

    trio.run(main)
