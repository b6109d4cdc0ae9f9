"""A directory's mtime, ctime and link count, in the core (no FUSE): which changes move
them, that they travel in the directory's own manifest to other machines, how two
machines' times merge, and that manifests written before the time was kept still read.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from fsrepo.engine import Engine
from fsrepo.manifest import DirEntry, Manifest, parse_manifest, serialise_manifest
from fsrepo.namespace import DirStat, dir_times
from fsrepo.repository import manifest_key

from .coreutil import EngineDriver, running_engine


def _url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'repository'}"


async def shown(eng: Engine, path: str) -> DirStat:
    """What stat shows of a directory (the calls fs.getattr makes)."""
    node, _ = await EngineDriver(eng).node(path)
    _, entry = await eng.files.stat(node.ino)
    assert isinstance(entry, DirEntry)
    stat = eng.ns.dir_stat(entry)
    assert stat is not None
    return stat


async def moved(eng: Engine, path: str, before: DirStat) -> DirStat:
    """The directory's stat, checked to show a later mtime (= ctime) than `before`."""
    after = await shown(eng, path)
    assert after.mtime_ns > before.mtime_ns, path
    assert after.ctime_ns == after.mtime_ns
    return after


def test_the_later_of_a_names_change_and_a_set_time_wins():
    entry = DirEntry("d", 100)
    assert dir_times(entry, None) == (100, 100)
    assert dir_times(entry, 50) == (100, 100)
    assert dir_times(entry, 300) == (300, 300)
    touched = DirEntry("d", 10, ctime_ns=500)  # utimens(10) at 500
    assert dir_times(touched, 300) == (10, 500)  # after filling it: cp -a, rsync -a
    assert dir_times(touched, 700) == (700, 700)


def test_names_changes_move_a_directorys_times_and_modifications_do_not(tmp_path):
    async def main():
        async with running_engine(_url(tmp_path), None, tmp_path / "a") as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("d")
            await fs.mkdir("e")
            d = await shown(eng, "d")
            assert d.nlink == 2

            async def step(action, *paths: str) -> None:  # noqa: ANN001
                nonlocal d
                before = {p: await shown(eng, p) for p in paths}
                await trio.sleep(0.002)
                await action
                for p in paths:
                    await moved(eng, p, before[p])

            await step(fs.create("d/f", b"one"), "d")
            await step(fs.mkdir("d/sub"), "d")
            assert (await shown(eng, "d")).nlink == 3
            await step(fs.symlink("d/link", b"f"), "d")
            await step(fs.rename("d/f", "d/g"), "d")
            await step(fs.rename("d/g", "e/g"), "d", "e")
            await step(fs.rename("d/sub", "e/sub"), "d", "e")
            assert (await shown(eng, "d")).nlink == 2
            assert (await shown(eng, "e")).nlink == 3
            await step(fs.unlink("d/link"), "d")
            await step(fs.rmdir("e/sub"), "e")
            assert (await shown(eng, "e")).nlink == 2

            # Writing, truncating and chmod of an entry leave its directory's times.
            before = await shown(eng, "e")
            await trio.sleep(0.002)
            await fs.write_at("e/g", 0, b"two")
            await fs.truncate("e/g", 1)
            await fs.setattr("e/g", mode=0o600)
            assert await shown(eng, "e") == before

            # utimens after filling (cp -a): the set time stays, a chmod keeps it, the
            # next names change moves it again.
            await fs.setattr("e", mtime_ns=10**18)
            assert (await shown(eng, "e")).mtime_ns == 10**18
            await fs.setattr("e", mode=0o700)
            kept = await shown(eng, "e")
            assert kept.mtime_ns == 10**18 and kept.ctime_ns > before.mtime_ns
            await fs.create("e/h")
            assert (await shown(eng, "e")).mtime_ns > kept.ctime_ns

            seen = {p: await shown(eng, p) for p in ("d", "e", "")}
            await eng.uploader.wait_idle()  # the manifests written say the same
            assert {p: await shown(eng, p) for p in seen} == seen
        # Another machine (an empty cache) sees the same, from the manifests alone.
        async with running_engine(_url(tmp_path), None, tmp_path / "b") as other:
            for path, stat in seen.items():
                assert await shown(other, path) == stat, path
    trio.run(main)


