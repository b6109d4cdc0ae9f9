"""A Hypothesis stateful reference model of the filesystem, driving the engine without FUSE.

Each step applies one operation to both the engine (through `EngineDriver`, the calls the
FUSE layer makes) and an in-memory model of the tree, and compares: the same errno (ENOENT,
EEXIST, ENOTEMPTY, ENOTDIR, EISDIR, EINVAL) or success on both, then the same tree (names,
types, content, modes, symlink targets, and modification times where the model knows them).
Besides the operations (create, write at an offset, truncate, rename, unlink, mkdir, rmdir,
symlink, chmod, utimens), the machine remounts from the local state (no drain: the journal
carries over), remounts from an empty cache (after draining: everything comes from the
bucket), and opens a second engine on the same store that must see the same tree and whose
change the first engine must see after revalidating.

Paths are drawn from three names at up to three levels, so that operations meet existing
names, missing parents and files in the way as often as they succeed. Symlinks are never
followed (the kernel resolves them before the filesystem sees a path): a path through one
is ENOTDIR, and writes, truncates and chmods aimed at one are left out.

Runs on file:// and S3 (moto). Budget: the "ci" Hypothesis profile (tests/conftest.py);
HYPOTHESIS_PROFILE=long soaks for much longer. A failure prints the shrunk sequence of steps;
a failed tree check also prints the steps of its example (a failure that depends on timing
is not replayed, and Hypothesis then prints none). IMGREPO_MODEL_STRESS=1 runs a variant
with folders' mkdir, rmdir and rename three times as likely and a remount possible at every
step (it found the view loaded while its folder was committed, in a few seeds out of ten).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from fsrepo.announce import Invalidator
from fsrepo.engine import Engine
from fsrepo.errors import FsError
from fsrepo.inodes import ROOT_INO
from fsrepo.manifest import DirEntry, FileEntry, SymlinkEntry
from testservers.moto import MotoServer

from .engine_thread import EngineThread

NAMES = (b"a", b"b", b"c")
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(b"/".join)
contents = st.binary(max_size=300) | st.binary(min_size=1, max_size=8).map(lambda b: b * 4000)
offsets = st.integers(0, 5000)
modes = st.sampled_from([0o600, 0o640, 0o644, 0o700, 0o750, 0o755, 0o444])
mtimes = st.integers(1_000_000_000, 2_000_000_000).map(lambda s: s * 1_000_000_000 + 7)
# Remounts and second engines cost ~10 ordinary steps: each is drawn with a number and runs
# only when it is 0 (1 time in HEAVY_ODDS), so that they stay rare in generated runs while
# the shrinker, which moves the number to 0, can still keep or drop any one of them.
HEAVY_ODDS = 5
heavy = st.integers(0, HEAVY_ODDS - 1)


# -- the model -----------------------------------------------------------------------------
@dataclass
class MFile:
    data: bytes = b""
    mode: int = 0o644
    mtime: int | None = None  # None: set by the engine's clock, not compared


@dataclass
class MDir:
    mode: int = 0o755
    mtime: int | None = None


@dataclass
class MLink:
    target: bytes = b""
    mtime: int | None = None


@dataclass
class Model:
    """The tree as a POSIX filesystem would hold it: full path -> node (root implicit)."""

    nodes: dict[bytes, MFile | MDir | MLink] = field(default_factory=dict)

    def parent_error(self, path: bytes) -> int:
        """The errno of walking to `path`'s parent, or 0."""
        parts = path.split(b"/")
        for i in range(1, len(parts)):
            node = self.nodes.get(b"/".join(parts[:i]))
            if node is None:
                return errno.ENOENT
            if not isinstance(node, MDir):
                return errno.ENOTDIR
        return 0

    def lookup_error(self, path: bytes) -> int:
        return self.parent_error(path) or (0 if path in self.nodes else errno.ENOENT)

    def names_changed(self, *paths: bytes) -> None:
        """Names were created, removed or renamed: their directories' mtime is the
        engine's clock now (not compared)."""
        for path in paths:
            parent = self.nodes.get(path.rpartition(b"/")[0])
            if isinstance(parent, MDir):
                parent.mtime = None

    def children(self, path: bytes) -> list[bytes]:
        return [p for p in self.nodes if p.startswith(path + b"/")]

    def move(self, old: bytes, new: bytes) -> None:
        for p in [new, *self.children(new)]:
            self.nodes.pop(p, None)
        for p in [old, *self.children(old)]:
            self.nodes[new + p[len(old):]] = self.nodes.pop(p)

    def rename_error(self, old: bytes, new: bytes) -> int:
        """Linux's order: parents, source exists, the two trap checks, then the types."""
        err = self.parent_error(old) or self.parent_error(new) or self.lookup_error(old)
        if err:
            return err
        if new.startswith(old + b"/"):
            return errno.EINVAL
        if old.startswith(new + b"/"):
            return errno.ENOTEMPTY
        if old == new:
            return 0
        src, dst = self.nodes[old], self.nodes.get(new)
        if dst is None:
            return 0
        if isinstance(dst, MDir):
            if not isinstance(src, MDir):
                return errno.EISDIR
            return errno.ENOTEMPTY if self.children(new) else 0
        return errno.ENOTDIR if isinstance(src, MDir) else 0


