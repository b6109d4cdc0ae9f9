"""Helpers for mount tests: comparing directory trees (a mount against a plain folder, or
against itself later), and renameat2.

`snapshot(root)` walks a tree with byte paths (non-UTF-8 names included) and records, per
path: the type, the permission bits, the size and a hash of the content of files, and the
target of symlinks. Two snapshots are equal when the trees hold the same names, types,
modes and bytes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
from pathlib import Path

RENAME_NOREPLACE = 1  # renameat2 flag
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: bytes | str | Path, dst: bytes | str | Path, flags: int) -> None:
    """rename(2) with flags (glibc's renameat2), raising OSError like os.rename."""
    at_fdcwd = -100
    if _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src))


def file_digest(path: bytes | str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: bytes | str | Path, *, mtimes: bool = False) -> dict[bytes, tuple]:
    """{relative byte path: (kind, mode, size, sha256 | target[, mtime_ns])}"""
    base = os.fsencode(root)
    out: dict[bytes, tuple] = {}

    def walk(rel: bytes) -> None:
        here = os.path.join(base, rel) if rel else base
        for name in sorted(os.listdir(here)):
            path = os.path.join(here, name)
            relpath = os.path.join(rel, name) if rel else name
            st = os.lstat(path)
            extra = (st.st_mtime_ns,) if mtimes else ()
            if stat.S_ISLNK(st.st_mode):
                out[relpath] = ("link", None, None, os.readlink(path), *extra)
            elif stat.S_ISDIR(st.st_mode):
                out[relpath] = ("dir", stat.S_IMODE(st.st_mode), None, None, *extra)
                walk(relpath)
            elif stat.S_ISREG(st.st_mode):
                out[relpath] = ("file", stat.S_IMODE(st.st_mode), st.st_size,
                                file_digest(path), *extra)
            else:
                out[relpath] = ("other", stat.S_IMODE(st.st_mode), None, None, *extra)

    walk(b"")
    return out


def diff(expected: dict[bytes, tuple], actual: dict[bytes, tuple], limit: int = 20) -> str:
    """A readable description of how two snapshots differ ('' when equal)."""
    lines = []
    for path in sorted(expected.keys() | actual.keys()):
        a, b = expected.get(path), actual.get(path)
        if a != b:
            lines.append(f"  {path!r}: expected {a}, got {b}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... and {len(lines) - limit} more"]
    return "\n".join(lines)


def assert_same_tree(expected: dict[bytes, tuple], actual: dict[bytes, tuple],
                     what: str = "") -> None:
    text = diff(expected, actual)
    assert not text, f"trees differ{' (' + what + ')' if what else ''}:\n{text}"
