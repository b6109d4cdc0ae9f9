"""Snapshots on a real FUSE mount: --snapshot, reading `.snapshots/NAME/...` (hidden from the
root's listing, EROFS for writes), the reserved name, --snapshots, rmdir to delete, and
every earlier state read back after a remount with an empty cache and after --gc."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from .mountutil import Mounter, file_tree, run_cli
from .targets import StorageTarget


def snapshot(m, name: str) -> None:  # noqa: ANN001 - a MountProcess
    out = run_cli(["--snapshot", str(m.path), name], m.env).stdout
    assert f"snapshot {name} taken" in out


def test_deleted_overwritten_and_renamed_come_back_from_snapshots(
        storage: StorageTarget, mounter: Mounter, tmp_path: Path) -> None:
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    root = m.path
    (root / "2024" / "trip").mkdir(parents=True)
    (root / "2024" / "trip" / "a.jpg").write_bytes(b"A" * 300_000)
    (root / "2024" / "b.jpg").write_bytes(b"B original")
    (root / "old").mkdir()
    (root / "old" / "c.jpg").write_bytes(b"C")
    snapshot(m, "s1")
    states = {"s1": file_tree(root)}
    (root / "2024" / "b.jpg").write_bytes(b"B overwritten")  # overwrite a file
    shutil.rmtree(root / "old")  # delete a folder
    os.rename(root / "2024" / "trip", root / "trip-2024")  # rename a tree
    snapshot(m, "s2")
    states["s2"] = file_tree(root)
    (root / "trip-2024" / "a.jpg").unlink()
    assert states["s1"]["2024/b.jpg"] == b"B original"

    # reachable by path, never listed: rsync/find/du of the mount do not walk them
    assert ".snapshots" not in os.listdir(root)
    assert sorted(os.listdir(root / ".snapshots")) == ["s1", "s2"]
    for name, state in states.items():
        assert file_tree(root / ".snapshots" / name) == state
    # read-only: every write answers EROFS
    for attempt in (lambda: (root / ".snapshots/s1/2024/b.jpg").write_bytes(b"x"),
                    lambda: (root / ".snapshots/s1/new").mkdir(),
                    lambda: (root / ".snapshots/s1/2024/b.jpg").unlink(),
                    lambda: os.rename(root / ".snapshots/s1/2024", root / ".snapshots/s1/y"),
                    lambda: os.chmod(root / ".snapshots/s1/2024/b.jpg", 0o600)):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS
    # the name is reserved in the root
    with pytest.raises(OSError) as err:
        (root / ".snapshots").mkdir()
    assert err.value.errno == errno.EEXIST
    # a deleted file comes back with cp from a path
    shutil.copy2(root / ".snapshots/s2/trip-2024/a.jpg", root / "trip-2024/a.jpg")
    assert (root / "trip-2024/a.jpg").read_bytes() == b"A" * 300_000
    m.unmount()

    # after a remount with an empty cache, and after --gc --grace 0
    run_cli(["--gc", "--grace", "0", "--storage", storage.url,
             *(["--endpoint-url", storage.endpoint_url] if storage.endpoint_url else [])],
            m.env)
    m2 = mounter(storage.url, endpoint_url=storage.endpoint_url, cache_dir=tmp_path / "empty")
    for name, state in states.items():
        assert file_tree(m2.path / ".snapshots" / name) == state
    rows = json.loads(run_cli(["--snapshots", str(m2.path), "--json"], m2.env).stdout)
    assert [r["name"] for r in rows] == ["s1", "s2"]
    by_name = {r["name"]: r for r in rows}
    # s2 differs from now by nothing (a.jpg was copied back); s1 by b.jpg, c.jpg, a.jpg's
    # folder's move does not count (same folder), b.jpg's two versions count once
    assert by_name["s2"]["files"] == 0
    assert by_name["s1"]["files"] == 2
    os.rmdir(m2.path / ".snapshots" / "s1")
    assert os.listdir(m2.path / ".snapshots") == ["s2"]
    out = run_cli(["--snapshots", str(m2.path)], m2.env).stdout
    assert "s2" in out and "s1" not in out


def test_bad_and_taken_names_are_refused_in_one_line(tmp_path: Path, mounter: Mounter) -> None:
    m = mounter(f"file://{tmp_path}/repo")
    assert m.status()["auto_snapshots"] == "hourly=24,daily=30,monthly=12"
    (m.path / "f").write_bytes(b"1")
    bad = run_cli(["--snapshot", str(m.path), "../x"], m.env, check=False)
    assert bad.returncode != 0 and "bad snapshot name" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    snapshot(m, "one")
    taken = run_cli(["--snapshot", str(m.path), "one"], m.env, check=False)
    assert taken.returncode != 0 and "exists already" in taken.stderr
    assert len(taken.stderr.strip().splitlines()) == 1
    default = run_cli(["--snapshot", str(m.path)], m.env).stdout
    assert "snapshot 20" in default
    auto = run_cli(["--snapshot", str(m.path), "auto-2026-01-01T0000Z"], m.env, check=False)
    assert auto.returncode != 0 and "automatic snapshots" in auto.stderr


def test_a_folder_named_snapshots_from_before_can_be_renamed_out_of_the_way(
        tmp_path: Path, mounter: Mounter) -> None:
    import trio

    from .coreutil import EngineDriver, running_engine
    url = f"file://{tmp_path}/repo"

    async def before() -> None:  # a repository that already has it (no FUSE rules then)
        async with running_engine(url, None, tmp_path / "old-cache") as eng:
            await EngineDriver(eng).mkdir(".snapshots")
            await EngineDriver(eng).create(".snapshots/mine.txt", b"mine")
            await eng.uploader.wait_idle()

    trio.run(before)
    m = mounter(url)
    assert os.listdir(m.path) == []
    assert os.listdir(m.path / ".snapshots") == []  # the snapshots (none yet) shadow it
    os.rename(m.path / ".snapshots", m.path / "old-snapshots")
    assert (m.path / "old-snapshots" / "mine.txt").read_bytes() == b"mine"
    assert os.listdir(m.path) == ["old-snapshots"]
    with pytest.raises(OSError) as err:
        os.rename(m.path / ".snapshots", m.path / "again")
    assert err.value.errno == errno.EROFS
    assert any("holds a folder named .snapshots" in line
               for line in m.unexpected_log_lines())