def test_two_machines_times_merge_to_the_later(tmp_path):
    async def main():
        async with running_engine(_url(tmp_path), None, tmp_path / "setup") as eng:
            await EngineDriver(eng).mkdir("shared")
            await eng.uploader.wait_idle()
        async with running_engine(_url(tmp_path), None, tmp_path / "a", upload=False,
                                  host="hostA") as a, \
                running_engine(_url(tmp_path), None, tmp_path / "b", upload=False,
                               host="hostB") as b:
            await EngineDriver(a).create("shared/from-a")
            await trio.sleep(0.002)
            await EngineDriver(b).create("shared/from-b")
            later = await shown(b, "shared")
            assert later.mtime_ns > (await shown(a, "shared")).mtime_ns
            # the later change lands first, the earlier one merges onto it
            b.nursery.start_soon(b.uploader.run)  # type: ignore[attr-defined]
            await b.uploader.wait_idle()
            a.nursery.start_soon(a.uploader.run)  # type: ignore[attr-defined]
            await a.uploader.wait_idle()
            await EngineDriver(a).revalidate()
            await EngineDriver(b).revalidate()
            assert await shown(a, "shared") == await shown(b, "shared")
            assert (await shown(a, "shared")).mtime_ns == later.mtime_ns
            assert set(await EngineDriver(a).listdir("shared")) == {b"from-a", b"from-b"}
    trio.run(main)


def test_a_manifest_without_a_time_reads_as_before(tmp_path):
    """Repositories written before the time was kept: the entry's time, as it was."""
    repo = tmp_path / "repository"

    async def main():
        async with running_engine(_url(tmp_path), None, tmp_path / "setup") as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("old")
            await fs.create("old/a")
            await eng.uploader.wait_idle()
            node, _ = await fs.node("old")
            dir_id = node.dir_id
        path = repo / manifest_key(dir_id)
        doc = json.loads(path.read_bytes())
        assert "mtime_ns" in doc  # written now, additively
        manifest = parse_manifest(path.read_bytes(), dir_id)[0]
        path.write_bytes(serialise_manifest(Manifest(dir_id, manifest.entries)))
        assert "mtime_ns" not in json.loads(path.read_bytes())
        root = json.loads((repo / manifest_key("root")).read_bytes())
        stored = root["entries"]["old"]["mtime_ns"]
        async with running_engine(_url(tmp_path), None, tmp_path / "fresh") as eng:
            stat = await shown(eng, "old")
            assert (stat.mtime_ns, stat.ctime_ns, stat.nlink) == (stored, stored, 2)
            assert (await shown(eng, "")).nlink == 3
    trio.run(main)


def test_a_time_set_after_a_pending_names_change_survives_a_restart(tmp_path):
    """Found by the stateful model: `mkdir a/a`, then `utimens a`, the mount restarted
    before the mkdir reached the bucket. The replayed mkdir keeps the time it was made at,
    so the folder still shows the time set after it (not the restart's time)."""
    async def main():
        async with running_engine(_url(tmp_path), None, tmp_path / "a", upload=False) as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("a")
            await fs.mkdir("a/a")
            await trio.sleep(0.002)
            await fs.setattr("a", mtime_ns=10**18 + 7)
            assert (await shown(eng, "a")).mtime_ns == 10**18 + 7
            assert eng.journal.by_dir  # still pending
        await trio.sleep(0.01)
        async with running_engine(_url(tmp_path), None, tmp_path / "a", upload=False) as eng:
            assert eng.journal.by_dir  # replayed
            assert (await shown(eng, "a")).mtime_ns == 10**18 + 7
    trio.run(main)


def test_a_time_set_right_after_a_file_is_closed_in_it_survives_a_restart(tmp_path):
    """Found by the stateful model: a file created and closed in `b` (its name written
    behind, the close only logged), then `utimens b` at once: both ops reach the database
    in one write. The creation keeps the time it was recorded at, not that write's, so the
    folder still shows the time set after it once the mount restarts."""
    async def main():
        async with running_engine(_url(tmp_path), None, tmp_path / "a", upload=False) as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("b")
            await fs.create("b/c", b"x" * 32_000)
            assert eng.journal.unwritten  # the creation is still on its way to the database
            await fs.setattr("b", mtime_ns=10**18 + 7)
            assert (await shown(eng, "b")).mtime_ns == 10**18 + 7
        async with running_engine(_url(tmp_path), None, tmp_path / "a", upload=False) as eng:
            assert eng.journal.by_dir  # replayed
            assert (await shown(eng, "b")).mtime_ns == 10**18 + 7
    trio.run(main)
