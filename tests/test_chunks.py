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
from pathlib import Path

import pytest
import trio

from fsrepo.errors import FsError
from fsrepo.maintenance.gc import collect
from fsrepo.maintenance.verify import verify
from fsrepo.manifest import FileEntry, entry_from_json, entry_to_json
from fsrepo.repository import blob_key, manifest_key
from fsrepo.store.base import Store

from .coreutil import resolve, running_engine
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


async def put_repository(store: Store, version: int = 2) -> None:
    await store.put("imgrepo.json", json.dumps({
        "format": "imgrepo", "version": version, "hash": "sha256",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repo_id": uuid.uuid4().hex}).encode())


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
        store = storage.open()
        try:
            await put_repository(store)
            await put_root(store, {"big.mov": await put_chunked(store, data, MiB, damage=2)})
        finally:
            await store.aclose()
        async with running_engine(storage.url, storage.endpoint_url, tmp_path / "cache",
                                  upload=False) as engine:
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
        async with running_engine(storage.url, storage.endpoint_url, tmp_path / "cache",
                                  upload=False) as engine:
            assert await read_at(engine, "big.mov", 0, len(big) + 10) == big
            assert await read_at(engine, "old.mov", 0, 3 * MiB) == whole
            assert await read_at(engine, "small.jpg", 0, 100) == small

    trio.run(main)


def test_writing_into_a_chunked_file_starts_from_its_verified_chunks(tmp_path: Path):
    data = content(3 * MiB + 5, seed=4)
    storage = StorageTarget(url=f"file://{tmp_path}/repository")

    async def main() -> None:
        store = storage.open()
        try:
            await put_repository(store)
            await put_root(store, {"big.mov": await put_chunked(store, data, MiB)})
        finally:
            await store.aclose()
        async with running_engine(storage.url, None, tmp_path / "cache",
                                  upload=False) as engine:
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
