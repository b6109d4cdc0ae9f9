"""Large files stored as chunks: every chunk verified before a byte of it is served, a
damaged chunk failing only the reads that touch it, and the maintenance tools (--gc,
--verify --data, --sync) following chunk lists. Repositories are built through the store
API (file:// and S3 alike), so each test sets up exactly the damage it wants."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from fsrepo.chunking import hash_range
from fsrepo.errors import FsError, RepositoryFormatError
from fsrepo.maintenance.gc import collect
from fsrepo.maintenance.verify import verify
from fsrepo.manifest import FileEntry, entry_from_json, entry_to_json
from fsrepo.repository import (
    CHUNKS_VERSION,
    blob_key,
    manifest_key,
    open_repository,
    parse_descriptor,
)
from fsrepo.store.base import BlobSource, FileRange, FileSlice, Store, StoredObject
from fsrepo.store.counting import PUT_FILE, PUT_FILE_CREATED, PUT_FILE_EXISTED, CountingStore

from .coreutil import EngineDriver, HeldWriter, engine_on, resolve, start_uploader
from .faulty_store import AFTER, CRASH, Fault, FaultyStore
from .targets import StorageTarget

MiB = 1 << 20
DAMAGE_LOGS = (r"chunk 2|download of blob .* failed|corrupt", )


def content(size: int, seed: int = 1) -> bytes:
    """Bytes that differ in every chunk (a damaged chunk cannot be mistaken for another)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 1024
        counter += 1
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put_repository(store: Store, version: int = CHUNKS_VERSION,
                          chunk_size: int = MiB) -> None:
    """A new repository (format 4 cuts files larger than `chunk_size` into chunks)."""
    await store.put("imgrepo.json", json.dumps({
        "format": "imgrepo", "version": version, "hash": "sha256",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repo_id": uuid.uuid4().hex, "chunk_size": chunk_size}).encode())


async def put_chunked(store: Store, data: bytes, chunk: int,
                      damage: int | None = None) -> dict:
    """Store `data` as chunks (chunk `damage` with one byte flipped under its right
    name) and return its manifest entry."""
    shas = []
    for index, at in enumerate(range(0, len(data), chunk)):
        piece = data[at:at + chunk]
        shas.append(sha(piece))
        if index == damage:
            piece = piece[:100] + bytes([piece[100] ^ 1]) + piece[101:]
        await store.put(blob_key(shas[-1]), piece)
    return {"type": "file", "sha256": sha(data), "size": len(data), "mtime_ns": 0,
            "mode": 0o644, "chunks": {"size": chunk, "sha256": shas}}


async def put_root(store: Store, entries: dict[str, dict]) -> None:
    await store.put(manifest_key("root"), json.dumps(
        {"imgrepo_manifest": 1, "dir_id": "root", "entries": entries}).encode())


async def read_at(engine, path: str, offset: int, size: int) -> bytes:
    node, _ = await resolve(engine, path)
    handle = await engine.files.open(node, os.O_RDONLY)
    try:
        return await engine.files.read(handle.fh, offset, size)
    finally:
        await engine.files.release(handle.fh)


async def new_repository(storage: StorageTarget, chunked: dict[str, bytes] | None = None,
                         damage: int | None = None) -> dict[str, dict]:
    """A new repository whose root holds `chunked` (name: content) stored as MiB chunks
    (chunk `damage` of each with one byte flipped); returns their manifest entries."""
    store = storage.open()
    try:
        await put_repository(store)
        entries = {name: await put_chunked(store, data, MiB, damage=damage)
                   for name, data in (chunked or {}).items()}
        if entries:
            await put_root(store, entries)
        return entries
    finally:
        await store.aclose()


async def read_fresh(storage: StorageTarget, cache: Path, path: str, size: int) -> bytes:
    """`size` bytes of `path` as a machine that never saw it reads them (no uploads)."""
    async with engine_on(storage, cache, upload=False) as fresh:
        return await read_at(fresh, path, 0, size)


def counting_stores() -> tuple[list[CountingStore], Callable[[Store], Store]]:
    """A wrap_store for running_engine, and the CountingStore (by key) of each engine it
    wrapped, in order."""
    counted: list[CountingStore] = []

    def counting(inner: Store) -> Store:
        counted.append(CountingStore(inner, by_key=True))
        return counted[-1]

    return counted, counting


def test_chunk_list_round_trips_and_bad_lists_are_refused():
    raw = {"type": "file", "sha256": "a" * 64, "size": 3 * MiB + 1, "mtime_ns": 5,
           "mode": 0o600, "chunks": {"size": MiB, "sha256": ["b" * 64] * 4}}
    entry = entry_from_json(raw)
    assert isinstance(entry, FileEntry) and entry.chunks is not None
    assert entry_to_json(entry) == raw
    assert entry.blobs()[-1] == ("b" * 64, 1)
    assert entry == FileEntry("a" * 64, 3 * MiB + 1, 5, 0o600)  # storage is not identity
    for bad in ({"size": MiB, "sha256": ["b" * 64] * 3},  # too few for the size
                {"size": 100, "sha256": ["b" * 64] * 4},  # absurd chunk size
                {"size": MiB, "sha256": ["B" * 64] * 4},
                ["b" * 64] * 4):
        with pytest.raises(ValueError):
            entry_from_json(raw | {"chunks": bad})


@pytest.mark.expected_logs(*DAMAGE_LOGS, reason="the test damages chunk 2 in the bucket")
def test_damaged_chunk_fails_only_reads_touching_it(storage: StorageTarget, tmp_path: Path):
    data = content(5 * MiB)
    bad = 2 * MiB  # chunk 2 starts here

    async def main() -> None:
        await new_repository(storage, {"big.mov": data}, damage=2)
        async with engine_on(storage, tmp_path / "cache", upload=False) as engine:
            # A sequential reader: every byte it gets is right, and it stops at chunk 2.
            node, _ = await resolve(engine, "big.mov")
            handle = await engine.files.open(node, os.O_RDONLY)
            got = bytearray()
            try:
                with pytest.raises(FsError) as failed:
                    while True:
                        piece = await engine.files.read(handle.fh, len(got), 128 * 1024)
                        if not piece:
                            break
                        got += piece
            finally:
                await engine.files.release(handle.fh)
            assert failed.value.errno == errno.EIO
            assert len(got) == bad and bytes(got) == data[:bad]
            # Reads touching the chunk fail; reads of the chunks after it work.
            for offset, size in ((bad + 5, 10), (bad - 10, 20), (3 * MiB - 1, 2)):
                with pytest.raises(FsError):
                    await read_at(engine, "big.mov", offset, size)
            assert await read_at(engine, "big.mov", 3 * MiB, MiB) == data[3 * MiB:4 * MiB]
            assert await read_at(engine, "big.mov", 5 * MiB - 7, 100) == data[-7:]
            assert await read_at(engine, "big.mov", MiB - 3, 6) == data[MiB - 3:MiB + 3]
            # The damaged chunk never joined the cache.
            damaged = sha(data[bad:bad + MiB])
            assert not engine.cache.has(damaged)
            assert engine.cache.has(sha(data[3 * MiB:4 * MiB]))

    trio.run(main)


def test_chunked_and_whole_files_read_side_by_side(storage: StorageTarget, tmp_path: Path):
    """A repository of the old layout (one blob a file) next to chunked entries."""
    big, small = content(3 * MiB + 12345, seed=2), b"a small photo"

    async def main() -> None:
        store = storage.open()
        try:
            await put_repository(store)
            whole = content(2 * MiB, seed=3)
            await store.put(blob_key(sha(whole)), whole)
            await store.put(blob_key(sha(small)), small)
            await put_root(store, {
                "big.mov": await put_chunked(store, big, MiB),
                "old.mov": {"type": "file", "sha256": sha(whole), "size": len(whole),
                            "mtime_ns": 0, "mode": 0o644},
                "small.jpg": {"type": "file", "sha256": sha(small), "size": len(small),
                              "mtime_ns": 0, "mode": 0o644}})
        finally:
            await store.aclose()
        async with engine_on(storage, tmp_path / "cache", upload=False) as engine:
            assert await read_at(engine, "big.mov", 0, len(big) + 10) == big
            assert await read_at(engine, "old.mov", 0, 3 * MiB) == whole
            assert await read_at(engine, "small.jpg", 0, 100) == small

    trio.run(main)


def test_writing_into_a_chunked_file_starts_from_its_verified_chunks(tmp_path: Path):
    data = content(3 * MiB + 5, seed=4)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage, {"big.mov": data})
        async with engine_on(storage, tmp_path / "cache", upload=False) as engine:
            node, _ = await resolve(engine, "big.mov")
            handle = await engine.files.open(node, os.O_RDWR)
            try:
                await engine.files.write(handle.fh, 10, b"XYZ")
                assert await engine.files.read(handle.fh, 0, len(data) + 1) == \
                    data[:10] + b"XYZ" + data[13:]
            finally:
                await engine.files.release(handle.fh)

    trio.run(main)


@pytest.mark.expected_logs(r"corrupt|missing", reason="verify reports the damage it finds")
def test_gc_keeps_chunks_and_verify_checks_them(tmp_path: Path):
    data = content(4 * MiB + 1, seed=5)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        store = storage.open()
        try:
            await put_repository(store)
            entry = await put_chunked(store, data, MiB, damage=1)
            await put_root(store, {"big.mov": entry})
            stray = b"unreferenced"
            await store.put(blob_key(sha(stray)), stray)
            chunks = entry["chunks"]["sha256"]
            later = time.time() + 400 * 3600
            await collect(store, 0, False, now=later - 1)  # first sight: remembered
            await collect(store, 0, False, now=later)
            assert all([await store.head(blob_key(c)) for c in chunks])
            assert await store.head(blob_key(sha(stray))) is None
            result = await verify(store, data=True)
            problems = result.as_json()["problems"]
            assert [p["kind"] for p in problems] == ["corrupt-blob"]
            assert problems[0]["sha256"] == chunks[1] and problems[0]["paths"] == ["/big.mov"]
            await store.delete(blob_key(chunks[3]))
            problems = (await verify(store)).as_json()["problems"]
            assert [(p["kind"], p["path"]) for p in problems] == [("missing-blob", "/big.mov")]
        finally:
            await store.aclose()

    trio.run(main)


async def root_entry(store: Store, name: bytes) -> FileEntry:
    got = await store.get(manifest_key("root"))
    assert isinstance(got, StoredObject)
    entry = entry_from_json(json.loads(got.data)["entries"][name.decode()])
    assert isinstance(entry, FileEntry)
    return entry


def chunk_sends(counting: CountingStore,
                kinds: tuple[str, ...] = (PUT_FILE, PUT_FILE_CREATED, PUT_FILE_EXISTED)
                ) -> dict[str, int]:
    """put_file calls per blob key (by default also those that raised)."""
    out: dict[str, int] = {}
    for (kind, key), n in counting.snapshot().by_key.items():
        if kind in kinds:
            out[key] = out.get(key, 0) + n
    return out


def test_large_files_go_as_chunks_and_a_new_end_sends_only_new_chunks(
        storage: StorageTarget, tmp_path: Path):
    data = content(5 * MiB, seed=6)
    counted, counting = counting_stores()

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache", wrap_store=counting) as engine:
            fs = EngineDriver(engine)
            await fs.create("big.mov", data)
            await fs.create("small.jpg", b"small")
            await fs.drain()
            sent = chunk_sends(counted[-1])
            entry = await root_entry(engine.store, b"big.mov")
            assert entry.chunks is not None and entry.sha256 == sha(data)
            assert sorted(sent) == sorted({blob_key(c) for c in entry.chunks.shas}
                                          | {blob_key(sha(b"small"))})
            assert await engine.store.head(blob_key(sha(data))) is None  # no whole blob
            # A copy of the whole file: one lookup, nothing sent, the same chunk list.
            before = counted[-1].snapshot()
            await fs.create("copy.mov", data)
            await fs.drain()
            assert counted[-1].since(before).uploads == 0
            assert (await root_entry(engine.store, b"copy.mov")).chunks == entry.chunks
            # Re-saved with a new end: only the chunks past the old end are sent.
            before = counted[-1].snapshot()
            await fs.write_at("big.mov", len(data), b"appended" * 1000)
            await fs.drain()
            assert counted[-1].since(before).uploads == 1
            before = counted[-1].snapshot()
            await fs.write_at("big.mov", 5 * MiB - 1, b"!")
            await fs.drain()
            assert counted[-1].since(before).uploads == 1
        final = data[:-1] + b"!" + b"appended" * 1000
        async with engine_on(storage, tmp_path / "fresh", upload=False) as fresh:
            assert await read_at(fresh, "big.mov", 0, 10 * MiB) == final
            assert await read_at(fresh, "copy.mov", 0, 10 * MiB) == data

    trio.run(main)


@pytest.mark.parametrize("nth", [2, 4])
def test_a_crash_mid_chunked_upload_sends_no_finished_chunk_again(
        storage: StorageTarget, tmp_path: Path, nth: int):
    data = content(5 * MiB + 3, seed=7)
    runs: list[tuple[CountingStore, FaultyStore]] = []
    scope = trio.CancelScope()

    def wrap(inner: Store) -> Store:
        counting = CountingStore(inner, by_key=True)
        runs.append((counting, FaultyStore(counting, on_crash=scope.cancel)))
        return runs[-1][1]

    async def main() -> None:
        await new_repository(storage)
        with scope:
            async with engine_on(storage, tmp_path / "cache",
                                 wrap_store=wrap, upload=False) as engine:
                fs = EngineDriver(engine)
                await fs.create("big.mov", data)
                runs[-1][1].arm(Fault("put_file", nth=nth, effect=CRASH, when=AFTER))
                start_uploader(engine)
                with trio.fail_after(60):
                    await fs.drain()
                raise AssertionError("drained without reaching the crash")
        assert runs[-1][1].crashed
        async with engine_on(storage, tmp_path / "cache", wrap_store=wrap) as engine:
            with trio.fail_after(60):
                await EngineDriver(engine).drain()
            entry = await root_entry(engine.store, b"big.mov")
        landed = chunk_sends(runs[0][0], (PUT_FILE_CREATED, PUT_FILE_EXISTED))
        again = chunk_sends(runs[1][0])
        assert len(landed) >= nth and not set(landed) & set(again), (landed, again)
        assert entry.chunks is not None
        assert set(landed) | set(again) == {blob_key(c) for c in entry.chunks.shas}
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 6 * MiB) == data

    trio.run(main)


def test_a_repository_not_upgraded_keeps_whole_blobs(tmp_path: Path):
    """An older repository that cannot be upgraded now (a read-only token, say) keeps
    whole-file blobs: an older mount must still find them."""
    data = content(3 * MiB, seed=8)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        async with engine_on(storage, tmp_path / "cache") as engine:
            engine.chunk_lists.chunk_size = None  # as after a refused upgrade
            await EngineDriver(engine).create("big.mov", data)
            await EngineDriver(engine).drain()
            entry = await root_entry(engine.store, b"big.mov")
            assert entry.chunks is None
            assert await engine.store.head(blob_key(sha(data))) == len(data)

    trio.run(main)


def test_a_file_sent_as_chunks_reads_back_before_its_manifest_is_written(tmp_path: Path):
    """Between the upload of its chunks and the commit of its directory, a file's entry
    names only its whole-file hash, and the cache may evict the whole file: its reads
    then come from the chunk list this machine kept."""
    data = content(3 * MiB + 7, seed=9)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache", upload=False) as engine:
            fs = EngineDriver(engine)
            await fs.create("big.mov", data)
            await engine.files.name_closed()  # as the uploader does before it looks for work
            await engine.uploader.blobs.upload(sha(data))
            engine.cache.discard(sha(data))  # evicted meanwhile
            assert await read_at(engine, "big.mov", MiB - 5, 2 * MiB) == \
                data[MiB - 5:3 * MiB - 5]
            await fs.write_at("big.mov", 3, b"abc")  # a write starts from the chunks
            start_uploader(engine)
            await fs.drain()
            assert (await root_entry(engine.store, b"big.mov")).chunks is not None
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 4 * MiB) == \
            data[:3] + b"abc" + data[6:]

    trio.run(main)


