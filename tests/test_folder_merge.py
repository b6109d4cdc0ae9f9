"""Folders that merge, removals that stick (issue 15), on the engine without FUSE.

Two engines with their own local state share one file:// repository; each is one machine.
The rules are those of docs/cross-machine.md.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import trio

from fsrepo.errors import FsError
from fsrepo.maintenance.gc import collect
from fsrepo.manifest import DirEntry, is_removal_mark
from fsrepo.repository import manifest_key
from fsrepo.store import open_store

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
from .faulty_store import AFTER, BEFORE, CRASH, HOLD, Fault, FaultyStore

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


@pytest.mark.expected_logs(r"was removed (here|on one machine) .*keeping", reason="a removal races an addition on purpose")
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


def _faulty(holder: list):  # noqa: ANN202 - a wrap_store callable
    def wrap(inner):  # noqa: ANN001, ANN202
        holder.append(FaultyStore(inner))
        return holder[0]
    return wrap


async def _until(condition, what: str) -> None:  # noqa: ANN001
    with trio.fail_after(30):
        while not condition():
            await trio.sleep(0.01)


def test_a_folder_removed_while_its_own_commit_is_in_flight_stays_removed(tmp_path):
    """One machine alone: `d/f` is created, its commit into `d` goes out (and is slow),
    then `rm d/f` and `rmdir d`. The removal marks `d` removed before that commit's write
    lands; the write then meets the mark. The file it carries is this machine's own, and
    this machine removed it since: `d` must stay removed (it once came back, file and
    all, in the kill -9 soak)."""
    root = tmp_path / "repo"
    stores: list[FaultyStore] = []

    async def main():
        async with engine(root, tmp_path / "a", wrap_store=_faulty(stores)) as a:
            await makedirs(a, "d")
            await write_file(a, b"other/g", b"g")
            await a.uploader.wait_idle()
            d_id = (await list_dir(a))[b"d"].id
            hold = Fault("put", prefix=manifest_key(d_id), effect=HOLD)
            stores[0].arm(hold)
            await write_file(a, b"d/f", b"f")
            with trio.fail_after(30):
                await hold.held.wait()  # d's commit of f is in flight
            await remove(a, b"d/f")
            top, _ = await resolve(a, "")
            await a.ns.remove(top.ino, b"d", is_dir=True)
            await _until(lambda: "root" not in a.journal.by_dir, "the removal to land")
            hold.release()
            await a.uploader.wait_idle()
            assert set(await list_dir(a)) == {b"other"}
        async with engine(root, tmp_path / "fresh") as fresh:
            assert await tree(fresh) == {b"other": None, b"other/g": b"g"}
        assert manifests(root) <= reachable(root)

    trio.run(main)


# Where the first run stops while removing `d/f` and then `d` (kind, key, when, nth), with
# the two commits made in either order: at each write to `d`'s manifest (the removal of
# `f`, the removal mark) before or after it landed, after the parent's write, and after
# the remover's last look at `d` (is anything added over the mark?). Each exists in both
# orders but the second write to `d`.
REMOVAL_CRASHES = {
    "d-write-1-lost": ("put", "d", BEFORE, 1),
    "d-write-1-landed": ("put", "d", AFTER, 1),
    "d-write-2-landed": ("put", "d", AFTER, 2),
    "parent-write-landed": ("put", "root", AFTER, 1),
    "d-read-again": ("get", "d", AFTER, 2),
}
ORDERS = {"file-first": ("d", "root"), "folder-first": ("root", "d")}


@pytest.mark.parametrize(("step", "order"), [
    (step, order) for step in sorted(REMOVAL_CRASHES) for order in sorted(ORDERS)
    # folder first, d's manifest is written once (the mark), then deleted
    if (step, order) != ("d-write-2-landed", "folder-first")])
def test_a_crash_while_removing_a_folder_never_brings_it_back(tmp_path, step, order):
    """kill -9 at each step of `rm d/f; rmdir d` (its two commits made in either order),
    then the journal replayed: `d` stays removed, and no manifest is left that no folder
    lists."""
    root = tmp_path / "repo"
    kind, which, when, nth = REMOVAL_CRASHES[step]
    scope = trio.CancelScope()
    stores: list[FaultyStore] = []

    def wrap(inner):  # noqa: ANN001, ANN202
        stores.append(FaultyStore(inner, on_crash=scope.cancel))
        return stores[-1]

    async def main():
        async with engine(root, tmp_path / "a") as a:
            await write_file(a, b"d/f", b"f")
            await write_file(a, b"other/g", b"g")
            await a.uploader.wait_idle()
            d_id = (await list_dir(a))[b"d"].id
        with scope:
            async with engine(root, tmp_path / "a", upload=False, wrap_store=wrap) as a:
                await remove(a, b"d/f")
                top, _ = await resolve(a, "")
                await a.ns.remove(top.ino, b"d", is_dir=True)
                key = manifest_key(d_id if which == "d" else which)
                stores[0].arm(Fault(kind, nth, effect=CRASH, when=when, prefix=key))
                for name in ORDERS[order]:
                    dir_id = d_id if name == "d" else name
                    batch = list(a.journal.by_dir.get(dir_id, ()))
                    if batch:
                        await a.uploader.manifests.commit(dir_id, batch)
                raise AssertionError(f"committed without reaching the crash: {step}")
        assert stores[0].crashed
        async with engine(root, tmp_path / "a") as again:
            await again.uploader.wait_idle()
            assert set(await list_dir(again)) == {b"other"}
        async with engine(root, tmp_path / "fresh") as fresh:
            assert await tree(fresh) == {b"other": None, b"other/g": b"g"}
        assert manifests(root) <= reachable(root)

    trio.run(main)


A_ORDERS = {"bottom-up": ("s", "p", "root"), "top-down": ("root", "p", "s")}


@pytest.mark.expected_logs(r"was removed (here|on one machine) .*keep",
                           reason="a removal races an addition on purpose")
@pytest.mark.parametrize("b_after", [0, 1, 2, 3])
@pytest.mark.parametrize("a_order", sorted(A_ORDERS))
def test_files_added_into_a_subfolder_of_a_folder_removed_elsewhere_stay_listed(
        tmp_path, a_order, b_after):
    """Machine a removes `p` with everything in it (`rm -r`: p/s/f, p/s, p/g, p) while b
    adds `p/s/new`. a's three commits (s, p and the root) go in either order, and b's
    lands before, between or after them: the path to b's file is kept, holding only
    b's file (a's removals of f and g stand), and no manifest is left unlisted."""
    root = tmp_path / "repo"

    async def main():
        async with engine(root, tmp_path / "setup") as eng:
            await write_file(eng, b"p/s/f", b"f")
            await write_file(eng, b"p/g", b"g")
            await write_file(eng, b"other/h", b"h")
            await eng.uploader.wait_idle()
        async with engine(root, tmp_path / "a", upload=False, host="hostA") as a, \
                engine(root, tmp_path / "b", upload=False, host="hostB") as b:
            await write_file(b, b"p/s/new", b"added on b")
            ids = {"root": "root", "p": (await list_dir(a))[b"p"].id}
            ids["s"] = (await list_dir(a, "p"))[b"s"].id
            await remove(a, b"p/s/f")
            p_node, _ = await resolve(a, "p")
            await a.ns.remove(p_node.ino, b"s", is_dir=True)
            await remove(a, b"p/g")
            await a.ns.remove(1, b"p", is_dir=True)
            for step, name in enumerate(A_ORDERS[a_order]):
                if step == b_after:
                    start_uploader(b)
                    await b.uploader.wait_idle()
                batch = list(a.journal.by_dir.get(ids[name], ()))
                if batch:
                    await a.uploader.manifests.commit(ids[name], batch)
            if b_after == 3:
                start_uploader(b)
                await b.uploader.wait_idle()
            start_uploader(a)  # what a's commits decided to put back
            await a.uploader.wait_idle()
            await b.uploader.wait_idle()
        async with engine(root, tmp_path / "fresh") as fresh:
            got = await tree(fresh)
        assert got == {b"p": None, b"p/s": None, b"p/s/new": b"added on b",
                       b"other": None, b"other/h": b"h"}
        assert manifests(root) <= reachable(root)

    trio.run(main)


@pytest.mark.expected_logs(r"was removed (here|on one machine) .*keep",
                           reason="a removal races an addition on purpose")
def test_an_addition_landing_just_after_the_removers_last_look_stays_listed(tmp_path):
    """The remover's last look at a removed folder (has anyone written over its mark?)
    answers "no"; another machine's addition lands right after. The remover then leaves
    the mark (a tombstone) instead of deleting the manifest (S3 has no conditional
    delete), so the addition, written over the mark, stays, and its writer puts the
    folder back."""
    root = tmp_path / "repo"
    stores: list[FaultyStore] = []

    async def main():
        async with engine(root, tmp_path / "setup") as eng:
            await write_file(eng, b"d/x", b"x")
            await eng.uploader.wait_idle()
        async with engine(root, tmp_path / "a", upload=False, host="hostA",
                          wrap_store=_faulty(stores)) as a, \
                engine(root, tmp_path / "b", upload=False, host="hostB") as b:
            await write_file(b, b"d/new", b"added on b")
            d_id = (await list_dir(a))[b"d"].id
            await remove(a, b"d/x")
            await a.ns.remove(1, b"d", is_dir=True)
            last_look = Fault("get", 2, effect=HOLD, when=AFTER, prefix=manifest_key(d_id))
            stores[0].arm(last_look)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.uploader.manifests.commit, "root",
                                   list(a.journal.by_dir["root"]))
                with trio.fail_after(30):
                    await last_look.held.wait()
                start_uploader(b)
                await b.uploader.wait_idle()
                last_look.release()
            start_uploader(a)
            await a.uploader.wait_idle()
            await b.uploader.wait_idle()
        async with engine(root, tmp_path / "fresh") as fresh:
            assert await tree(fresh) == {b"d": None, b"d/new": b"added on b"}
        assert manifests(root) <= reachable(root)

    trio.run(main)


def test_gc_deletes_removal_marks_older_than_its_grace_period(tmp_path):
    """The marks removed folders leave (tombstones) go with `--gc`, once older than its
    grace period; a mark another machine has since written entries over stays."""
    root = tmp_path / "repo"

    async def main():
        async with engine(root, tmp_path / "a") as a:
            for name in ("gone", "back"):
                await write_file(a, f"{name}/f".encode(), b"f")
            await a.uploader.wait_idle()
            ids = {n.decode(): e.id for n, e in (await list_dir(a)).items()}
            for name in ("gone", "back"):
                await remove(a, f"{name}/f".encode())
                await a.ns.remove(1, name.encode(), is_dir=True)
            await a.uploader.wait_idle()
        marks = {n for n, d in ids.items() if is_removal_mark(
            (root / manifest_key(d)).read_bytes(), d)}
        assert marks == {"gone", "back"}
        back = root / manifest_key(ids["back"])  # another machine wrote over its mark
        back.write_bytes(json.dumps({"imgrepo_manifest": 1, "dir_id": ids["back"],
                                     "entries": {}}).encode())
        store = open_store(f"file://{root}")
        try:
            now = time.time()
            young = await collect(store, 1, dry_run=False, now=now)
            dry = await collect(store, 1, dry_run=True, now=now + 7200)
            assert (young.tombstones, dry.tombstones) == (0, 1)
            assert (root / manifest_key(ids["gone"])).exists()
            old = await collect(store, 1, dry_run=False, now=now + 7200)
            assert old.tombstones == 1
        finally:
            await store.aclose()
        assert not (root / manifest_key(ids["gone"])).exists() and back.exists()
        async with engine(root, tmp_path / "fresh") as fresh:
            assert await tree(fresh) == {}

    trio.run(main)


# Where one machine stops (kill -9) while the two machines' "2024" trees merge: side,
# (kind, whose manifest, when, nth). a's tree reaches the bucket first; b's merges into it.
MERGE_CRASHES = {
    "a-root-write-landed": ("a", ("put", "root", AFTER, 1)),
    "a-2024-write-landed": ("a", ("put", "a2024", AFTER, 1)),
    "b-root-write-lost": ("b", ("put", "root", BEFORE, 1)),
    "b-root-write-after-merge-landed": ("b", ("put", "root", AFTER, 2)),
    "b-write-into-a2024-lost": ("b", ("put", "a2024", BEFORE, 1)),
    "b-write-into-a2024-landed": ("b", ("put", "a2024", AFTER, 1)),
    "b-merged-away-manifest-delete": ("b", ("delete", "b2024", BEFORE, 1)),
}


@pytest.mark.parametrize("step", sorted(MERGE_CRASHES))
def test_a_crash_at_each_step_of_a_folder_merge_loses_nothing(tmp_path, step):
    """Both machines create the same three-level tree; one of them is killed at a step
    of the upload and merge, then started again from its local state: a fresh mount
    lists exactly the union, one tree, and no manifest is left that no folder lists."""
    root = tmp_path / "repo"
    side, (kind, whose, when, nth) = MERGE_CRASHES[step]
    scope = trio.CancelScope()
    stores: list[FaultyStore] = []

    def wrap(inner):  # noqa: ANN001, ANN202
        stores.append(FaultyStore(inner, on_crash=scope.cancel))
        return stores[-1]

    async def upload(cache: str, host: str, fault: Fault | None) -> None:
        async with engine(root, tmp_path / cache, host=host,
                          wrap_store=wrap if fault else None) as eng:
            if fault is not None:
                stores[-1].arm(fault)
            await eng.uploader.wait_idle()

    async def main():
        async with engine(root, tmp_path / "setup") as eng:
            await makedirs(eng, "top")
            await eng.uploader.wait_idle()
        files: dict[bytes, bytes] = {}
        ids: dict[str, str] = {"root": "root"}
        async with engine(root, tmp_path / "a", upload=False, host="hostA") as a, \
                engine(root, tmp_path / "b", upload=False, host="hostB") as b:
            for eng, who in ((a, "a"), (b, "b")):
                for i in range(9):
                    path = LEVELS[i % 3] + b"/%s-%d.jpg" % (who.encode(), i)
                    files[path] = b"%s %d" % (who.encode(), i)
                    await write_file(eng, path, files[path])
                await write_file(eng, b"2024/summer/same.txt", b"the same bytes")
                ids[who + "2024"] = (await list_dir(eng))[b"2024"].id
        files[b"2024/summer/same.txt"] = b"the same bytes"
        fault = Fault(kind, nth, effect=CRASH, when=when, prefix=manifest_key(ids[whose]))
        with scope:
            await upload("a", "hostA", fault if side == "a" else None)
            await upload("b", "hostB", fault if side == "b" else None)
            raise AssertionError(f"uploaded without reaching the crash: {step}")
        assert stores[0].crashed
        if side == "a":  # the other machine goes on meanwhile
            await upload("b", "hostB", None)
        await upload(side, "host" + side.upper(), None)  # started again
        async with engine(root, tmp_path / "fresh") as fresh:
            got = await tree(fresh)
        expected = {**files, b"top": None, b"2024": None, b"2024/summer": None,
                    b"2024/summer/beach": None}
        assert got == expected
        assert manifests(root) <= reachable(root)

    trio.run(main)
