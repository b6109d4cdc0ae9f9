"""The POSIX details a conformance suite checks, through a real FUSE mount: directory times
and link counts, over-long names, unlinked open files, fallocate, extended attributes,
oversized truncates, the cache figure of a sparse file, `.` and `..` in listings. SEMANTICS.md states each one.
Only the directory times travel through the bucket, so only they run on both backends;
the rest runs on file://, where it is cheapest.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from pathlib import Path

import pytest

from .mountutil import poll, run_cli

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def errno_of(fn, *args) -> int:  # noqa: ANN001
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) with a mode (os has only posix_fallocate): 0 or the errno."""
    rc = _libc.fallocate(ctypes.c_int(fd), ctypes.c_int(mode), ctypes.c_longlong(offset),
                         ctypes.c_longlong(length))
    return 0 if rc == 0 else ctypes.get_errno()


def repo_url(tmp_path: Path) -> str:
    return f"file://{tmp_path}/repository"


def test_directory_times_and_link_counts_follow_changes_to_names(storage, tmp_path: Path,
                                                                 mounter):
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    root = m.path
    (root / "d").mkdir()
    (root / "e").mkdir()
    d, e = root / "d", root / "e"

    def changes(action, *dirs: Path) -> None:  # noqa: ANN001
        before = {p: os.stat(p) for p in dirs}
        action()
        for p in dirs:
            after = os.stat(p)
            assert after.st_mtime_ns > before[p].st_mtime_ns, (p, action)
            assert after.st_ctime_ns == after.st_mtime_ns

    assert os.stat(d).st_nlink == 2
    changes(lambda: (d / "f").write_bytes(b"x"), d)
    changes(lambda: (d / "sub").mkdir(), d)
    assert os.stat(d).st_nlink == 3
    changes(lambda: os.symlink("f", d / "link"), d)
    changes(lambda: os.rename(d / "f", d / "g"), d)
    changes(lambda: os.rename(d / "g", e / "g"), d, e)
    changes(lambda: os.rename(d / "sub", e / "sub"), d, e)
    assert (os.stat(d).st_nlink, os.stat(e).st_nlink) == (2, 3)
    changes(lambda: os.unlink(d / "link"), d)
    changes(lambda: os.rmdir(e / "sub"), e)
    assert os.stat(e).st_nlink == 2
    assert errno_of(os.link, e / "g", e / "hard") == errno.EPERM  # declared
    # Writing into a file leaves its directory's times alone.
    before = os.stat(e)
    (e / "g").write_bytes(b"changed")
    assert os.stat(e).st_mtime_ns == before.st_mtime_ns
    # A time set after filling the directory (cp -a, rsync -a) stays.
    os.utime(e, ns=(10**18, 10**18))
    os.chmod(e, 0o700)
    assert os.stat(e).st_mtime_ns == 10**18
    assert os.stat(root).st_nlink == 4  # d and e

    # Another machine with an empty cache sees the same times.
    shown = {p.name: os.stat(p) for p in (d, e)}
    m.unmount()
    other = mounter(storage.url, endpoint_url=storage.endpoint_url,
                    cache_dir=tmp_path / "fresh")
    for name, st in shown.items():
        again = os.stat(other.path / name)
        assert (again.st_mtime_ns, again.st_ctime_ns, again.st_nlink) == \
            (st.st_mtime_ns, st.st_ctime_ns, st.st_nlink), name


def test_another_mount_sees_a_directorys_new_time(tmp_path: Path, mounter):
    a = mounter(repo_url(tmp_path), "--refresh", "1", name="alpha")
    b = mounter(repo_url(tmp_path), "--refresh", "1", name="beta")
    (a.path / "shared").mkdir()
    a.wait_idle()
    seen = poll(lambda: os.path.isdir(b.path / "shared") and os.stat(b.path / "shared"),
                what="the folder on the other mount")
    (a.path / "shared" / "new.jpg").write_bytes(b"photo")
    (a.path / "shared" / "album").mkdir()
    a.wait_idle()
    want = os.stat(a.path / "shared")
    assert want.st_mtime_ns > seen.st_mtime_ns
    poll(lambda: os.stat(b.path / "shared").st_mtime_ns == want.st_mtime_ns,
         what="the new time on the other mount")
    assert os.stat(b.path / "shared").st_nlink == 3


def test_names_over_255_bytes_answer_enametoolong(tmp_path: Path, mounter):
    m = mounter(repo_url(tmp_path))
    long = m.path / ("x" * 256)
    (m.path / "ok").write_bytes(b"")
    for fn, args in [(os.stat, (long,)), (os.chmod, (long, 0o600)), (os.unlink, (long,)),
                     (os.rmdir, (long,)), (os.open, (long, os.O_RDONLY)),
                     (os.open, (long, os.O_WRONLY | os.O_CREAT)), (os.mkdir, (long,)),
                     (os.rename, (long, m.path / "y")), (os.rename, (m.path / "ok", long))]:
        assert errno_of(fn, *args) == errno.ENAMETOOLONG, fn
    name = m.path / ("y" * 255)  # the longest name is fine
    name.write_bytes(b"ok")
    assert name.read_bytes() == b"ok"