def test_a_chunked_file_from_another_machine_is_renamed_without_its_content(tmp_path: Path):
    """Its whole-file hash names no blob, and this machine has neither the file nor its
    chunk list: the rename carries the chunk list along and needs no upload."""
    data = content(3 * MiB, seed=10)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage, {"big.mov": data})
        async with engine_on(storage, tmp_path / "cache") as engine:
            fs = EngineDriver(engine)
            await fs.rename("big.mov", "moved.mov")
            with trio.fail_after(60):
                await fs.drain()
            assert (await root_entry(engine.store, b"moved.mov")).chunks is not None
        assert await read_fresh(storage, tmp_path / "fresh", "moved.mov", 4 * MiB) == data

    trio.run(main)


def test_a_chunked_file_from_another_machine_changes_mode_and_time_without_its_content(
        tmp_path: Path):
    data = content(2 * MiB + 1, seed=11)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage, {"big.mov": data})
        async with engine_on(storage, tmp_path / "cache") as engine:
            fs = EngineDriver(engine)
            await fs.setattr("big.mov", mode=0o600, mtime_ns=123)
            with trio.fail_after(60):
                await fs.drain()
            entry = await root_entry(engine.store, b"big.mov")
            assert entry.chunks is not None and (entry.mode, entry.mtime_ns) == (0o600, 123)
            assert not engine.cache.has(entry.chunks.shas[0])  # nothing was fetched

    trio.run(main)


