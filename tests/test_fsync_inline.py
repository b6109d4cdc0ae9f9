"""The group commit syncs a database's rewritten copy (the fsync of a file fsync'd before)
on the loop's thread while such syncs are fast, and in a worker thread once one was slow,
until one there is fast again: a slow disk never holds up the other requests twice in a
row. In the core, on a recording disk (no FUSE)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

import trio

from fsrepo.group_commit import INLINE_SYNC_LIMIT

from .coreutil import running_engine


class TimedDisk:
    """Syncs nothing; records on which thread each data sync ran, taking `delay` seconds."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.data_threads: list[bool] = []  # True: on the main (loop's) thread

    def sync_filesystem(self, root: Path) -> None:
        pass

    def sync_files(self, paths: Iterable[Path]) -> None:
        list(paths)

    def sync_data(self, paths: Iterable[Path]) -> None:
        list(paths)
        self.data_threads.append(threading.current_thread() is threading.main_thread())
        time.sleep(self.delay)


def test_rewritten_copies_sync_inline_while_fast_and_in_a_thread_after_a_slow_one(
        tmp_path: Path) -> None:
    disk = TimedDisk()
    copy = tmp_path / "copy"
    copy.write_bytes(b"wal")

    async def main() -> None:
        async with running_engine(f"file://{tmp_path / 'repo'}", None, tmp_path / "cache",
                                  upload=False, disk=disk) as eng:
            async def fsync(delay: float) -> None:
                disk.delay = delay
                eng.durable.keep_copy(copy, None)  # a copy recorded before: its data only
                await eng.durable.commit()

            await fsync(0)
            await fsync(INLINE_SYNC_LIMIT * 5)  # inline, and slow
            await fsync(0)  # so this one goes to a thread, and is fast
            await fsync(0)  # back inline
            assert disk.data_threads == [True, True, False, True]

    trio.run(main)