def written(data: bytes, offset: int, new: bytes) -> bytes:
    """pwrite: a gap before `offset` reads as zeros; writing nothing changes nothing."""
    if not new:
        return data
    return data[:offset].ljust(offset, b"\0") + new + data[offset + len(new):]


# -- reading the engine's tree ---------------------------------------------------------------
Snapshot = dict[bytes, tuple[Any, ...]]


async def engine_tree(eng: EngineThread, read: bool) -> Snapshot:
    """Every name under the root: (kind, mode, content or its hash, mtime); with `read`,
    files are read back byte for byte (otherwise their entry's hash stands for them)."""
    assert eng.driver is not None
    driver = eng.driver
    out: Snapshot = {}

    async def walk(path: bytes) -> None:
        for name, entry in sorted((await driver.listdir(path)).items()):
            full = path + b"/" + name if path else name
            if isinstance(entry, DirEntry):
                node, _ = await driver.node(full)  # its mtime as stat shows it
                shown = driver.engine.ns.dir_stat((await driver.engine.files.stat(node.ino))[1])
                assert shown is not None
                out[full] = ("dir", entry.mode, None, shown.mtime_ns)
                await walk(full)
            elif isinstance(entry, FileEntry):
                unnamed = False
                commits = driver.engine.files.commits
                if commits.closed or commits.sealed:  # closed, not named yet: as stat shows
                    node, _ = await driver.node(full)
                    # (or being named in the background: its entry is not recorded yet)
                    unnamed = commits.is_closed(node.ino) or node.ino in commits.sealed
                    if unnamed:
                        shown = driver.engine.files.overlay(node, entry)
                        assert isinstance(shown, FileEntry)
                        entry = shown
                content = hashlib.sha256(await driver.read(full)).hexdigest() \
                    if read or unnamed else entry.sha256
                out[full] = ("file", entry.mode, (content, entry.size), entry.mtime_ns)
            else:
                assert isinstance(entry, SymlinkEntry)
                out[full] = ("symlink", None, entry.target, entry.mtime_ns)

    await walk(b"")
    return out


