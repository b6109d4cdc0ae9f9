"""The staging copies' hash threads (hashing.HashThread, staging.Staging.write): a running
hash fed partly inline and partly through the threads still sees its bytes in file order,
whatever the mix of write sizes and files; a writer far ahead waits; a new trio run (tests
open an engine in one and close it in another) never reorders what the last one queued.
Ranges are read back from the copy (through a descriptor of the threads' own); the lanes
hand over between pieces: the background one (lowest priority) while nobody waits, the
foreground one (the process's priority) as soon as someone does, and at the end."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest
import trio

from fsrepo.hashing import (
    BACKGROUND_NICE,
    BURST_GAP,
    HASH_CHUNK,
    HELD_LIMIT,
    WINDOW,
    HashThread,
    RunningHash,
    WriterFirst,
    set_background_priority,
)
from fsrepo.manifest import FileEntry
from fsrepo.staging import INLINE_HASH, StagingArea

from .coreutil import HeldWriter


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
    hasher = RunningHash()
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
    hasher = RunningHash()
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


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _file_with(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "copy"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_ranges_are_read_back_through_a_descriptor_of_their_own(tmp_path: Path) -> None:
    """The writer's descriptor may close right after queueing (a sealed copy); the ranges,
    queued write by write, are hashed from the file, and the threads' descriptor goes
    once they are done."""
    data = os.urandom(5 * HASH_CHUNK + 12345)
    hashes = HashThread("test-hash-ranges")
    before = _open_fds()
    fd = _file_with(tmp_path, data)
    hasher = RunningHash()
    hasher.update(data[:1000])  # (the first bytes inline, as Staging.write does)

    async def main() -> str:
        offset = 1000
        for size in (70_000, HASH_CHUNK, 3, 2 * HASH_CHUNK, len(data)):
            size = min(size, len(data) - offset)
            hashes.update_range(hasher, fd, offset, size)
            offset += size
        os.close(fd)
        return await hashes.hexdigest(hasher)

    assert trio.run(main) == hashlib.sha256(data).hexdigest()
    hashes.close()
    assert _open_fds() == before


def test_a_copy_cut_short_under_its_hash_makes_its_value_an_error(tmp_path: Path) -> None:
    """A range that cannot be read back whole never yields a hash of other bytes."""
    data = os.urandom(3 * HASH_CHUNK)
    hashes = HashThread("test-hash-short")
    fd = _file_with(tmp_path, data)
    hasher = RunningHash()

    async def main() -> None:
        hashes.update_range(hasher, fd, 0, len(data) + 10)
        with pytest.raises(OSError, match="ended before byte"):
            await hashes.hexdigest(hasher)

    trio.run(main)
    os.close(fd)
    hashes.close()


class _Log:
    """Which lane hashed what, for a hash whose first update in the background lane can be
    held until told (a background thread that a busy machine keeps off the CPU)."""

    def __init__(self, hold: threading.Event | None) -> None:
        self.hold = hold
        self.lanes: list[str] = []
        self.held = threading.Event()  # the background lane is in its held update


class _RecordingState:
    def __init__(self, log: _Log, real: hashlib._Hash) -> None:
        self.log = log
        self.real = real

    def update(self, data: bytes | memoryview) -> None:
        lane = threading.current_thread().name.rsplit("-", 1)[1]
        if self.log.hold is not None and lane == "background" and not self.log.held.is_set():
            self.log.held.set()
            self.log.hold.wait(timeout=60)
        self.log.lanes.append(lane)
        self.real.update(data)

    def copy(self) -> _RecordingState:
        return _RecordingState(self.log, self.real.copy())

    def hexdigest(self) -> str:
        return self.real.hexdigest()


def _recording(hold: threading.Event | None = None) -> tuple[RunningHash, _Log]:
    hasher, log = RunningHash(), _Log(hold)
    hasher.state = _RecordingState(log, hashlib.sha256())  # type: ignore[assignment]
    return hasher, log


def _policy(thread: threading.Thread) -> tuple[int, int]:
    assert thread.native_id is not None
    return (os.sched_getscheduler(thread.native_id),
            os.getpriority(os.PRIO_PROCESS, thread.native_id))


def test_a_waiter_never_waits_for_the_background_lane(tmp_path: Path) -> None:
    """The background lane is kept in the middle of a piece (as a busy machine keeps an
    idle-priority thread off the CPU): a task asking for the value gets it from the
    foreground lane, which takes that piece over; the background lane's late result is
    dropped, and work queued once nobody waits is the background lane's again."""
    data = os.urandom(8 * HASH_CHUNK)
    before = _open_fds()
    fd = _file_with(tmp_path, data)
    hold = threading.Event()
    hasher, log = _recording(hold)
    hashes = HashThread("test-hash-lanes")

    async def main() -> str:
        hashes.update_range(hasher, fd, 0, 6 * HASH_CHUNK)
        while not log.held.is_set():
            await trio.sleep(0.001)
        value = await hashes.hexdigest(hasher)  # while the background lane is held
        assert log.lanes == ["foreground"] * 6
        hold.set()
        hashes.update_range(hasher, fd, 6 * HASH_CHUNK, 2 * HASH_CHUNK)
        while hashes.backlog:  # (nobody waits: polled)
            await trio.sleep(0.001)
        return value

    try:
        assert trio.run(main) == hashlib.sha256(data[:6 * HASH_CHUNK]).hexdigest()
    finally:
        hold.set()
    # The held piece's late result went nowhere: the value covers each byte once.
    assert log.lanes == ["foreground"] * 6 + ["background"] * 3
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    lanes = {thread.name.rsplit("-", 1)[1]: thread for thread in threading.enumerate()
             if thread.name.startswith("test-hash-lanes-")}
    ours = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
    assert _policy(lanes["foreground"]) == ours
    assert _policy(lanes["background"]) in ((os.SCHED_IDLE, ours[1]),
                                            (ours[0], BACKGROUND_NICE))
    hashes.close()
    os.close(fd)
    assert _open_fds() == before  # (the copy's descriptor outlived the held read, no more)