def test_a_damaged_chunk_through_the_mount(storage: StorageTarget, tmp_path: Path, mounter):
    """The same through the kernel (its read-ahead included): a reader gets correct bytes
    up to the damaged chunk and then EIO; the chunks after it still read; the log names
    the file and the byte range."""
    data = content(5 * MiB, seed=12)
    bad = 2 * MiB

    async def build() -> None:
        await new_repository(storage, {"big.mov": data}, damage=2)

    trio.run(build)
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    got = bytearray()
    with open(m.path / "big.mov", "rb", buffering=0) as fh:
        with pytest.raises(OSError) as failed:
            while piece := fh.read(128 * 1024):
                got += piece
        assert failed.value.errno == errno.EIO
        assert bytes(got) == data[:len(got)] and len(got) == bad
        assert os.pread(fh.fileno(), MiB, 3 * MiB) == data[3 * MiB:4 * MiB]
        with pytest.raises(OSError):
            os.pread(fh.fileno(), 4096, bad + MiB - 100)
    assert f"/big.mov: cannot read bytes {bad}-{bad + MiB} (chunk 2" in m.logtext()
    assert not m.unexpected_log_lines(r"chunk 2|download of blob .* failed")


def test_sync_fetches_a_chunked_file_chunk_by_chunk(tmp_path: Path):
    data = content(3 * MiB + 9, seed=13)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def main() -> None:
        entry = (await new_repository(storage, {"big.mov": data}))["big.mov"]
        async with engine_on(storage, tmp_path / "cache", upload=False) as engine:
            end = await engine.syncer.run([], send)
            assert (end["to_fetch"], end["done_bytes"], end["failed"]) == (4, len(data), 0)
            assert all(engine.cache.has(c) for c in entry["chunks"]["sha256"])
            assert await read_at(engine, "big.mov", 0, 4 * MiB) == data

    trio.run(main)