class ForgettingKernel(Invalidator):
    """The kernel's side of an entry invalidation: a file nothing holds open is forgotten."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def entry(self, parent_ino: int, name: bytes) -> None:
        ns = self.engine.ns
        node = ns.inodes.of_name(parent_ino, name)
        if node is not None and node.lookups > 0:
            ns.forget(node.ino, node.lookups)


def assert_kept_views_with_pending_ops(engine: Engine, loaded: set[str]) -> None:
    """No view that was loaded and has pending ops left memory. (A folder with pending ops
    whose view was never loaded is no eviction: after a restart, a folder removed before it
    keeps its own ops until the removal's commit retires them, and nothing loads its view,
    as nothing lists it.)"""
    for dir_id in list(engine.journal.by_dir):
        if engine.journal.ops_for(dir_id) and dir_id in loaded:
            assert engine.ns.views.get(dir_id) is not None, "evicted a view with pending ops"


async def shed_everything(engine: Engine) -> None:
    """What a walk past the mount's cap of kernel inodes does (Namespace.shed), with a cap
    of one: the kernel forgets every file of every folder but the last loaded; what stays
    in memory is what something needs."""
    ns = engine.ns
    loaded = set(ns.views)
    saved = ns.invalidator, ns.kernel_files
    ns.invalidator, ns.kernel_files = ForgettingKernel(engine), 1
    try:
        await ns.shed()
    finally:
        ns.invalidator, ns.kernel_files = saved
    views = ns.views
    for node in list(ns.inodes.nodes.values()):
        if node.ino != ROOT_INO and node.parent != 0:
            parent = ns.inodes.get(node.parent)
            assert parent is not None and parent.dir_id is not None
            assert views.get(parent.dir_id) is not None, "evicted a view an inode needs"
    assert_kept_views_with_pending_ops(engine, loaded)


async def release_when_idle(engine: Engine) -> None:
    """What an idle mount does (Namespace.release_when_idle): the kernel is asked to forget
    the files it caches, and every view nothing needs leaves memory, the last loaded too. What
    stays is what something needs; a directory with pending ops keeps its view."""
    views = engine.ns.views
    loaded = set(views)
    await engine.ns.forget_files()
    kept, views.recent_kept = views.recent_kept, 0
    try:
        views.trim(0)
    finally:
        views.recent_kept = kept
    engine.ns.inodes.compact()
    views.compact()
    engine.ns.prefetcher.forget_found()
    for dir_id in views:
        view = views.get(dir_id)
        assert view is not None and (not view.remote or not views.evictable(dir_id))
    assert_kept_views_with_pending_ops(engine, loaded)


def model_tree(model: Model) -> Snapshot:
    out: Snapshot = {}
    for path, node in sorted(model.nodes.items()):
        if isinstance(node, MDir):
            out[path] = ("dir", node.mode, None, node.mtime)
        elif isinstance(node, MFile):
            out[path] = ("file", node.mode,
                         (hashlib.sha256(node.data).hexdigest(), len(node.data)), node.mtime)
        else:
            out[path] = ("symlink", None, node.target, node.mtime)
    return out


def comparable(engine: Snapshot, model: Snapshot) -> Snapshot:
    """The engine's snapshot with the mtimes the model does not know blanked out."""
    return {p: v[:3] + ((v[3] if model.get(p, (None,) * 4)[3] is not None else None),)
            for p, v in engine.items()}


# -- the machine ----------------------------------------------------------------------------
@dataclass
class Target:
    """Where a run's repository lives: a fresh folder or bucket per Hypothesis example."""

    new_repository: Callable[[Path], tuple[str, str | None]]
    drop_repository: Callable[[str], None] = lambda url: None
    operations: int = 0  # operations run on the engine, over all examples


