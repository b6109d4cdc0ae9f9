"""Reference-model test: random operation sequences applied to the mount and to a plain
folder must leave identical trees, before and after a remount with an empty cache.

A seeded generator (the seed is in every failure message, so a failure replays exactly)
draws operations on a small pool of names, so that collisions, renames over existing
entries, non-empty rmdirs and writes into holes happen often: create, write at an offset,
append, truncate, rename (also RENAME_NOREPLACE), mkdir, rmdir, unlink, symlink, chmod,
and descriptors held open across all of these (written, truncated, read, closed later).
Each operation runs on both trees; both must succeed, or both fail with the same errno.
After every operation the two trees are compared (names, types, modes, sizes, contents,
symlink targets). Then the mount is unmounted the user's way, mounted again with an empty
cache (everything comes back from the bucket) and compared again; more sequences then
modify those remote-only files, and the comparison repeats after another fresh remount.

IMGREPO_MODEL_SEQUENCES / IMGREPO_MODEL_OPS / IMGREPO_MODEL_SEED make longer runs.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

from .treeutil import RENAME_NOREPLACE, assert_same_tree, renameat2, snapshot

SEQUENCES = int(os.environ.get("IMGREPO_MODEL_SEQUENCES", "4"))
OPS = int(os.environ.get("IMGREPO_MODEL_OPS", "40"))
SEED = int(os.environ.get("IMGREPO_MODEL_SEED", "20240611"))
NAMES = [b"a", b"b", b"c", b"d.txt", b"e\xff"]  # few names: collisions on purpose
FILE_MODES = [0o644, 0o600, 0o755, 0o640]
DIR_MODES = [0o755, 0o700, 0o750]

Op = tuple[str, Callable[[bytes], None]]


def _entries(top: bytes) -> list[bytes]:
    """Every path below `top` (relative, symlinks not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for name in dirnames + filenames:
            out.append(name if rel == b"." else os.path.join(rel, name))
    return sorted(out)


def _dirs(top: bytes) -> list[bytes]:
    return [b""] + [p for p in _entries(top)
                    if stat.S_ISDIR(os.lstat(os.path.join(top, p)).st_mode)]


def _data(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return b""
    if roll < 0.85:
        return rng.randbytes(rng.randrange(1, 20_000))
    return rng.randbytes(rng.randrange(200_000, 1_500_000))


class Held:
    """Descriptors kept open across other operations, one per tree, by slot number; the
    mount's and the plain folder's descriptors of a slot always name the same file."""

    def __init__(self) -> None:
        self.fds: dict[int, dict[bytes, int]] = {}

    def close_all(self) -> None:
        for fds in self.fds.values():
            for fd in fds.values():
                os.close(fd)
        self.fds.clear()


def next_op(rng: random.Random, ref: bytes, held: Held) -> Op:
    """One random operation, drawn from the reference tree's current state; returns a
    description and a function applying it under a given sequence root."""
    entries = _entries(ref)
    dirs = _dirs(ref)
    some = rng.choice(entries) if entries and rng.random() < 0.8 else \
        os.path.join(rng.choice(dirs), rng.choice(NAMES)).lstrip(b"/")
    new = os.path.join(rng.choice(dirs), rng.choice(NAMES)).lstrip(b"/")
    kind = rng.choices(
        ["create", "write", "append", "truncate", "rename", "noreplace", "mkdir", "rmdir",
         "unlink", "symlink", "chmod", "hold", "held"],
        weights=[14, 12, 4, 6, 10, 3, 8, 4, 5, 4, 4, 4, 10])[0]
    j = os.path.join
    if kind == "rmdir" and len(dirs) > 1 and rng.random() < 0.7:
        some = rng.choice(dirs[1:])
    if kind == "hold" or (kind == "held" and not held.fds):
        slot = max(held.fds, default=0) + 1
        flags = rng.choice([os.O_RDWR, os.O_RDWR | os.O_CREAT, os.O_RDONLY])
        path = rng.choice([some, new])

        def hold(root: bytes) -> None:
            fd = os.open(j(root, path), flags, 0o644)
            held.fds.setdefault(slot, {})[root] = fd
        return f"hold #{slot} = open({path!r}, {flags:#o})", hold
    if kind == "held":
        slot = rng.choice(sorted(held.fds))
        action = rng.choice(["write", "write", "truncate", "read", "close", "close"])
        data = _data(rng) or b"y"
        off = rng.randrange(0, 300_000)
        length = rng.randrange(0, 300_000)

        def use(root: bytes) -> None:
            fd = held.fds[slot].get(root)
            if fd is None:
                raise OSError(errno.EBADF, "not held")  # its open failed in both trees
            if action == "write":
                os.pwrite(fd, data, off)
            elif action == "truncate":
                os.ftruncate(fd, length)
            elif action == "read":
                content = os.pread(fd, 1 << 22, 0)
                size = os.fstat(fd).st_size
                reads[root] = (size, content)
                if len(reads) == 2:
                    a, b = reads.values()
                    assert a == b, f"held #{slot}: the mount and the folder read differently"
            else:
                del held.fds[slot][root]
                if not held.fds[slot]:
                    del held.fds[slot]
                os.close(fd)

        reads: dict[bytes, tuple[int, bytes]] = {}
        return f"held #{slot}: {action} (off {off}, {len(data)} bytes, len {length})", use

    if kind == "create":
        data = _data(rng)

        def create(root: bytes) -> None:
            with open(j(root, new), "wb") as fh:
                fh.write(data)
        return f"create {new!r} ({len(data)} bytes)", create
    if kind == "write":
        data = _data(rng) or b"x"
        try:
            size = os.stat(j(ref, some)).st_size
        except OSError:
            size = 0
        off = rng.randrange(0, size + 100_000)

        def write(root: bytes) -> None:
            fd = os.open(j(root, some), os.O_WRONLY)
            try:
                os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        return f"write {len(data)} bytes at {off} into {some!r}", write
    if kind == "append":
        data = _data(rng)

        def append(root: bytes) -> None:
            with open(j(root, some), "ab") as fh:
                fh.write(data)
        return f"append {len(data)} bytes to {some!r}", append
    if kind == "truncate":
        try:
            size = os.stat(j(ref, some)).st_size
        except OSError:
            size = 1000
        length = rng.choice([0, size // 2, size + rng.randrange(1, 300_000)])

        def truncate(root: bytes) -> None:
            os.truncate(j(root, some), length)
        return f"truncate {some!r} to {length}", truncate
    if kind in ("rename", "noreplace"):
        dst = rng.choice(entries) if entries and rng.random() < 0.4 else new
        if kind == "noreplace":
            return (f"renameat2({some!r}, {dst!r}, RENAME_NOREPLACE)",
                    lambda root: renameat2(j(root, some), j(root, dst), RENAME_NOREPLACE))
        return f"rename {some!r} -> {dst!r}", lambda root: os.rename(j(root, some), j(root, dst))
    if kind == "mkdir":
        mode = rng.choice(DIR_MODES)
        return f"mkdir {new!r} {mode:o}", lambda root: os.mkdir(j(root, new), mode)
    if kind == "rmdir":
        return f"rmdir {some!r}", lambda root: os.rmdir(j(root, some))
    if kind == "unlink":
        return f"unlink {some!r}", lambda root: os.unlink(j(root, some))
    if kind == "symlink":
        target = rng.choice([rng.choice(NAMES), b"../" + rng.choice(NAMES), b"nowhere",
                             some.split(b"/")[-1] if some else b"x"])
        return (f"symlink {new!r} -> {target!r}",
                lambda root: os.symlink(target, j(root, new)))
    mode = rng.choice(FILE_MODES + DIR_MODES)
    return f"chmod {some!r} {mode:o}", lambda root: os.chmod(j(root, some), mode)


def _outcome(fn: Callable[[bytes], None], root: bytes) -> int:
    try:
        fn(root)
    except OSError as exc:
        return exc.errno or -1
    return 0


def run_sequence(mount_root: Path, ref_root: Path, label: str, seed: str, ops: int) -> None:
    """Apply `ops` random operations under <root>/<label> of both trees, comparing after
    each one."""
    rng = random.Random(seed)
    mnt = os.path.join(os.fsencode(mount_root), label.encode())
    ref = os.path.join(os.fsencode(ref_root), label.encode())
    for root in (mnt, ref):
        os.makedirs(root, exist_ok=True)
    history: list[str] = []
    held = Held()
    try:
        for i in range(ops + 1):
            if i < ops:
                what, fn = next_op(rng, ref, held)
            else:
                what, fn = "close everything held", lambda root: None
                held.close_all()
            expected = _outcome(fn, ref)
            got = _outcome(fn, mnt)
            history.append(f"{i}: {what} -> {errno.errorcode.get(expected, expected)}")
            context = f"seed {seed!r}, {label}:\n  " + "\n  ".join(history[-15:])
            assert got == expected, (f"{what}: mount answered "
                                     f"{errno.errorcode.get(got, got)}, a plain folder "
                                     f"{errno.errorcode.get(expected, expected)}\n{context}")
            assert_same_tree(snapshot(ref), snapshot(mnt), context)
    finally:
        held.close_all()


def test_random_operations_match_a_plain_folder(storage, mounter, tmp_path: Path):
    ref = tmp_path / "reference"
    ref.mkdir()
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    for n in range(SEQUENCES):
        run_sequence(m.path, ref, f"seq{n}", f"{SEED}/{n}", OPS)
    expected = snapshot(ref)
    assert_same_tree(expected, snapshot(m.path), "before unmounting")
    m.unmount()

    m2 = mounter(storage.url, endpoint_url=storage.endpoint_url, cache_dir=tmp_path / "fresh1")
    assert_same_tree(expected, snapshot(m2.path), "remounted with an empty cache")
    # More operations on what is now remote-only: partial writes and truncates must first
    # bring the old content back from the bucket.
    for n in range(SEQUENCES // 2):
        run_sequence(m2.path, ref, f"seq{n}", f"{SEED}/again/{n}", OPS // 2)
    expected = snapshot(ref)
    m2.unmount()

    m3 = mounter(storage.url, endpoint_url=storage.endpoint_url, cache_dir=tmp_path / "fresh2")
    assert_same_tree(expected, snapshot(m3.path), "remounted again with an empty cache")