def test_a_cold_read_fetches_the_next_chunks_ahead(tmp_path: Path):
    data = content(6 * MiB, seed=14)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        entry = (await new_repository(storage, {"big.mov": data}))["big.mov"]
        async with engine_on(storage, tmp_path / "cache", upload=False) as engine:
            assert await read_at(engine, "big.mov", 0, 4096) == data[:4096]
            shas = entry["chunks"]["sha256"]
            ahead = [s for s in shas[1:] if s in engine.cache.downloads or engine.cache.has(s)]
            assert ahead == shas[1:5]  # READ_AHEAD chunks after the one read, not more

    trio.run(main)


def test_chunks_of_a_file_being_written_are_sent_before_its_close(tmp_path: Path):
    data = content(5 * MiB + 100, seed=15)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")
    counted, counting = counting_stores()

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache", wrap_store=counting) as engine:
            node = engine.ns.node(1)
            handle, _ = await engine.files.create(node.ino, b"big.mov", 0o644)
            try:
                await write_pieces(engine, handle.fh, data)
                full = {blob_key(sha(data[at:at + MiB])) for at in range(0, 5 * MiB, MiB)}
                with trio.fail_after(60):  # (a hang guard, not a timing assertion)
                    while not full <= set(chunk_sends(counted[-1])):
                        await trio.sleep(0.01)
                await engine.files.flush(handle.fh)
            finally:
                await engine.files.release(handle.fh)
            await EngineDriver(engine).drain()
            entry = await root_entry(engine.store, b"big.mov")
            assert entry.chunks is not None
            keys = [blob_key(c) for c in entry.chunks.shas]
            assert set(keys[:5]) == full
            sends = chunk_sends(counted[-1])
            assert {k: sends[k] for k in keys} == {k: 1 for k in keys}  # none sent twice
            engine.uploader.early.sweep()  # (its workers do every few seconds)
            assert not engine.uploader.early._files  # its copy is gone: nothing kept open
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 6 * MiB) == data

    trio.run(main)


