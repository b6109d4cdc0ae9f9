"""Change records without FUSE (fsrepo/heads.py, head_writer.py, head_watcher.py): what a
writer publishes, what a watcher marks stale from it, and what survives a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from fsrepo.head_watcher import HeadWatcher
from fsrepo.head_writer import HeadWriter
from fsrepo.heads import TOUCH_KEY, HeadError, head_key, parse_head
from fsrepo.repository import DESCRIPTOR_KEY, FORMAT_VERSION, open_repository
from fsrepo.state import LocalState, StateDB
from fsrepo.store.local import LocalStore


class RecordingViews:
    """What the watcher asks of the directory views, recorded (nothing is loaded)."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        self.marks: list[set[str] | None] = []

    async def mark_stale(self, dir_ids: set[str] | None) -> None:
        await self.db.run(self.db.state.mark_stale, dir_ids)
        self.marks.append(None if dir_ids is None else set(dir_ids))

    def marked(self) -> list[str]:
        return []

    def __iter__(self):  # noqa: ANN204
        return iter(())


class Machine:
    """One local state dir: its writer and its watcher, over a shared store."""

    def __init__(self, root: Path, store: LocalStore, keep: int = 4096) -> None:
        self.db = StateDB(LocalState(root / "state.db"))
        self.writer = HeadWriter(store, self.db, host=root.name, keep=keep)
        self.views = RecordingViews(self.db)
        self.watcher = HeadWatcher(store, self.db, self.views, 1.0,  # type: ignore[arg-type]
                                   legacy=False)

    async def commit(self, *dir_ids: str) -> None:
        """What a manifest commit records locally (the manifest PUT itself is not needed)."""
        for dir_id in dir_ids:
            await self.db.run(self.db.state.commit_dir, dir_id, f"etag-{dir_id}", b"{}", [])

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bucket")


@pytest.fixture
def machines(tmp_path: Path, store: LocalStore):  # noqa: ANN201
    made: list[Machine] = []

    def make(name: str, keep: int = 4096) -> Machine:
        m = Machine(tmp_path / name, store, keep)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()


def test_a_watcher_marks_what_another_writer_changed_since_it_last_looked(machines, store):
    async def main():
        a, b = machines("a"), machines("b")
        await a.commit("d1", "d2")
        await a.writer.publish()
        await b.watcher.poll()
        assert b.views.marks == [{"d1", "d2"}]
        await b.watcher.poll()  # nothing new: the touch object answers 304
        assert b.views.marks == [{"d1", "d2"}]
        await a.commit("d3")
        await a.writer.publish()
        await b.watcher.poll()
        assert b.views.marks[-1] == {"d3"}
        head = parse_head((await store.get(head_key(await a.db.run(a.db.state.writer_id))))
                          .data, "head")
        assert head.seq == 2 and dict((d, s) for s, d in head.changes) == \
            {"d1": 1, "d2": 1, "d3": 2}
    trio.run(main)


def test_the_watchers_own_head_is_ignored(machines):
    async def main():
        a = machines("a")
        await a.commit("d1")
        await a.writer.publish()
        await a.watcher.poll()
        assert a.views.marks == []
    trio.run(main)


def test_a_ring_that_no_longer_reaches_back_marks_everything_stale_once(machines):
    async def main():
        a, b = machines("a", keep=3), machines("b")
        await a.commit("d0")
        await a.writer.publish()
        await b.watcher.poll()
        assert b.views.marks == [{"d0"}]
        await b.db.run(b.db.state.save_manifest, "cached", "e", b"{}", 0.0)
        for i in range(1, 6):  # five rounds: the ring of 3 forgets rounds 1 and 2
            await a.commit(f"d{i}")
            await a.writer.publish()
        await b.watcher.poll()
        assert b.views.marks[-1] is None
        assert (await b.db.run(b.db.state.load_manifest, "cached"))[2] is True
        await a.commit("d9")
        await a.writer.publish()
        await b.watcher.poll()  # caught up: back to naming directories
        assert b.views.marks[-1] == {"d9"}
    trio.run(main)


def test_a_new_watcher_applies_a_complete_ring_without_falling_back(machines):
    async def main():
        a = machines("a", keep=10)
        for i in range(4):
            await a.commit(f"d{i}")
            await a.writer.publish()
        b = machines("b")
        await b.watcher.poll()
        assert b.views.marks == [{"d0", "d1", "d2", "d3"}]
    trio.run(main)