def test_the_background_priority_is_the_calling_threads_alone() -> None:
    ours = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
    seen: list[tuple[int, int]] = []

    def lowered() -> None:
        assert set_background_priority()
        tid = threading.get_native_id()
        seen.append((os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)))

    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen[0] != ours
    assert (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == ours


def test_a_lagging_background_lane_finishes_everything_at_close(tmp_path: Path) -> None:
    """What is queued when the mount stops is hashed before close() returns, by the
    foreground lane, even with the background lane kept off the CPU."""
    data = os.urandom(40 * HASH_CHUNK)
    fd = _file_with(tmp_path, data)
    hold = threading.Event()
    hasher, log = _recording(hold)
    hashes = HashThread("test-hash-stop")

    async def main() -> None:
        for offset in range(0, len(data), HASH_CHUNK):
            hashes.update_range(hasher, fd, offset, HASH_CHUNK)
        while not log.held.is_set():
            await trio.sleep(0.001)

    trio.run(main)
    os.close(fd)
    closing = threading.Thread(target=hashes.close)
    closing.start()
    while hashes.backlog:  # done without the background lane
        closing.join(timeout=0.01)
    hold.set()
    closing.join()
    assert log.lanes == ["foreground"] * 40 + ["background"]
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_buffers_held_past_the_limit_hold_the_writer_back() -> None:
    """Queued buffers are memory: past HELD_LIMIT the writer is told to wait, and while it
    waits the foreground lane hashes."""
    hold = threading.Event()
    hasher, log = _recording(hold)
    hashes = HashThread("test-hash-held")
    data = [os.urandom(1 << 20) for _ in range(HELD_LIMIT // (1 << 20) + 4)]

    async def main() -> None:
        for block in data:
            hashes.update(hasher, block)
        while not log.held.is_set():  # the background lane holds the first one
            await trio.sleep(0.001)
        assert hashes.too_far_behind
        await hashes.catch_up()
        assert hashes.held <= HELD_LIMIT // 2
        assert not hashes.too_far_behind

    try:
        trio.run(main)
    finally:
        hold.set()
    hashes.close()
    assert hashes.held == 0
    assert hasher.hexdigest() == hashlib.sha256(b"".join(data)).hexdigest()
    assert log.lanes[0] == "foreground"


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_writer_comes_first_only_in_a_burst_on_a_core_it_waits_for() -> None:
    clock, waited = _Clock(), [0.0]
    writer = WriterFirst(clock, lambda tid: f"123 {int(waited[0] * 1e9)} 7\n")
    assert not writer.holds()  # no write yet
    writer.wrote()
    assert not writer.holds()  # (the first look only starts the window)
    clock.now += 2 * WINDOW
    waited[0] += WINDOW  # (half the time)
    writer.wrote()
    assert writer.holds()
    clock.now += 2 * WINDOW
    waited[0] += WINDOW / 25  # the core is free again
    writer.wrote()
    assert not writer.holds()
    clock.now += 1.5 * WINDOW  # (less than BURST_GAP after the last write: still on)
    waited[0] += 1.5 * WINDOW
    assert writer.holds()
    clock.now += BURST_GAP
    assert not writer.holds()  # the writes paused
    unreadable = WriterFirst(clock, lambda tid: "")
    unreadable.wrote()
    assert not unreadable.holds()


def test_the_background_lane_yields_to_the_writer_and_a_waiter_does_not(
        tmp_path: Path) -> None:
    data = os.urandom(4 * HASH_CHUNK)
    fd = _file_with(tmp_path, data)
    hasher, log = _recording()
    hashes = HashThread("test-hash-yield")
    writer = HeldWriter()
    hashes.writer = writer  # type: ignore[assignment]

    async def main() -> str:
        hashes.update_range(hasher, fd, 0, 2 * HASH_CHUNK)
        looks = writer.looks
        while writer.looks < looks + 2:  # it looked (again) and went on waiting
            await trio.sleep(0.001)
        assert log.lanes == [] and hashes.backlog == 2 * HASH_CHUNK
        value = await hashes.hexdigest(hasher)  # served all the same
        writer.hold = False
        hashes.update_range(hasher, fd, 2 * HASH_CHUNK, 2 * HASH_CHUNK)
        while hashes.backlog:
            await trio.sleep(0.001)
        return value

    assert trio.run(main) == hashlib.sha256(data[:2 * HASH_CHUNK]).hexdigest()
    assert log.lanes == ["foreground"] * 2 + ["background"] * 2
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    hashes.close()
    os.close(fd)