def test_a_random_write_ends_the_head_start(tmp_path: Path):
    """Chunks sent before a write went back into them are not what the file holds: the
    closed file's own chunks are sent, and the file reads back as written."""
    data = bytearray(content(3 * MiB, seed=16))
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache") as engine:
            handle, _ = await engine.files.create(1, b"big.mov", 0o644)
            try:
                await write_pieces(engine, handle.fh, data)
                with trio.fail_after(60):
                    while engine.uploader.early.sent < 3:
                        await trio.sleep(0.01)
                await engine.files.write(handle.fh, 10, b"changed")
                data[10:17] = b"changed"
                await engine.files.flush(handle.fh)
            finally:
                await engine.files.release(handle.fh)
            await EngineDriver(engine).drain()
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 4 * MiB) == bytes(data)

    trio.run(main)


def test_chunks_wait_while_the_writer_needs_the_core(tmp_path: Path):
    """While the writer needs the core (a burst on a core its trio thread waits for), the
    early sender hashes and sends nothing; once it does not, the chunks go."""
    data = content(3 * MiB, seed=17)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache") as engine:
            writer = engine.uploader.early.writer_first = HeldWriter()
            handle, _ = await engine.files.create(1, b"big.mov", 0o644)
            try:
                await write_pieces(engine, handle.fh, data)
                with trio.fail_after(60):
                    while writer.looks < 6:  # each worker looked, and looks again
                        await trio.sleep(0.01)
                assert engine.uploader.early.sent == 0
                writer.hold = False
                with trio.fail_after(60):
                    while engine.uploader.early.sent < 3:
                        await trio.sleep(0.01)
                await engine.files.flush(handle.fh)
            finally:
                await engine.files.release(handle.fh)
            await EngineDriver(engine).drain()
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 4 * MiB) == data

    trio.run(main)


class TrustingServer(CountingStore):
    """A server that stores whatever body comes under the name it is given (moto checks no
    checksum either), and runs `during_put` while the first chunk sent from a byte range
    of a file (early_chunks) is on its way, before its bytes are read."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.during_put: Callable[[], Awaitable[None]] | None = None

    async def put_file(self, key: str, path: BlobSource, sha256_hex: str) -> bool:
        if self.during_put is not None and isinstance(path, FileRange):
            hook, self.during_put = self.during_put, None
            await hook()
        with FileSlice.whole(path) as body:
            data = body.read()
        if await self.inner.head(key) is not None:
            return False
        await self.inner.put(key, data)
        return True


def test_a_chunk_written_again_while_it_is_sent_early_is_not_left_in_the_bucket(
        tmp_path: Path):
    """The early sender streams a chunk from the staging copy: a write back into the chunk
    while it goes up changes the bytes sent under the chunk's name. A server that does not
    check the checksum stores them; the sender sees the write and deletes the object, so
    every chunk in the bucket is what its name says, and the file reads back as written."""
    data = bytearray(content(3 * MiB + 5, seed=31))
    storage = StorageTarget(url=f"file://{tmp_path}/repository")
    servers: list[TrustingServer] = []

    def trusting(inner: Store) -> Store:
        servers.append(TrustingServer(inner))
        return servers[-1]

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache", wrap_store=trusting) as engine:
            handle, _ = await engine.files.create(1, b"big.mov", 0o644)
            written_back = trio.Event()

            async def write_back() -> None:
                await engine.files.write(handle.fh, 10, b"changed")
                written_back.set()

            servers[-1].during_put = write_back
            try:
                await write_pieces(engine, handle.fh, data)
                with trio.fail_after(60):  # (a hang guard, not a timing assertion)
                    await written_back.wait()
                data[10:17] = b"changed"
                await engine.files.flush(handle.fh)
            finally:
                await engine.files.release(handle.fh)
            await EngineDriver(engine).drain()
            stored = [info.key async for info in engine.store.list("blobs/")]
            for key in stored:
                body = (await engine.store.get(key)).data
                assert key == blob_key(sha(body)), "an object is not what its name says"
            assert blob_key(sha(bytes(data[:MiB]))) in stored
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 4 * MiB) == bytes(data)

    trio.run(main)


class HoldingServer(CountingStore):
    """Holds every chunk the early sender streams from a file until `release` is set."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.held = 0
        self.release = trio.Event()

    async def put_file(self, key: str, path: BlobSource, sha256_hex: str) -> bool:
        if isinstance(path, FileRange) and not self.release.is_set():
            self.held += 1
            await self.release.wait()
        return await super().put_file(key, path, sha256_hex)