class EngineModel(RuleBasedStateMachine):
    target: Target  # set on the subclass made for each backend

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="imgrepo-model-"))
        self.url, self.endpoint = self.target.new_repository(self.tmp)
        self.caches = 0
        # The steps taken, shown with a failed check: a failure that depends on timing is
        # not replayed by Hypothesis (then it prints no steps), and this trail is all it left.
        self.trail: list[str] = []
        self.model = Model()
        self.cache = self._new_cache()
        self.engine = self._open()

    def _new_cache(self) -> Path:
        self.caches += 1
        return self.tmp / f"cache{self.caches}"

    def _open(self) -> EngineThread:
        """The engine on `self.cache` (the main engine's local state)."""
        return EngineThread(self.url, self.endpoint, self.cache)

    def teardown(self) -> None:
        try:
            self.engine.close()
        finally:
            self.target.drop_repository(self.url)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _both(self, expected: int, fn: Callable[..., Awaitable[Any]], *args: Any,
              apply: Callable[[], None] | None = None, names: tuple[bytes, ...] = ()) -> None:
        """Run one operation on the engine; it must fail with `expected` (0: succeed).
        `names`: the paths whose names it creates, removes or renames."""
        self.target.operations += 1
        try:
            self.engine.call(fn, *args)
            got = 0
        except FsError as exc:
            got = exc.errno
        shown = ", ".join(f"<{len(a)} bytes>" if isinstance(a, bytes) and len(a) > 40
                          else repr(a) for a in args)
        self.trail.append(f"{getattr(fn, '__name__', fn)}({shown}) -> {got}")
        assert got == expected, (f"{getattr(fn, '__name__', fn)}{args!r}: engine says "
                                 f"{errno.errorcode.get(got, got)}, POSIX says "
                                 f"{errno.errorcode.get(expected, expected)}")
        if got == 0 and apply is not None:
            apply()
        if got == 0:
            self.model.names_changed(*names)

    def _node(self, path: bytes) -> MFile | MDir | MLink | None:
        return None if self.model.lookup_error(path) else self.model.nodes[path]

    @property
    def fs(self) -> Any:
        assert self.engine.driver is not None
        return self.engine.driver

    # -- operations ------------------------------------------------------------------------
    @rule(path=paths, data=contents)
    def create(self, path: bytes, data: bytes) -> None:
        err = self.model.parent_error(path) or (errno.EEXIST if path in self.model.nodes else 0)
        self._both(err, self.fs.create, path, data,
                   apply=lambda: self.model.nodes.__setitem__(path, MFile(data)), names=(path,))

    @rule(path=paths, offset=offsets, data=contents)
    def write_at(self, path: bytes, offset: int, data: bytes) -> None:
        node = self._node(path)
        if isinstance(node, MLink):
            return
        err = self.model.lookup_error(path) or (errno.EISDIR if isinstance(node, MDir) else 0)

        def apply() -> None:
            assert isinstance(node, MFile)
            node.data, node.mtime = written(node.data, offset, data), None
        self._both(err, self.fs.write_at, path, offset, data, apply=apply)

    @rule(path=paths, size=offsets)
    def truncate(self, path: bytes, size: int) -> None:
        node = self._node(path)
        if isinstance(node, MLink):
            return
        err = self.model.lookup_error(path) or (errno.EISDIR if isinstance(node, MDir) else 0)

        def apply() -> None:
            assert isinstance(node, MFile)
            node.data, node.mtime = node.data[:size].ljust(size, b"\0"), None
        self._both(err, self.fs.truncate, path, size, apply=apply)

    @rule(old=paths, new=paths)
    def rename(self, old: bytes, new: bytes) -> None:
        def apply() -> None:
            if old != new:
                self.model.move(old, new)
        self._both(self.model.rename_error(old, new), self.fs.rename, old, new, apply=apply,
                   names=(old, new) if old != new else ())

    @rule(path=paths)
    def unlink(self, path: bytes) -> None:
        err = self.model.lookup_error(path) or \
            (errno.EISDIR if isinstance(self.model.nodes[path], MDir) else 0)
        self._both(err, self.fs.unlink, path, apply=lambda: self.model.nodes.pop(path),
                   names=(path,))

    @rule(path=paths, mode=modes)
    def mkdir(self, path: bytes, mode: int) -> None:
        err = self.model.parent_error(path) or (errno.EEXIST if path in self.model.nodes else 0)
        self._both(err, self.fs.mkdir, path, mode,
                   apply=lambda: self.model.nodes.__setitem__(path, MDir(mode)), names=(path,))

    @rule(path=paths)
    def rmdir(self, path: bytes) -> None:
        err = self.model.lookup_error(path)
        if not err and not isinstance(self.model.nodes[path], MDir):
            err = errno.ENOTDIR
        if not err and self.model.children(path):
            err = errno.ENOTEMPTY
        self._both(err, self.fs.rmdir, path, apply=lambda: self.model.nodes.pop(path),
                   names=(path,))

    @rule(path=paths, link=st.sampled_from([b"a", b"../b", b"/etc/hostname", b"c/a" * 20]))
    def symlink(self, path: bytes, link: bytes) -> None:
        err = self.model.parent_error(path) or (errno.EEXIST if path in self.model.nodes else 0)
        self._both(err, self.fs.symlink, path, link,
                   apply=lambda: self.model.nodes.__setitem__(path, MLink(link)), names=(path,))

    @rule(path=paths, mode=modes)
    def chmod(self, path: bytes, mode: int) -> None:
        node = self._node(path)
        if isinstance(node, MLink):
            return

        def apply() -> None:
            assert isinstance(node, MFile | MDir)
            node.mode = mode
        self._both(self.model.lookup_error(path), self.fs.setattr, path, mode, None,
                   apply=apply)

    @rule(path=paths, mtime=mtimes)
    def utimens(self, path: bytes, mtime: int) -> None:
        node = self._node(path)

        def apply() -> None:
            assert node is not None
            node.mtime = mtime
        self._both(self.model.lookup_error(path), self.fs.setattr, path, None, mtime,
                   apply=apply)

    # -- remounts and a second machine ---------------------------------------------------------
    def _check(self, eng: EngineThread, read: bool) -> None:
        want = model_tree(self.model)
        got = eng.call(engine_tree, eng, read)
        assert comparable(got, want) == want, "steps:\n" + "\n".join(self.trail)

    @rule(skip=heavy)
    def remount_from_local_state(self, skip: int) -> None:
        if skip:
            return
        self.trail.append("remount_from_local_state")
        self.engine.close()
        self.engine = self._open()
        self._check(self.engine, read=True)

    @rule(skip=heavy)
    def remount_from_an_empty_cache(self, skip: int) -> None:
        if skip:
            return
        self.trail.append("remount_from_an_empty_cache")
        self.engine.call(self.fs.drain)
        assert self.fs.journal_length() == 0
        self.engine.close()
        self.cache = self._new_cache()
        self.engine = self._open()
        self._check(self.engine, read=True)

    @rule(skip=heavy, data=contents)
    def a_second_engine_on_the_same_store(self, skip: int, data: bytes) -> None:
        """It sees the same tree once the first has drained; the file it adds, the first
        sees after revalidating."""
        if skip:
            return
        self.trail.append("a_second_engine_on_the_same_store")
        self.engine.call(self.fs.drain)
        with EngineThread(self.url, self.endpoint, self._new_cache()) as other:
            self._check(other, read=True)
            free = [n for n in NAMES if n not in self.model.nodes]
            if free:
                assert other.driver is not None
                other.call(other.driver.create, free[0], data)
                other.call(other.driver.drain)
                self.model.nodes[free[0]] = MFile(data)
        self.engine.call(self.fs.revalidate)
        self._check(self.engine, read=False)

    @rule()
    def idle_release(self) -> None:
        self.trail.append("idle_release")
        self._with_steps(release_when_idle)

    @rule()
    def kernel_cap_shed(self) -> None:
        self.trail.append("kernel_cap_shed")
        self._with_steps(shed_everything)

    def _with_steps(self, check: Callable[[Engine], Awaitable[None]]) -> None:
        """Run a memory check; its failure shows the example's steps (as `_check`'s)."""
        try:
            self.engine.call(check, self.fs.engine)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nsteps:\n" + "\n".join(self.trail)) from None

    @invariant()
    def the_engine_holds_the_model_tree(self) -> None:
        self._check(self.engine, read=False)