def test_a_crash_between_manifest_commit_and_head_write_is_announced_at_the_next_start(
        tmp_path, store, machines):
    async def main():
        a = Machine(tmp_path / "a", store)
        await a.commit("d1")  # the manifest commit is recorded, then the process dies
        assert await a.db.run(a.db.state.head_unpublished)
        a.close()
        again = Machine(tmp_path / "a", store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(again.writer.run, lambda: False)
            with trio.fail_after(10):
                while not again.writer.published:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert not await again.db.run(again.db.state.head_unpublished)
        b = machines("b")
        await b.watcher.poll()
        assert b.views.marks == [{"d1"}]
        again.close()
    trio.run(main)


def test_a_failed_head_write_is_numbered_again_not_lost(machines, store):
    async def main():
        a, b = machines("a"), machines("b")
        await a.commit("d1")
        await a.db.run(a.db.state.number_head_changes, 4096)  # numbered, PUT never made
        assert await a.db.run(a.db.state.head_unpublished)
        await a.commit("d2")
        await a.writer.publish()
        await b.watcher.poll()
        assert b.views.marks == [{"d1", "d2"}]
    trio.run(main)


def test_remount_keeps_what_it_saw(tmp_path, store, machines):
    async def main():
        a = machines("a")
        await a.commit("d1")
        await a.writer.publish()
        b = Machine(tmp_path / "b", store)
        await b.db.run(b.db.state.save_manifest, "d1", "e", b"{}", 0.0)
        await b.db.run(b.db.state.save_manifest, "other", "e", b"{}", 0.0)
        await b.watcher.poll()
        await b.db.run(b.db.state.manifest_checked, "d1", "e")
        b.close()
        await a.commit("d2")
        await a.writer.publish()
        again = Machine(tmp_path / "b", store)
        await again.watcher.poll()
        assert again.views.marks == [{"d2"}]  # not d1 again
        state = again.db.state
        assert [(await again.db.run(state.load_manifest, d))[2] for d in ("d1", "other")] \
            == [False, False]
        again.close()
    trio.run(main)


def test_damaged_heads_are_refused():
    with pytest.raises(HeadError):
        parse_head(b"{", "k")
    with pytest.raises(HeadError):
        parse_head(json.dumps({"writer": "w", "seq": 1, "changes": [[2, "d"]]}).encode(), "k")


def test_a_version_1_repository_is_upgraded_in_place(store):
    async def main():
        await store.put(DESCRIPTOR_KEY, json.dumps(
            {"format": "imgrepo", "version": 1, "hash": "sha256", "created": "",
             "repo_id": "r1"}).encode())
        read_only = await open_repository(store, create=False)
        assert read_only.version == 1
        desc = await open_repository(store, create=True)
        assert (desc.repo_id, desc.version) == ("r1", FORMAT_VERSION)
        raw = json.loads((await store.get(DESCRIPTOR_KEY)).data)
        assert raw["version"] == FORMAT_VERSION and raw["repo_id"] == "r1"
        assert not [i async for i in store.list("heads")]
        assert TOUCH_KEY not in [i.key async for i in store.list("")]
    trio.run(main)


@pytest.mark.expected_logs(r"not a readable change record",
                          reason="the damaged head is this test's input")
def test_a_damaged_head_falls_back_once_not_at_every_poll(machines, store):
    async def main():
        a, b = machines("a"), machines("b")
        await store.put(head_key("broken"), b"{not json")
        await a.commit("d1")
        await a.writer.publish()
        await b.watcher.poll()
        assert None in b.views.marks and {"d1"} in b.views.marks
        b.views.marks.clear()
        await a.commit("d2")
        await a.writer.publish()
        await b.watcher.poll()
        assert b.views.marks == [{"d2"}]
    trio.run(main)


@pytest.mark.expected_logs(r"still in format 1", reason="the old format is this test's input")
def test_a_format_1_repository_is_watched_the_old_way(tmp_path, store):
    async def main():
        await store.put(DESCRIPTOR_KEY, json.dumps(
            {"format": "imgrepo", "version": 1, "hash": "sha256", "created": "",
             "repo_id": "r1"}).encode())
        b = Machine(tmp_path / "b", store)
        b.watcher.legacy = None  # as a mount starts: read from the descriptor
        await b.watcher.poll()
        await b.watcher.poll()
        assert b.watcher.legacy is True and b.views.marks == [None, None]
        b.close()
        # A mount read the descriptor when it opened the repository: told, not asked again
        c = Machine(tmp_path / "c", store)
        c.watcher.legacy = None
        c.watcher.know_format(1)
        gets = []
        get = c.watcher.store.get
        c.watcher.store.get = lambda key, *a, **kw: (gets.append(key), get(key, *a, **kw))[1]
        await c.watcher.poll()
        assert c.watcher.legacy is True and c.views.marks == [None] and gets == []
        c.close()
    trio.run(main)