def test_a_file_let_go_while_its_chunks_are_in_flight_is_let_go_once(tmp_path: Path):
    """A random write ends the head start while both early workers send chunks of the
    file, and the file is closed before they finish: each worker finds it let go (the
    second used to let it go again, and the KeyError stopped the mount's uploads)."""
    data = bytearray(content(2 * MiB + 5, seed=32))
    storage = StorageTarget(url=f"file://{tmp_path}/repository")
    servers: list[HoldingServer] = []

    def holding(inner: Store) -> Store:
        servers.append(HoldingServer(inner))
        return servers[-1]

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache", wrap_store=holding) as engine:
            handle, _ = await engine.files.create(1, b"big.mov", 0o644)
            try:
                await write_pieces(engine, handle.fh, data)
                with trio.fail_after(60):  # (a hang guard, not a timing assertion)
                    while servers[-1].held < 2:
                        await trio.sleep(0.01)
                await engine.files.write(handle.fh, 10, b"changed")
                data[10:17] = b"changed"
                await engine.files.flush(handle.fh)
            finally:
                await engine.files.release(handle.fh)
            servers[-1].release.set()
            await EngineDriver(engine).drain()
            engine.uploader.early.sweep()
            assert not engine.uploader.early._files
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 4 * MiB) == bytes(data)

    trio.run(main)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_kill_9_during_a_chunked_upload_sends_no_finished_chunk_again(
        s3_bucket, s3_proxy, mounter, tmp_path: Path, delay: float):
    """A large file written through the mount (its chunks going up while it is written
    and after its close), the mount killed `delay` seconds after close: remounted, the
    file reaches the bucket whole, and no chunk whose PUT succeeded is PUT again."""
    data = content(8 * MiB + 77, seed=17)

    async def build() -> None:
        await new_repository(s3_bucket)

    trio.run(build)
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, cache_dir=tmp_path / "cache")
    with open(m.path / "big.mov", "wb") as fh:
        for at in range(0, len(data), 128 * 1024):
            fh.write(data[at:at + 128 * 1024])
    time.sleep(delay)
    m.kill()
    again = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, cache_dir=tmp_path / "cache")
    assert again.wait_idle()["pending_ops"] == 0
    again.unmount()
    finished: set[str] = set()
    for seen in s3_proxy.requests:
        if seen.method == "PUT" and "/blobs/" in seen.path:
            assert seen.path not in finished, f"{seen.path} sent again after it landed"
            if seen.status == 200:
                finished.add(seen.path)
    assert len(finished) >= 9  # the file went up as its 9 chunks
    fresh = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url,
                    cache_dir=tmp_path / "fresh")
    assert (fresh.path / "big.mov").read_bytes() == data


def test_an_older_repository_is_upgraded_to_chunks_and_older_imgrepos_refuse_it(tmp_path: Path):
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        store = storage.open()
        try:
            await put_repository(store, version=CHUNKS_VERSION - 1)
            raw = json.loads((await store.get("imgrepo.json")).data)
            assert parse_descriptor(json.dumps(raw).encode(), "x").chunk_size is None
            desc = await open_repository(store)
            assert (desc.version, desc.chunk_size) == (CHUNKS_VERSION, MiB)  # (its own size)
            with pytest.raises(RepositoryFormatError, match="bad chunk size"):
                parse_descriptor(json.dumps(raw | {"version": CHUNKS_VERSION,
                                                   "chunk_size": 10}).encode(), "x")
            with pytest.raises(RepositoryFormatError, match="upgrade imgrepo"):
                parse_descriptor(json.dumps(raw | {"version": CHUNKS_VERSION + 1}).encode(),
                                 "x")
        finally:
            await store.aclose()

    trio.run(main)


def test_a_chunked_file_in_a_snapshot_reads_back_verifies_and_survives_gc(tmp_path: Path):
    from fsrepo.snapshot_views import TOP_INO

    data = content(3 * MiB + 5, seed=18)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "a") as engine:
            fs = EngineDriver(engine)
            await fs.create("big.mov", data)
            await engine.uploader.wait_idle()
            await engine.take_snapshot("s1")
            chunks = (await root_entry(engine.store, b"big.mov")).chunks
            assert chunks is not None
            await fs.unlink("big.mov")
            await engine.uploader.wait_idle()
            later = time.time() + 400 * 3600
            await collect(engine.store, 0, False, now=later - 1)
            await collect(engine.store, 0, False, now=later)
            assert all([await engine.store.head(blob_key(c)) for c in chunks.shas])
            v = await verify(engine.store)
            assert v.snapshots == 1 and not v.problems
        async with engine_on(storage, tmp_path / "b") as engine:
            tree = engine.snapshot_tree
            top = await tree.lookup(TOP_INO, b"s1")
            node = await tree.lookup(top.ino, b"big.mov")
            fh = tree.open(node.ino, False)
            try:
                assert await tree.read(fh, 0, 4 * MiB) == data
            finally:
                tree.release(fh)

    trio.run(main)