class StressedEngineModel(EngineModel):
    """IMGREPO_MODEL_STRESS=1: the same machine with folders' mkdir, rmdir and rename drawn
    three times as often and a remount from the local state possible at every step, to
    push the odds of an interleaving between a folder's ops and the background naming of
    the files closed in it (the rules are drawn uniformly: a second rule doubles the odds)."""

    @rule(path=paths, mode=modes)
    def mkdir_again(self, path: bytes, mode: int) -> None:
        self.mkdir(path, mode)

    @rule(path=paths, mode=modes)
    def mkdir_once_more(self, path: bytes, mode: int) -> None:
        self.mkdir(path, mode)

    @rule(path=paths)
    def rmdir_again(self, path: bytes) -> None:
        self.rmdir(path)

    @rule(path=paths)
    def rmdir_once_more(self, path: bytes) -> None:
        self.rmdir(path)

    @rule(old=paths, new=paths)
    def rename_again(self, old: bytes, new: bytes) -> None:
        self.rename(old, new)

    @rule(old=paths, new=paths)
    def rename_once_more(self, old: bytes, new: bytes) -> None:
        self.rename(old, new)

    @rule()
    def remount_from_local_state_now(self) -> None:
        self.remount_from_local_state(0)


# -- running it on both backends --------------------------------------------------------------
def _local_target() -> Target:
    return Target(lambda tmp: (f"file://{tmp}/repository", None))


