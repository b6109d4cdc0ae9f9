"""A folder's view loaded while the uploader commits that folder (core, no FUSE).

Found by the model (tests/test_model_stateful.py, a remount from the local state, then its
tree walk): a fresh engine's uploader commits the ops the last run left at once, while the
first listing loads the folders' views. A view that read the folder's cached manifest
before the commit and applied the journal's ops after it (the commit retired them) showed
neither: a folder made before the remount was missing until the view was revalidated.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from fsrepo.engine import Engine
from fsrepo.inodes import ROOT_INO

from .coreutil import makedirs, running_engine


def commit_after_reading(engine: Engine, dir_id: str) -> Callable[..., Any]:
    """The database's `run`, but the first read of the folder's cached manifest is followed
    by the uploader's commit of the folder's pending ops, before the reader resumes (as the
    scheduler may order them)."""
    run = engine.db.run
    state = engine.db.state
    landed: list[int] = []

    async def racing_run(fn: Callable[..., Any], *args: Any) -> Any:
        result = await run(fn, *args)
        if fn == state.load_manifest and args[0] == dir_id and not landed:
            batch = list(engine.journal.by_dir[dir_id])
            landed.append(len(batch))
            await engine.uploader.manifests.commit(dir_id, batch)
        return result

    racing_run.landed = landed  # type: ignore[attr-defined]
    return racing_run


def test_a_view_loaded_while_its_folder_is_committed_keeps_the_committed_names(
        tmp_path: Path) -> None:
    trio.run(_a_view_loaded_while_its_folder_is_committed, tmp_path)


async def _a_view_loaded_while_its_folder_is_committed(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/repository"
    async with running_engine(url, None, tmp_path / "cache", upload=False) as first:
        await makedirs(first, b"b/a")  # journaled, not committed: the next run commits it
    async with running_engine(url, None, tmp_path / "cache", upload=False) as engine:
        root = await engine.ns.views.load(engine.ns.node(ROOT_INO).dir_id or "root")
        folder = root.entries[b"b"]
        assert hasattr(folder, "id")
        racing = commit_after_reading(engine, folder.id)
        engine.db.run = racing  # type: ignore[method-assign]
        view = await engine.ns.views.load(folder.id)
        assert racing.landed == [1]  # type: ignore[attr-defined]  # (the race happened)
        assert folder.id not in engine.journal.by_dir  # (its op is in the manifest now)
        assert b"a" in view.entries
    async with running_engine(url, None, tmp_path / "cache", upload=False) as later:
        node = await makedirs(later, b"b")
        assert b"a" in dict(await later.ns.listing(node.ino))