def test_a_chunked_file_fetched_by_sync_opens_offline(tmp_path: Path):
    from .test_snapshots import Unplugged

    data = content(3 * MiB + 1, seed=19)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")
    plugs: list[Unplugged] = []

    def wrap(inner: Store) -> Store:
        plugs.append(Unplugged(inner))
        return plugs[-1]

    async def send(message: dict) -> None:
        pass

    async def main() -> None:
        await new_repository(storage, {"big.mov": data})
        async with engine_on(storage, tmp_path / "cache", upload=False, wrap_store=wrap) as engine:
            await engine.syncer.run([], send)
            await resolve(engine, "big.mov")
            plugs[-1].plugged = False
            assert await read_at(engine, "big.mov", 0, 4 * MiB) == data

    trio.run(main)


@pytest.mark.expected_logs(r"has \d+ bytes in the bucket instead of \d+: sending it again",
                           reason="a server kept a cut body under a chunk's and a blob's name")
def test_a_chunk_or_blob_kept_cut_short_in_the_bucket_is_replaced_whole(
        storage: StorageTarget, tmp_path: Path):
    """A server that kept the part of a PUT body a killed client sent (no checksum check):
    the object exists under the content's name with the wrong size. It is not trusted by
    its name: the upload replaces it, and another machine reads the right bytes."""
    data = content(3 * MiB + 5, seed=21)
    small = content(4000, seed=22)
    first_chunk = sha(data[:MiB])

    async def main() -> None:
        await new_repository(storage)
        store = storage.open()
        try:
            await store.put(blob_key(first_chunk), data[:1000])
            await store.put(blob_key(sha(small)), small[:10])
        finally:
            await store.aclose()
        async with engine_on(storage, tmp_path / "cache") as engine:
            fs = EngineDriver(engine)
            await fs.create("big.mov", data)
            await fs.create("small.jpg", small)
            await fs.drain()
            assert await engine.store.head(blob_key(first_chunk)) == MiB
            assert await engine.store.head(blob_key(sha(small))) == len(small)
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 4 * MiB) == data
        assert await read_fresh(storage, tmp_path / "fresh2", "small.jpg", MiB) == small

    trio.run(main)


def test_a_chunk_is_hashed_from_its_range_of_the_file(tmp_path: Path):
    data = content(3 * MiB + 9, seed=23)
    path = tmp_path / "big"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hash_range(fd, 2 * MiB, MiB + 9) == sha(data[2 * MiB:])
        assert hash_range(fd, 5, 10) == sha(data[5:15])
        with pytest.raises(OSError, match="ended before"):
            hash_range(fd, 3 * MiB, MiB)
    finally:
        os.close(fd)


async def write_pieces(engine, fh: int, data: bytes | bytearray) -> None:
    """Write `data` from offset 0 in 128 KiB requests, as cp does."""
    for off in range(0, len(data), 128 * 1024):
        await engine.files.write(fh, off, bytes(data[off:off + 128 * 1024]))


async def write_in_order(engine, name: bytes, data: bytes, chunks_first: int) -> None:
    """Create `name` and write `data` in 128 KiB requests, as cp does, waiting before the
    close until the writer's first `chunks_first` chunks were sent."""
    handle, _ = await engine.files.create(1, name, 0o644)
    try:
        await write_pieces(engine, handle.fh, data)
        with trio.fail_after(60):  # (a hang guard, not a timing assertion)
            while engine.uploader.early.sent < chunks_first:
                await trio.sleep(0.01)
        await engine.files.flush(handle.fh)
    finally:
        await engine.files.release(handle.fh)


def test_the_upload_after_close_reuses_the_chunks_hashed_while_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from fsrepo import blob_upload

    data = content(4 * MiB + 10, seed=24)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")
    copied: list[tuple[int, int]] = []  # (offset, length) of what the upload hashed

    def watched_hash(fd: int, offset: int, length: int) -> str:
        copied.append((offset, length))
        return hash_range(fd, offset, length)

    monkeypatch.setattr(blob_upload, "hash_range", watched_hash)

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache") as engine:
            await write_in_order(engine, b"big.mov", data, 4)
            await EngineDriver(engine).drain()
            entry = await root_entry(engine.store, b"big.mov")
            status = engine.uploader.status
            # sent: 4 chunks while written, the last 10 bytes after the close
            assert status.uploaded_bytes == len(data)
        assert copied == [(4 * MiB, 10)]  # only the chunk the early sender had not hashed
        assert entry.chunks is not None and entry.chunks.shas == tuple(
            sha(data[at:at + MiB]) for at in range(0, len(data), MiB))
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 5 * MiB) == data

    trio.run(main)


