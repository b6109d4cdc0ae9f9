"""readdirplus reuses the attributes it built for an unchanged entry (`ls -l` of a big
folder, listed again), and never shows an entry's old attributes once it changed: in the
core, through fs.Operations with pyfuse3's readdir_reply captured (no FUSE)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from fsrepo.engine import Engine
from fsrepo.fs import Operations
from fsrepo.inodes import ROOT_INO
from fsrepo.listed_attrs import ListedAttrs
from fsrepo.manifest import FileEntry

from .coreutil import EngineDriver, running_engine

SHA = "ab" * 32


def test_an_item_is_replaced_and_counted_once() -> None:
    listed = ListedAttrs()
    entry = FileEntry(SHA, 10, 1, 0o644)
    items = listed.folder(1)
    listed.put(1, items, b"a", entry, 7, "attrs")
    assert listed.folder(1)[b"a"] == (entry, 7, "attrs")
    newer = FileEntry(SHA, 11, 1, 0o644)
    listed.put(1, items, b"a", newer, 8, "again")
    assert len(listed) == 1 and items[b"a"] == (newer, 8, "again")


def test_the_folders_listed_longest_ago_make_room() -> None:
    listed = ListedAttrs(max_entries=4)
    entry = FileEntry(SHA, 1, 1)
    first = listed.folder(1)
    for name in (b"a", b"b", b"c"):
        listed.put(1, first, name, entry, 9, name)
    second = listed.folder(2)
    listed.put(2, second, b"x", entry, 9, "x")
    assert len(listed) == 4
    listed.put(2, second, b"y", entry, 9, "y")  # folder 1 goes whole
    assert len(listed) == 2 and listed.folder(1) == {}
    third = listed.folder(3)  # now the newest; folder 2 the oldest
    for name in (b"p", b"q", b"r", b"s", b"t"):
        listed.put(3, third, name, entry, 9, name)
    # Folder 2 made room; folder 3 alone keeps what fits, never more than the bound.
    assert len(listed) == 4 and len(third) == 4
    listed.drop(3)
    assert len(listed) == 0


class Captured:
    """What readdir handed the kernel: (name, attributes object) per entry."""

    def __init__(self) -> None:
        self.replies: list[tuple[bytes, Any]] = []

    def reply(self, token: Any, name: bytes, attrs: Any, next_id: int) -> bool:
        self.replies.append((name, attrs))
        return True


async def _listed(ops: Operations, captured: Captured, ino: int) -> dict[bytes, Any]:
    captured.replies.clear()
    fh = await ops.opendir(ino, None)
    try:
        await ops.readdir(fh, 0, None)
    finally:
        await ops.releasedir(fh)
    return {name: attrs for name, attrs in captured.replies if name not in (b".", b"..")}


def _shown(attrs: Any) -> tuple[int, int, int, int]:
    return attrs.st_ino, attrs.st_size, attrs.st_mode, attrs.st_mtime_ns


@asynccontextmanager
async def photos_folder(tmp_path: Path) -> AsyncIterator[tuple[Engine, Operations,
                                                               EngineDriver]]:
    """An engine (no uploads) with a folder "photos", and the FUSE operations over it."""
    async with running_engine(f"file://{tmp_path / 'repo'}", None, tmp_path / "cache",
                              upload=False) as eng:
        drive = EngineDriver(eng)
        await drive.mkdir("photos")
        yield eng, Operations(eng.ns, eng.files, str(tmp_path)), drive


def test_a_listing_again_reuses_unchanged_entries_and_shows_every_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captured = Captured()
    monkeypatch.setattr(pyfuse3, "readdir_reply", captured.reply)

    async def main() -> None:
        async with photos_folder(tmp_path) as (eng, ops, drive):
            for name in ("same", "rewritten", "chmodded", "open", "renamed"):
                await drive.create(f"photos/{name}", b"12345")
            await drive.symlink("photos/link", b"same")
            # Named, as one commit interval after close() does: until then a closed copy is
            # shown from its staging file and its attributes are built each time, not kept.
            await eng.files.name_closed()
            folder, _ = await drive.node("photos")
            first = await _listed(ops, captured, folder.ino)
            assert sorted(first) == [b"chmodded", b"link", b"open", b"renamed", b"rewritten",
                                     b"same"]
            again = await _listed(ops, captured, folder.ino)
            for name, attrs in first.items():  # nothing changed: the same objects
                assert again[name] is attrs, name

            # The kernel forgets a file's inode and looks the name up again: a new inode for
            # the same entry, which the next listing shows (not the kept one).
            old, _ = await drive.node("photos/same")
            ops.forget([(old.ino, old.lookups)])
            new, _ = await eng.ns.lookup(folder.ino, b"same")
            assert new.ino != old.ino
            relisted = await _listed(ops, captured, folder.ino)
            assert _shown(relisted[b"same"])[0] == new.ino
            first[b"same"] = relisted[b"same"]

            node, _ = await drive.node("photos/rewritten")
            handle = await eng.files.open(node, os.O_WRONLY | os.O_TRUNC)
            await eng.files.write(handle.fh, 0, b"longer content")
            await eng.files.flush(handle.fh)
            await eng.files.release(handle.fh)
            await drive.setattr("photos/chmodded", mode=0o600, mtime_ns=5_000_000_000)
            await drive.rename("photos/renamed", "photos/moved")
            node, _ = await drive.node("photos/open")
            writer = await eng.files.open(node, os.O_WRONLY)
            await eng.files.write(writer.fh, 5, b"67890")  # not closed: shown as written

            after = await _listed(ops, captured, folder.ino)
            assert after[b"same"] is first[b"same"] and after[b"link"] is first[b"link"]
            assert _shown(after[b"rewritten"])[1] == len(b"longer content")
            assert _shown(after[b"chmodded"])[2] & 0o777 == 0o600
            assert _shown(after[b"chmodded"])[3] == 5_000_000_000
            assert _shown(after[b"open"])[1] == 10
            assert b"renamed" not in after
            assert _shown(after[b"moved"])[1] == 5
            await eng.files.flush(writer.fh)
            await eng.files.release(writer.fh)
            closed = await _listed(ops, captured, folder.ino)
            assert _shown(closed[b"open"])[1] == 10
            assert _shown(closed[b"rewritten"]) == _shown(after[b"rewritten"])
            # A folder is shown with its own stat, never kept: a new name moves its mtime.
            root = await _listed(ops, captured, ROOT_INO)
            await drive.create("photos/new", b"")
            root_again = await _listed(ops, captured, ROOT_INO)
            assert root_again[b"photos"] is not root[b"photos"]
            assert _shown(root_again[b"photos"])[3] > _shown(root[b"photos"])[3]

            # The kernel forgetting the folder forgets what was kept for it: its files, and
            # the renamed file's old name (kept until then, within the bound). Folders keep
            # nothing: the root's listing added nothing.
            assert len(ops._listed) == len(closed) + 1
            await eng.files.name_closed()  # a closed copy not named yet pins its folders
            ops.forget([(folder.ino, eng.ns.inodes.node(folder.ino).lookups)])
            assert eng.ns.inodes.get(folder.ino) is None
            assert len(ops._listed) == 0

    trio.run(main)


def test_the_idle_release_lets_go_of_the_kept_attributes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What readdirplus kept for a walk's folders goes with the views and inodes when the
    mount is idle; the next listing builds it again, the same."""
    captured = Captured()
    monkeypatch.setattr(pyfuse3, "readdir_reply", captured.reply)

    async def main() -> None:
        async with photos_folder(tmp_path) as (eng, ops, drive):
            for i in range(20):
                await drive.create(f"photos/{i}.jpg", b"x" * i)
            await eng.files.name_closed()
            folder, _ = await drive.node("photos")
            first = await _listed(ops, captured, folder.ino)
            assert len(ops._listed) == 20
            ns = eng.ns
            ns.idle_after, ns.idle_check, ns.forget_wait = 0.2, 0.05, 0.05
            eng.nursery.start_soon(ns.release_when_idle)
            with trio.fail_after(10):
                while len(ops._listed):
                    await trio.sleep(0.05)
            again = await _listed(ops, captured, folder.ino)
            assert {name: _shown(a)[1:] for name, a in again.items()} == \
                {name: _shown(a)[1:] for name, a in first.items()}

    trio.run(main)
