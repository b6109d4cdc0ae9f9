"""The staging copies' hash thread (hashing.HashThread, staging.Staging.write): a running
hash fed partly inline and partly through the thread still sees its bytes in file order,
whatever the mix of write sizes and files; a writer far ahead waits; a new trio run (tests
open an engine in one and close it in another) never reorders what the last one queued."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import trio

from fsrepo.hashing import HashThread
from fsrepo.manifest import FileEntry
from fsrepo.staging import INLINE_HASH, StagingArea


def _chunks(rnd: random.Random, total: int) -> list[bytes]:
    """Write sizes on both sides of INLINE_HASH, so both paths are taken in one file."""
    out, left = [], total
    while left:
        size = min(left, rnd.choice([1, 4096, INLINE_HASH - 1, INLINE_HASH, 1 << 20]))
        out.append(os.urandom(size))
        left -= size
    return out


def test_interleaved_files_hash_to_their_content(tmp_path: Path) -> None:
    area = StagingArea(tmp_path / "staging")
    rnd = random.Random(7)
    files = {ino: _chunks(rnd, rnd.randint(0, 3 << 20)) for ino in range(1, 6)}

    async def main() -> dict[int, str]:
        staged = {ino: area.new(ino, FileEntry(hashlib.sha256().hexdigest(), 0, 0))
                  for ino in files}
        offsets = dict.fromkeys(files, 0)
        pending = {ino: list(chunks) for ino, chunks in files.items()}
        while any(pending.values()):  # the files' writes interleaved at random
            ino = rnd.choice([i for i, p in pending.items() if p])
            data = pending[ino].pop(0)
            assert staged[ino].write(offsets[ino], data) == len(data)
            offsets[ino] += len(data)
        return {ino: await st.digest() for ino, st in staged.items()}

    digests = trio.run(main)
    for ino, chunks in files.items():
        assert digests[ino] == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert area.hashes.backlog == 0
    area.hashes.close()


def test_a_writer_far_ahead_waits_until_the_thread_catches_up() -> None:
    hashes = HashThread("test-hash")
    hasher = hashlib.sha256()
    data = [os.urandom(1 << 20) for _ in range(16)]

    async def main() -> str:
        for block in data:
            hashes.update(hasher, block)
        await hashes.drained(2 << 20)
        assert hashes.backlog <= 2 << 20
        return await hashes.hexdigest(hasher)

    assert trio.run(main) == hashlib.sha256(b"".join(data)).hexdigest()
    hashes.close()


def test_updates_queued_in_one_run_are_hashed_before_the_next_run_reads_the_hash() -> None:
    hashes = HashThread("test-hash-runs")
    hasher = hashlib.sha256()
    data = [os.urandom(1 << 20) for _ in range(32)]

    async def write() -> None:
        for block in data:
            hashes.update(hasher, block)

    async def finish() -> str:
        hashes.update(hasher, b"tail")  # a new run: the last run's queue is emptied first
        return await hashes.hexdigest(hasher)

    trio.run(write)
    assert trio.run(finish) == hashlib.sha256(b"".join(data) + b"tail").hexdigest()
    hashes.close()