def test_a_file_truncated_and_written_again_is_not_cut_from_its_first_run(tmp_path: Path):
    """Chunks hashed before the file was truncated to nothing belong to bytes it no longer
    holds: the closed file's chunk list is its own."""
    first = content(3 * MiB, seed=25)
    second = content(3 * MiB + 3, seed=26)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache") as engine:
            node = engine.ns.node(1)
            handle, _ = await engine.files.create(node.ino, b"big.mov", 0o644)
            try:
                for off in range(0, len(first), 128 * 1024):
                    await engine.files.write(handle.fh, off, first[off:off + 128 * 1024])
                with trio.fail_after(60):
                    while engine.uploader.early.sent < 3:
                        await trio.sleep(0.01)
                big, _ = await resolve(engine, "big.mov")
                await engine.files.truncate(big, 0, handle)
                for off in range(0, len(second), 128 * 1024):
                    await engine.files.write(handle.fh, off, second[off:off + 128 * 1024])
                await engine.files.flush(handle.fh)
            finally:
                await engine.files.release(handle.fh)
            await EngineDriver(engine).drain()
            entry = await root_entry(engine.store, b"big.mov")
        assert entry.chunks is not None and entry.chunks.shas == tuple(
            sha(second[at:at + MiB]) for at in range(0, len(second), MiB))
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 4 * MiB) == second

    trio.run(main)


def test_uploaded_bytes_count_the_chunks_sent_not_the_file(tmp_path: Path):
    data = content(5 * MiB, seed=27)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache") as engine:
            fs = EngineDriver(engine)
            await fs.create("big.mov", data)
            await fs.drain()
            status = engine.uploader.status
            assert status.uploaded_bytes == len(data)
            await fs.write_at("big.mov", len(data), b"x" * 1000)  # one new chunk
            await fs.drain()
            assert status.uploaded_bytes == len(data) + 1000

    trio.run(main)


@pytest.mark.expected_logs(r"storage unreachable, starting offline",
                           reason="the second mount starts without its bucket")
def test_a_mount_started_offline_cuts_large_files_as_the_repository_does(tmp_path: Path):
    """The chunk size learnt from the bucket is kept with the local state: a mount that
    starts without the bucket sends a large file as chunks once the bucket is back."""
    from .test_snapshots import Unplugged

    data = content(3 * MiB + 1, seed=28)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")
    plugs: list[Unplugged] = []

    def unplugged(inner: Store) -> Store:
        plugs.append(Unplugged(inner))
        plugs[-1].plugged = False
        return plugs[-1]

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache") as engine:
            await EngineDriver(engine).listdir()  # (learns the chunk size as it starts)
        async with engine_on(storage, tmp_path / "cache", upload=False,
                             wrap_store=unplugged) as engine:
            assert not engine.online
            assert engine.chunk_lists.chunk_size == MiB
            fs = EngineDriver(engine)
            await fs.create("big.mov", data)
            plugs[-1].plugged = True
            start_uploader(engine)
            with trio.fail_after(60):
                await fs.drain()
            entry = await root_entry(engine.store, b"big.mov")
            assert entry.chunks is not None and len(entry.chunks.shas) == 4
            assert await engine.store.head(blob_key(sha(data))) is None
        assert await read_fresh(storage, tmp_path / "fresh", "big.mov", 4 * MiB) == data

    trio.run(main)


@pytest.mark.parametrize("all_cached", [True, False])
def test_salvage_puts_a_chunked_file_together_from_its_cached_chunks(
        tmp_path: Path, all_cached: bool):
    """A chunked file read here (its chunks cached) and renamed while the bucket is gone:
    --salvage copies it out whole, checked; with a chunk missing it says so and leaves no
    partial copy."""
    from fsrepo.salvage import salvage

    data = content(3 * MiB + 5, seed=29)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> Path:
        entries = await new_repository(storage, {"big.mov": data})
        async with engine_on(storage, tmp_path / "cache", upload=False) as engine:
            fs = EngineDriver(engine)
            assert await read_at(engine, "big.mov", 0, 4 * MiB) == data
            assert not engine.cache.has(sha(data))  # cached as its chunks only
            await fs.rename("big.mov", "moved.mov")
            if not all_cached:
                engine.cache.discard(entries["big.mov"]["chunks"]["sha256"][2])
            return engine.state_dir

    state_dir = trio.run(main)
    report = salvage(state_dir, tmp_path / "out")
    if all_cached:
        assert report.copied == ["moved.mov"] and not report.missing
        assert (tmp_path / "out" / "moved.mov").read_bytes() == data
    else:
        assert report.missing == ["moved.mov"] and not report.copied
        assert not (tmp_path / "out" / "moved.mov").exists()


def test_a_chunked_upload_done_again_without_the_file_finds_its_chunks_there(tmp_path: Path):
    """The chunks went up and the list was kept, then the file left the cache before the
    upload was recorded (a crash, an eviction): the upload again finds every chunk in the
    bucket and sends nothing."""
    from fsrepo.blob_upload import Outcome

    data = content(3 * MiB + 7, seed=30)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        await new_repository(storage)
        async with engine_on(storage, tmp_path / "cache", upload=False) as engine:
            await EngineDriver(engine).create("big.mov", data)
            await engine.files.name_closed()  # as the uploader does before it looks for work
            first = await engine.uploader.blobs.upload(sha(data))
            assert first == (Outcome.SENT, len(data))
            engine.cache.discard(sha(data))
            again = await engine.uploader.blobs.upload(sha(data))
            assert again == (Outcome.ALREADY_THERE, 0)

    trio.run(main)