def _s3_target(server: MotoServer) -> Target:
    def new(tmp: Path) -> tuple[str, str | None]:
        bucket = "imgrepo-model-" + secrets.token_hex(6)
        server.create_bucket(bucket)
        return f"s3://{bucket}/repo", server.url

    def drop(url: str) -> None:
        try:
            server.delete_bucket(url[len("s3://"):].split("/")[0])
        except Exception:  # noqa: BLE001 - cleanup must not mask the example's outcome
            pass

    return Target(new, drop)


OPERATIONS_PER_BACKEND = 1000


@pytest.mark.timeout(900)  # a failure's shrinking replays many slow examples
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_the_engine_behaves_like_the_model(backend: str, request: pytest.FixtureRequest) -> None:
    target = _local_target() if backend == "file" else \
        _s3_target(request.getfixturevalue("moto_server"))
    base = StressedEngineModel if os.environ.get("IMGREPO_MODEL_STRESS") else EngineModel
    machine = type(f"EngineModel_{backend}", (base,), {"target": target})
    # The budget is operations, not examples: other steps are remounts and skipped heavy
    # steps, and Hypothesis ends some examples early. Each backend runs until it has made
    # OPERATIONS_PER_BACKEND operations (2,000 across both in every CI run), a few runs at
    # most; HYPOTHESIS_PROFILE=long soaks far beyond.
    for _ in range(4):
        run_state_machine_as_test(machine, settings=settings())
        if target.operations >= OPERATIONS_PER_BACKEND:
            break
    print(f"{backend}: {target.operations} operations")
    assert target.operations >= OPERATIONS_PER_BACKEND, target.operations


def test_a_zero_length_write_past_the_end_changes_nothing(tmp_path: Path) -> None:
    """Found by the model: the size had become the offset while the content stayed."""
    with EngineThread(f"file://{tmp_path}/repo", None, tmp_path / "cache") as eng:
        assert eng.driver is not None
        eng.call(eng.driver.create, b"b", b"1234567")
        eng.call(eng.driver.write_at, b"b", 216, b"")
        eng.call(eng.driver.engine.files.name_closed)  # its entry holds its content then
        entry = eng.call(eng.driver.listdir, b"")[b"b"]
        assert eng.call(eng.driver.read, b"b") == b"1234567"
        assert entry.size == 7
