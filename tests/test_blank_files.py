"""Empty staging files made ahead by a thread (blank_files.py): a create takes one off the
queue instead of waiting on the filesystem on the trio thread; nothing made ahead outlives
the unmount, and a refill that fails leaves creates to make their own files."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from fsrepo.blank_files import BATCH, LOW, BlankFiles
from fsrepo.manifest import FileEntry
from fsrepo.staging import StagingArea

from .coreutil import running_engine

EMPTY = FileEntry("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 0, 0, 0o644)


async def _refilled(blanks: BlankFiles) -> None:
    with trio.fail_after(10):
        while blanks._refilling:
            await trio.sleep(0.005)


def test_a_create_takes_a_file_made_ahead_and_the_queue_refills(tmp_path: Path) -> None:
    async def main() -> None:
        blanks = BlankFiles(tmp_path, "run")
        assert blanks.take() is None  # nothing made yet: the caller makes its own
        await _refilled(blanks)
        assert len(blanks.waiting()) == BATCH
        taken = []
        for _ in range(BATCH - LOW + 1):  # down to below LOW: a refill starts
            blank = blanks.take()
            assert blank is not None
            taken.append(blank)
        await _refilled(blanks)
        assert len(blanks.waiting()) == LOW - 1 + BATCH
        paths = [path for path, _ in taken]
        assert len(set(paths)) == len(paths) and not set(p.name for p in paths) & blanks.waiting()
        path, fd = taken[0]
        assert os.pwrite(fd, b"photo", 0) == 5 and path.read_bytes() == b"photo"
        assert os.fstat(fd).st_mode & 0o777 == 0o600
        blanks.close()  # the files not taken go; those taken are the callers'
        assert {p.name for p in tmp_path.iterdir()} == {p.name for p in paths}
        assert blanks.take() is None and not blanks._refilling  # closed: no refill
        for _, fd in taken:
            os.close(fd)

    trio.run(main)


def test_a_refill_after_close_leaves_nothing(tmp_path: Path) -> None:
    """A refill still running when the area closes removes what it makes."""
    blanks = BlankFiles(tmp_path, "run")
    blanks.close()
    blanks._refill()
    assert not any(tmp_path.iterdir()) and not blanks.waiting()


def test_a_failed_refill_leaves_the_creates_to_the_callers(tmp_path: Path) -> None:
    async def main() -> None:
        blanks = BlankFiles(tmp_path / "gone", "run")
        assert blanks.take() is None
        await _refilled(blanks)  # (the thread's error is not raised anywhere)
        assert not blanks.waiting() and blanks.take() is None

    trio.run(main)


def test_staging_copies_come_from_the_queue_and_blanks_are_not_copies(tmp_path: Path) -> None:
    async def main() -> None:
        area = StagingArea(tmp_path / "staging")
        first = area.new(1, EMPTY)  # made here: the queue was empty
        await _refilled(area.blanks)
        second = area.new(2, EMPTY)
        assert second.path.name.startswith(first.path.name.rsplit("-", 1)[0] + "-b")
        assert area.copies_on_disk() == {first.path.name, second.path.name}
        area.drop(1)
        area.drop(2)
        assert not area.copies_on_disk() and area.blanks.waiting()
        area.blanks.close()
        area.hashes.close()
        assert not any(area.directory.iterdir())

    trio.run(main)


def test_an_unmount_leaves_no_file_made_ahead(tmp_path: Path) -> None:
    async def main() -> Path:
        async with running_engine(f"file://{tmp_path / 'repo'}", None, tmp_path / "cache",
                                  upload=False) as eng:
            handle, _ = await eng.files.create(1, b"a.jpg", 0o644)
            await eng.files.release(handle.fh)
            await _refilled(eng.files.staging.blanks)
            assert eng.files.staging.blanks.waiting()
            return eng.files.staging.directory

    staging = trio.run(main)
    assert not any(staging.iterdir())