def ls_ai(path: Path) -> list[tuple[int, str]]:
    """`ls -ai -U` (directory order, nothing filtered): (inode, name) per line."""
    out = subprocess.run(["ls", "-a", "-i", "-U", "-1", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return [(int(ino), name) for ino, name in (line.split(None, 1) for line in out.splitlines())]


def test_every_listing_starts_with_dot_and_dotdot(tmp_path: Path, mounter):
    m = mounter(repo_url(tmp_path))
    sub = m.path / "album"
    sub.mkdir()
    names = {f"p{i:04}.jpg" for i in range(700)}  # several readdir buffers: offsets resume
    for name in names:
        (sub / name).write_bytes(b"")
    (sub / "inner").mkdir()
    for folder, parent in ((sub, m.path), (sub / "inner", sub)):
        rows = ls_ai(folder)
        assert [name for _, name in rows[:2]] == [".", ".."]
        assert rows[0][0] == os.stat(folder).st_ino and rows[1][0] == os.stat(parent).st_ino
        listed = [name for _, name in rows[2:]]
        assert len(listed) == len(set(listed))
    assert {name for _, name in ls_ai(sub)[2:]} == names | {"inner"}
    assert [name for _, name in ls_ai(m.path)][:2] == [".", ".."]
    assert sorted(os.listdir(sub)) == sorted(names | {"inner"})  # not names of their own
    run_cli(["--snapshot", str(m.path), "s1"], m.env)
    snap = m.path / ".snapshots" / "s1" / "album"
    rows = ls_ai(snap)
    assert [name for _, name in rows[:2]] == [".", ".."]
    assert rows[0][0] == os.stat(snap).st_ino and rows[1][0] == os.stat(snap.parent).st_ino
    assert {name for _, name in rows[2:]} == names | {"inner"}


def test_an_open_unlinked_file_has_no_links(tmp_path: Path, mounter):
    m = mounter(repo_url(tmp_path))
    path = m.path / "f"
    path.write_bytes(b"data")
    with open(path, "rb") as fh:
        assert os.fstat(fh.fileno()).st_nlink == 1
        os.unlink(path)
        assert os.fstat(fh.fileno()).st_nlink == 0
        assert fh.read() == b"data"
    fd = os.open(m.path / "g", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"new")
        os.unlink(m.path / "g")
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_fallocate_and_xattrs_answer_as_declared(tmp_path: Path, mounter):
    """fallocate(2) answers EOPNOTSUPP in every mode (pyfuse3 does not pass the request
    on); posix_fallocate still works: glibc then writes the zeros itself. Extended
    attribute calls answer EOPNOTSUPP (the kernel's answer after our ENOSYS)."""
    m = mounter(repo_url(tmp_path))
    path = m.path / "f"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDWR)
    try:
        for mode in (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
            assert fallocate(fd, mode, 0, MiB) == errno.EOPNOTSUPP, mode
        assert os.fstat(fd).st_size == 3
        os.posix_fallocate(fd, 0, 64 * 1024)
        assert os.fstat(fd).st_size == 64 * 1024
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc" + bytes(64 * 1024 - 3)
    for _ in range(2):  # the first answer (ours) and the kernel's remembered one
        assert errno_of(os.getxattr, path, "user.x") == errno.EOPNOTSUPP
        assert errno_of(os.setxattr, path, "user.x", b"1") == errno.EOPNOTSUPP
        assert errno_of(os.listxattr, path) == errno.EOPNOTSUPP
        assert errno_of(os.removexattr, path, "user.x") == errno.EOPNOTSUPP


def test_oversized_truncate_is_refused_quietly_and_sparse_files_count_their_blocks(
        tmp_path: Path, mounter):
    m = mounter(repo_url(tmp_path))
    path = m.path / "f"
    path.write_bytes(b"keep")
    assert errno_of(os.truncate, path, 1 << 60) == errno.EFBIG
    with open(path, "r+b") as fh:
        assert errno_of(os.ftruncate, fh.fileno(), 1 << 60) == errno.EFBIG
        assert errno_of(os.pwrite, fh.fileno(), b"x", 1 << 60) == errno.EFBIG
    assert path.read_bytes() == b"keep"
    assert not m.unexpected_log_lines()

    before = m.status()["cache_used"]
    sparse = m.path / "sparse.bin"
    with open(sparse, "wb") as fh:
        fh.truncate(256 * MiB)
        fh.write(os.urandom(MiB))
    assert os.stat(sparse).st_size == 256 * MiB
    used = m.status()["cache_used"] - before
    assert MiB <= used <= 2 * MiB, used
