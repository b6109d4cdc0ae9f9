"""Folders that merge, removals that stick (issue 15), on the engine without FUSE.

Two engines with their own local state share one file:// repository; each is one machine.
The rules are those of docs/cross-machine.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from fsrepo.errors import FsError
from fsrepo.manifest import DirEntry, is_removal_mark
from fsrepo.repository import manifest_key

from .coreutil import (
    list_dir,
    makedirs,
    remove,
    resolve,
    running_engine,
    start_uploader,
    tree,
    write_file,
)

LEVELS = (b"2024", b"2024/summer", b"2024/summer/beach")


def engine(root: Path, cache: Path, **kw):  # noqa: ANN201
    return running_engine(f"file://{root}", None, cache, **kw)


def manifests(root: Path) -> set[str]:
    """The manifests in the bucket (but the marks of removed never-filled directories)."""
    return {p.name[:-len(".json")] for p in (root / "dirs").glob("*.json")
            if not is_removal_mark(p.read_bytes(), p.name[:-len(".json")])}


def reachable(root: Path) -> set[str]:
    """The directory ids reachable from the root manifest."""
    seen, todo = set(), ["root"]
    while todo:
        dir_id = todo.pop()
        seen.add(dir_id)
        path = root / manifest_key(dir_id)
        if not path.exists():
            continue
        for entry in json.loads(path.read_bytes()).get("entries", {}).values():
            if entry["type"] == "dir" and entry["id"] not in seen:
                todo.append(entry["id"])
    return seen


async def fill(eng, side: str, count: int) -> dict[bytes, bytes]:
    """`count` files spread over the three same-named levels, plus shared names."""
    out: dict[bytes, bytes] = {}
    for i in range(count):
        path = LEVELS[i % 3] + b"/%s-%03d.jpg" % (side.encode(), i)
        out[path] = b"%s %d" % (side.encode(), i)
        await write_file(eng, path, out[path])
    await write_file(eng, b"2024/summer/same.txt", b"the same bytes")
    await write_file(eng, b"2024/summer/beach/differs.txt", side.encode())
    return out


@pytest.mark.expected_logs(r"conflict: .* was changed on another machine too", reason="the two machines write different content under one file name on purpose")
def test_a_folder_created_on_two_machines_is_one_folder_with_both_machines_files(tmp_path):
    root = tmp_path / "repo"

    async def main():
        async with engine(root, tmp_path / "setup") as eng:
            await makedirs(eng, "top")
            await eng.uploader.wait_idle()
        async with engine(root, tmp_path / "a", upload=False, host="hostA") as a, \
                engine(root, tmp_path / "b", upload=False, host="hostB") as b:
            files = await fill(a, "a", 60)
            files |= await fill(b, "b", 60)
            cwd_b, _ = await resolve(b, "2024/summer")  # a program working in there
            start_uploader(a)
            await a.uploader.wait_idle()
            start_uploader(b)
            await b.uploader.wait_idle()
            assert b.uploader.status.conflicts == 1  # differs.txt, and nothing else
            # The program inside b's own "2024/summer" keeps working, and sees both.
            names = {n for n, _ in await b.ns.listing(cwd_b.ino)}
            assert {b"a-001.jpg", b"b-001.jpg", b"same.txt"} <= names
            await write_file(b, b"late.txt", b"after the merge", parent=cwd_b)
            await b.uploader.wait_idle()
            files[b"2024/summer/late.txt"] = b"after the merge"
            await a.ns.views.revalidate("root")
            assert set(await list_dir(a)) == set(await list_dir(b)) == {b"top", b"2024"}
        async with engine(root, tmp_path / "fresh") as fresh:
            got = await tree(fresh, b"2024")
        dirs = {p for p, data in got.items() if data is None}
        assert dirs == {b"2024/summer", b"2024/summer/beach"}
        copies = [p for p in got if b"(conflict" in p]
        assert len(copies) == 1 and copies[0].startswith(b"2024/summer/beach/differs (conflict")
        for path, data in files.items():
            assert got[path] == data, path
        assert got[b"2024/summer/same.txt"] == b"the same bytes"
        assert len(got) == len(files) + 2 + 2 + 1  # + same, differs, its copy, 2 dirs
        left = {d: (root / manifest_key(d)).read_bytes()[:300] for d in manifests(root) - reachable(root)}
        assert not left  # nothing left that no folder lists

    trio.run(main)


def test_a_folder_merge_is_done_once_even_if_repeated(tmp_path):
    """Redoing a merge (a crash after its transaction, before the manifest write) moves
    nothing again: a file removed after the merge stays removed."""
    root = tmp_path / "repo"

    async def main():
        async with engine(root, tmp_path / "b", upload=False, host="hostB") as b:
            await write_file(b, b"d/b.txt", b"b")
            async with engine(root, tmp_path / "a", host="hostA") as a:
                await write_file(a, b"d/a.txt", b"a")
                await a.uploader.wait_idle()
            ours = (await list_dir(b))[b"d"]
            assert isinstance(ours, DirEntry)
            await b.ns.views.revalidate("root")
            theirs = (await list_dir(b))[b"d"]
            assert theirs != ours  # the view shows theirs, not a conflict copy
            merger = b.uploader.manifests.merger
            assert await merger.merge(ours.id, theirs.id)
            assert not await merger.merge(ours.id, theirs.id)
        async with engine(root, tmp_path / "b", host="hostB") as b:
            assert not await b.uploader.manifests.merger.merge(ours.id, theirs.id)
            await b.uploader.wait_idle()
            await remove(b, b"d/b.txt")
            await b.uploader.wait_idle()
            assert not await b.uploader.manifests.merger.merge(ours.id, theirs.id)
        async with engine(root, tmp_path / "fresh") as fresh:
            assert await tree(fresh) == {b"d": None, b"d/a.txt": b"a"}
        assert manifests(root) <= reachable(root)

    trio.run(main)


def test_removing_and_recreating_folders_on_one_machine_leaves_nothing_unreachable(
        tmp_path, caplog):
    """What `rsync -a --delete` does after folders were renamed in its source: remove a
    tree file by file, folder by folder, and create new ones (some with the old names)."""
    root = tmp_path / "repo"
    caplog.set_level(logging.WARNING)

    async def main():
        async with engine(root, tmp_path / "a") as a:
            for d in ("status", "status/x", "status/x/y", "keep", "old"):
                for i in range(5):
                    await write_file(a, f"{d}/f{i}", f"{d} {i}".encode())
            await a.uploader.wait_idle()
            for rnd in range(3):
                for d in ("status/x/y", "status/x", "status", "old"):
                    parent, _ = await resolve(a, d)
                    for i in range(5):
                        try:
                            await remove(a, f"{d}/f{i}")
                        except FsError:
                            pass
                    for name in [n for n, e in await a.ns.listing(parent.ino)]:
                        await remove(a, f"{d}/{name.decode()}")
                    up, _ = await resolve(a, d.rsplit("/", 1)[0] if "/" in d else "")
                    await a.ns.remove(up.ino, d.rsplit("/", 1)[-1].encode(), is_dir=True)
                    if rnd == 1:
                        await a.uploader.wait_idle()
                for d in ("status", "status/x", "status/x/y", "old"):
                    await write_file(a, f"{d}/f0", f"round {rnd}".encode())
                if rnd != 2:
                    await a.uploader.wait_idle()
            await a.uploader.wait_idle()
        async with engine(root, tmp_path / "fresh") as fresh:
            got = await tree(fresh)
        assert got[b"status/x/y/f0"] == b"round 2" and got[b"keep/f4"] == b"keep 4"
        left = {d: (root / manifest_key(d)).read_bytes()[:300]
                for d in manifests(root) - reachable(root)}
        assert not left

    trio.run(main)
    assert "another machine added" not in caplog.text


RENAMES = {  # (from folder, new name) of one directory "d", one per machine
    "both-within": ((b"", b"x"), (b"", b"y")),
    "within-and-out": ((b"", b"x"), (b"sub", b"y")),
    "out-and-within": ((b"sub", b"x"), (b"", b"y")),
    "both-out": ((b"sub", b"x"), (b"sub2", b"y")),
    "both-out-same-folder": ((b"sub", b"x"), (b"sub", b"y")),
}


@pytest.mark.expected_logs(r"was renamed on another machine first", reason="two machines rename one folder on purpose; the later rename is taken back")
@pytest.mark.parametrize("case", sorted(RENAMES))
def test_one_folder_renamed_to_two_names_on_two_machines_ends_under_the_first(tmp_path, case):
    root = tmp_path / "repo"
    (a_to, a_name), (b_to, b_name) = RENAMES[case]

    async def rename(eng, to: bytes, name: bytes) -> None:
        dest, _ = await resolve(eng, to)
        await eng.ns.rename(1, b"d", dest.ino, name)

    async def main():
        async with engine(root, tmp_path / "setup") as eng:
            await write_file(eng, b"d/inner/f", b"content")
            await makedirs(eng, "sub")
            await makedirs(eng, "sub2")
            await eng.uploader.wait_idle()
        async with engine(root, tmp_path / "a", upload=False, host="hostA") as a, \
                engine(root, tmp_path / "b", upload=False, host="hostB") as b:
            await rename(a, a_to, a_name)
            await rename(b, b_to, b_name)
            start_uploader(a)
            await a.uploader.wait_idle()
            start_uploader(b)
            await b.uploader.wait_idle()
            await b.uploader.wait_idle()  # (a take-back is a commit of its own)
            got_b = await tree(b)
        async with engine(root, tmp_path / "fresh") as fresh:
            got = await tree(fresh)
        first = (a_to + b"/" if a_to else b"") + a_name
        assert {p for p in got if p.endswith(b"/f")} == {first + b"/inner/f"}
        assert got[first + b"/inner/f"] == b"content"
        assert got_b == got
        assert manifests(root) <= reachable(root)

    trio.run(main)


@pytest.mark.expected_logs(r"was removed (here|on another machine) .*keeping it", reason="a removal races an addition on purpose")
@pytest.mark.parametrize("first", ["addition", "removal", "removal-marked"])
def test_a_folder_removed_while_another_machine_adds_to_it_keeps_the_additions(tmp_path, first):
    """Removal versus addition: whichever lands first, the added file stays reachable
    ("removal-marked": the remover has marked the folder removed but its removal from the
    parent has not landed when the addition does)."""
    root = tmp_path / "repo"

    async def main():
        async with engine(root, tmp_path / "setup") as eng:
            await makedirs(eng, "d")
            await write_file(eng, b"other/f", b"f")
            await eng.uploader.wait_idle()
        async with engine(root, tmp_path / "a", upload=False, host="hostA") as a, \
                engine(root, tmp_path / "b", upload=False, host="hostB") as b:
            await list_dir(a, "d")
            await write_file(b, b"d/new.txt", b"added on b")
            d_a, _ = await resolve(a, "")
            d_id = (await list_dir(a))[b"d"].id
            if first == "removal-marked":
                body = (root / manifest_key(d_id)).read_bytes() \
                    if (root / manifest_key(d_id)).exists() else None
                committer = a.uploader.manifests
                assert await committer._mark_removed(d_id, "root", b"d") is not None
                assert body != (root / manifest_key(d_id)).read_bytes()
                start_uploader(b)
                await b.uploader.wait_idle()
                await a.ns.remove(d_a.ino, b"d", is_dir=True)
                start_uploader(a)
                await a.uploader.wait_idle()
            else:
                await a.ns.remove(d_a.ino, b"d", is_dir=True)
                order = [b, a] if first == "addition" else [a, b]
                for eng in order:
                    start_uploader(eng)
                    await eng.uploader.wait_idle()
                await b.uploader.wait_idle()
        async with engine(root, tmp_path / "fresh") as fresh:
            got = await tree(fresh)
        assert got == {b"d": None, b"d/new.txt": b"added on b", b"other": None,
                       b"other/f": b"f"}
        left = {d: (root / manifest_key(d)).read_bytes()[:300]
                for d in manifests(root) - reachable(root)}
        assert not left

    trio.run(main)
