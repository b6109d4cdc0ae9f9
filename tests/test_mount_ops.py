"""Every file operation through a real FUSE mount of the real `imgrepo-mount`.

Each group of operations runs on both backends (file:// and s3:// on moto), then the mount
is unmounted the user's way (`--unmount`), mounted again with an EMPTY cache (so every byte
and every attribute must come back from the bucket), and the tree compared with what the
first mount showed. The command-line errors, signals and a plain `fusermount3 -u` are
checked on the backend where they are cheapest.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from testservers.net import closed_port, pid_alive

from .mountutil import CLI, force_unmount, run_cli
from .treeutil import RENAME_NOREPLACE, assert_same_tree, renameat2, snapshot

MiB = 1 << 20


def errno_of(fn, *args) -> int:  # noqa: ANN001
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def remount_fresh(m, mounter, storage, tmp_path: Path, label: str):  # noqa: ANN001, ANN201
    """Unmount the user's way, then mount again with an empty cache of its own."""
    m.unmount()
    return mounter(storage.url, endpoint_url=storage.endpoint_url,
                   cache_dir=tmp_path / f"fresh-{label}")


# -- data ---------------------------------------------------------------------------------
def test_data_operations_survive_remount_with_empty_cache(storage, mounter, tmp_path: Path):
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    root = m.path
    rng = random.Random(1234)

    # Sequential write of a big file.
    big = rng.randbytes(3 * MiB + 5)
    (root / "big.bin").write_bytes(big)
    assert (root / "big.bin").read_bytes() == big

    # Random-offset writes (holes included), mirrored in memory; read back while open.
    model = bytearray(rng.randbytes(2 * MiB))
    (root / "random.bin").write_bytes(model)
    with open(root / "random.bin", "r+b") as fh:
        for _ in range(40):
            off = rng.randrange(0, len(model) + 300_000)
            data = rng.randbytes(rng.randrange(1, 200_000))
            fh.seek(off)
            fh.write(data)
            if off > len(model):
                model.extend(b"\0" * (off - len(model)))
            model[off:off + len(data)] = data
        fh.flush()
        fh.seek(0)
        assert fh.read() == bytes(model)
    assert (root / "random.bin").read_bytes() == bytes(model)

    # O_APPEND, over several opens and from two descriptors at once.
    for i in range(3):
        with open(root / "log.txt", "ab") as fh:
            fh.write(b"line %d\n" % i)
    fd1 = os.open(root / "log.txt", os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(root / "log.txt", os.O_WRONLY | os.O_APPEND)
    os.write(fd1, b"one\n")
    os.write(fd2, b"two\n")
    os.close(fd1)
    os.write(fd2, b"three\n")
    os.close(fd2)
    assert (root / "log.txt").read_bytes() == b"line 0\nline 1\nline 2\none\ntwo\nthree\n"

    # truncate: shrink and grow, by path (setattr without a handle) and by descriptor.
    data = rng.randbytes(500_000)
    (root / "trunc.bin").write_bytes(data)
    os.truncate(root / "trunc.bin", 100_000)
    assert (root / "trunc.bin").read_bytes() == data[:100_000]
    os.truncate(root / "trunc.bin", 300_000)
    assert (root / "trunc.bin").read_bytes() == data[:100_000] + b"\0" * 200_000
    with open(root / "trunc.bin", "r+b") as fh:
        fh.truncate(50_000)
        fh.seek(0, os.SEEK_END)
        fh.write(b"tail")
    trunc_expected = data[:50_000] + b"tail"
    assert (root / "trunc.bin").read_bytes() == trunc_expected
    assert os.stat(root / "trunc.bin").st_size == len(trunc_expected)
    (root / "zero.bin").write_bytes(b"will be emptied")
    os.truncate(root / "zero.bin", 0)
    assert (root / "zero.bin").read_bytes() == b""

    # O_TRUNC on an existing file (open("w")), shorter new content.
    (root / "otrunc.txt").write_bytes(b"a long first version of the file")
    (root / "otrunc.txt").write_bytes(b"short")
    assert (root / "otrunc.txt").read_bytes() == b"short"

    # Overwrite in the middle of a closed (committed) file.
    with open(root / "big.bin", "r+b") as fh:
        fh.seek(MiB)
        fh.write(b"X" * 1000)
    big = big[:MiB] + b"X" * 1000 + big[MiB + 1000:]
    assert (root / "big.bin").read_bytes() == big

    # fsync in the middle of writing, then more writes.
    with open(root / "synced.bin", "wb") as fh:
        fh.write(b"before fsync;")
        fh.flush()
        os.fsync(fh.fileno())
        fh.write(b"after fsync")
    assert (root / "synced.bin").read_bytes() == b"before fsync;after fsync"

    # Two writable handles on one file: closing one commits, the other keeps writing.
    fa = os.open(root / "shared.bin", os.O_RDWR | os.O_CREAT, 0o644)
    fb = os.open(root / "shared.bin", os.O_RDWR)
    os.pwrite(fa, b"AAAA", 0)
    os.pwrite(fb, b"BB", 2)
    os.close(fa)
    assert (root / "shared.bin").read_bytes() == b"AABB"
    os.pwrite(fb, b"CC", 4)
    assert os.pread(fb, 100, 0) == b"AABBCC"
    os.close(fb)
    assert (root / "shared.bin").read_bytes() == b"AABBCC"

    # The editors' save pattern: write a temp file, fsync, rename it over the original.
    # A reader that opened the original before keeps reading the old version.
    (root / "doc.txt").write_bytes(b"version 1\n" * 1000)
    reader = open(root / "doc.txt", "rb")  # noqa: SIM115 - held open across the rename
    for version in (2, 3):
        tmp = root / ".doc.txt.swp"
        with open(tmp, "wb") as fh:
            fh.write(b"version %d\n" % version * 1000)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o640)
        os.rename(tmp, root / "doc.txt")
    assert reader.read() == b"version 1\n" * 1000
    reader.close()
    assert (root / "doc.txt").read_bytes() == b"version 3\n" * 1000
    assert stat.S_IMODE(os.stat(root / "doc.txt").st_mode) == 0o640
    assert not (root / ".doc.txt.swp").exists()

    # Empty files, created several ways.
    (root / "empty1").touch()
    os.close(os.open(root / "empty2", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
    os.mknod(root / "empty3", 0o644 | stat.S_IFREG)

    before = snapshot(root, mtimes=True)
    assert before[b"empty2"][1] == 0o600
    m2 = remount_fresh(m, mounter, storage, tmp_path, "data")
    assert_same_tree(before, snapshot(m2.path, mtimes=True), "after remount, empty cache")
    assert (m2.path / "random.bin").read_bytes() == bytes(model)
    assert (m2.path / "trunc.bin").read_bytes() == trunc_expected


def test_reads_while_another_descriptor_closes(tmp_path: Path, mounter):
    """While close() stores a big file, reads through another descriptor (the kernel's page
    cache dropped, so they reach the mount) see its content, never an empty file."""
    m = mounter(f"file://{tmp_path}/repo")
    data = os.urandom(64 * MiB)
    writer = os.open(m.path / "big.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(writer, data)
    reader = os.open(m.path / "big.bin", os.O_RDONLY)
    closed = threading.Event()

    def close_writer() -> None:
        os.close(writer)
        closed.set()

    thread = threading.Thread(target=close_writer)
    thread.start()
    wrong = []
    try:
        while not closed.is_set():
            os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
            got = os.pread(reader, 4096, 32 * MiB)
            if got != data[32 * MiB:32 * MiB + 4096]:
                wrong.append(len(got))
    finally:
        thread.join()
        os.close(reader)
    assert not wrong, f"{len(wrong)} reads saw other bytes (lengths {wrong[:5]})"


def test_open_unlinked_file_stays_readable(storage, mounter, tmp_path: Path):
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    payload = os.urandom(2 * MiB + 3)
    (m.path / "a.bin").write_bytes(payload)
    (m.path / "b.bin").write_bytes(payload[::-1])
    with open(m.path / "a.bin", "rb") as fh:
        os.unlink(m.path / "a.bin")
        assert not (m.path / "a.bin").exists()
        assert fh.read() == payload
        assert os.fstat(fh.fileno()).st_size == len(payload)
    # A file being written, unlinked before it is closed: writes and reads keep working.
    fd = os.open(m.path / "w.bin", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"12345")
    os.unlink(m.path / "w.bin")
    os.write(fd, b"678")
    assert os.pread(fd, 100, 0) == b"12345678"
    assert os.fstat(fd).st_size == 8
    os.close(fd)
    assert sorted(os.listdir(m.path)) == ["b.bin"]
    # Two descriptors on an unlinked file: what one writes (and closes), the other reads.
    (m.path / "two.txt").write_bytes(b"old content")
    fd1 = os.open(m.path / "two.txt", os.O_RDWR)
    fd2 = os.open(m.path / "two.txt", os.O_RDWR)
    os.unlink(m.path / "two.txt")
    os.pwrite(fd1, b"NEW", 0)
    os.close(fd1)
    assert os.pread(fd2, 100, 0) == b"NEW content"
    os.ftruncate(fd2, 5)
    os.pwrite(fd2, b"!", 5)
    assert os.pread(fd2, 100, 0) == b"NEW c!"
    os.close(fd2)
    assert sorted(os.listdir(m.path)) == ["b.bin"]

    # On a fresh cache the blob must stream from the bucket while its name is gone.
    m2 = remount_fresh(m, mounter, storage, tmp_path, "unlinked")
    assert sorted(os.listdir(m2.path)) == ["b.bin"]
    with open(m2.path / "b.bin", "rb") as fh:
        first = fh.read(1000)
        os.unlink(m2.path / "b.bin")
        rest = fh.read()
    assert first + rest == payload[::-1]
    assert os.listdir(m2.path) == []


# -- metadata and names ---------------------------------------------------------------------
def test_attributes_and_names_survive_remount(storage, mounter, tmp_path: Path):
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    root = m.path

    # chmod on files and directories.
    (root / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "script.sh", 0o755)
    (root / "secret").write_bytes(b"s")
    os.chmod(root / "secret", 0o600)
    (root / "private").mkdir(mode=0o700)
    os.chmod(root / "private", 0o750)
    assert stat.S_IMODE(os.stat(root / "script.sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(root / "private").st_mode) == 0o750

    # utimens on a closed file, on a file still open for writing, and on a directory.
    (root / "old.jpg").write_bytes(b"jpeg")
    stamp = 1_500_000_000_123_456_789
    os.utime(root / "old.jpg", ns=(stamp, stamp))
    with open(root / "open.jpg", "wb") as fh:
        fh.write(b"data")
        fh.flush()
        os.utime(fh.fileno(), ns=(stamp + 1, stamp + 1))
    (root / "dated").mkdir()
    os.utime(root / "dated", ns=(stamp + 2, stamp + 2))
    assert os.stat(root / "old.jpg").st_mtime_ns == stamp
    assert os.stat(root / "open.jpg").st_mtime_ns == stamp + 1
    assert os.stat(root / "dated").st_mtime_ns == stamp + 2

    # Names that are not UTF-8 (bytes straight from the kernel), for every kind of entry.
    raw = os.fsencode(root)
    latin = b"caf\xe9-\xff.txt"
    with open(os.path.join(raw, latin), "wb") as fh:
        fh.write(b"latin-1 name")
    os.mkdir(os.path.join(raw, b"dir-\xfe"))
    with open(os.path.join(raw, b"dir-\xfe", b"\x80inner"), "wb") as fh:
        fh.write(b"inner")
    os.symlink(b"target-\xfa", os.path.join(raw, b"link-\xfb"))
    assert latin in os.listdir(raw)

    # Names of 255 bytes work; 256 bytes are refused with ENAMETOOLONG, whatever the call.
    long255, long256 = b"n" * 251 + b".txt", b"n" * 252 + b".txt"
    with open(os.path.join(raw, long255), "wb") as fh:
        fh.write(b"long name")
    os.mkdir(os.path.join(raw, b"d" * 255))
    too_long = os.path.join(raw, long256)
    assert errno_of(open, too_long, "wb") == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, too_long) == errno.ENAMETOOLONG
    assert errno_of(os.symlink, b"x", too_long) == errno.ENAMETOOLONG
    assert errno_of(os.rename, os.path.join(raw, long255), too_long) == errno.ENAMETOOLONG
    assert not os.path.exists(too_long)

    # statfs answers with sane numbers.
    sv = os.statvfs(root)
    assert sv.f_bsize > 0 and sv.f_blocks > 0 and sv.f_bavail <= sv.f_blocks
    assert sv.f_namemax == 255

    # Hard links and special files answer a clear errno.
    assert errno_of(os.link, root / "secret", root / "hard") == errno.EPERM
    assert errno_of(os.mkfifo, root / "fifo") == errno.EPERM

    before = snapshot(root, mtimes=True)
    m2 = remount_fresh(m, mounter, storage, tmp_path, "attrs")
    after = snapshot(m2.path, mtimes=True)
    assert_same_tree(before, after, "after remount, empty cache")
    raw2 = os.fsencode(m2.path)
    assert after[b"old.jpg"][4] == stamp and after[b"dated"][4] == stamp + 2
    assert after[b"open.jpg"][4] == stamp + 1
    assert after[b"secret"][1] == 0o600 and after[b"private"][1] == 0o750
    with open(os.path.join(raw2, latin), "rb") as fh:
        assert fh.read() == b"latin-1 name"
    assert os.readlink(os.path.join(raw2, b"link-\xfb")) == b"target-\xfa"
    assert os.listdir(os.path.join(raw2, b"dir-\xfe")) == [b"\x80inner"]


# -- the namespace ----------------------------------------------------------------------
def test_namespace_operations_survive_remount(storage, mounter, tmp_path: Path):
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    root = m.path
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_bytes(b"deep")
    (root / "x").mkdir()

    # mkdir / rmdir and their errors.
    assert errno_of(os.mkdir, root / "a") == errno.EEXIST
    assert errno_of(os.rmdir, root / "a") == errno.ENOTEMPTY
    assert errno_of(os.rmdir, root / "a" / "b" / "c" / "deep.txt") == errno.ENOTDIR
    assert errno_of(os.unlink, root / "a") == errno.EISDIR
    assert errno_of(os.rmdir, root / "nothing") == errno.ENOENT
    (root / "gone").mkdir()
    os.rmdir(root / "gone")
    assert not (root / "gone").exists()
    assert errno_of(os.open, root / "x", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST

    # Rename a file over an existing file.
    (root / "f1").write_bytes(b"one")
    (root / "f2").write_bytes(b"two")
    os.rename(root / "f1", root / "f2")
    assert (root / "f2").read_bytes() == b"one" and not (root / "f1").exists()

    # RENAME_NOREPLACE: refused over an existing name, fine onto a free one.
    (root / "n1").write_bytes(b"n1")
    assert errno_of(renameat2, root / "n1", root / "f2", RENAME_NOREPLACE) == errno.EEXIST
    assert (root / "f2").read_bytes() == b"one" and (root / "n1").read_bytes() == b"n1"
    renameat2(root / "n1", root / "x" / "n1-moved", RENAME_NOREPLACE)
    assert (root / "x" / "n1-moved").read_bytes() == b"n1"
    (root / "emptydir").mkdir()
    assert errno_of(renameat2, root / "emptydir", root / "x", RENAME_NOREPLACE) == errno.EEXIST

    # Directories: across parents with their content, over an empty directory, and the
    # refusals (over a non-empty directory, file over dir, dir over file, into itself).
    os.rename(root / "a" / "b", root / "x" / "b2")
    assert (root / "x" / "b2" / "c" / "deep.txt").read_bytes() == b"deep"
    assert os.listdir(root / "a") == []
    os.rename(root / "x" / "b2", root / "emptydir")
    assert (root / "emptydir" / "c" / "deep.txt").read_bytes() == b"deep"
    (root / "full").mkdir()
    (root / "full" / "keep").write_bytes(b"k")
    assert errno_of(os.rename, root / "a", root / "full") == errno.ENOTEMPTY
    assert errno_of(os.rename, root / "f2", root / "a") == errno.EISDIR
    assert errno_of(os.rename, root / "a", root / "f2") == errno.ENOTDIR
    assert errno_of(os.rename, root / "emptydir", root / "emptydir" / "c" / "inside") \
        == errno.EINVAL
    # A file renamed while it is open for writing keeps its new name and its content.
    with open(root / "moving.txt", "wb") as fh:
        fh.write(b"first half, ")
        fh.flush()
        os.rename(root / "moving.txt", root / "x" / "moved.txt")
        fh.write(b"second half")
    assert not (root / "moving.txt").exists()
    assert (root / "x" / "moved.txt").read_bytes() == b"first half, second half"

    # Symlinks: relative, absolute, dangling, to a directory; readlink and following.
    os.symlink("emptydir/c/deep.txt", root / "rel")
    os.symlink("/etc/hostname", root / "abs")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("emptydir", root / "dirlink")
    assert os.readlink(root / "rel") == "emptydir/c/deep.txt"
    assert (root / "rel").read_bytes() == b"deep"
    assert stat.S_ISLNK(os.lstat(root / "dangling").st_mode)
    assert not (root / "dangling").exists()
    assert sorted(os.listdir(root / "dirlink")) == ["c"]
    assert errno_of(os.readlink, root / "f2") == errno.EINVAL
    os.rename(root / "dangling", root / "x" / "dangling2")
    assert os.readlink(root / "x" / "dangling2") == "does/not/exist"

    # unlink of files and symlinks.
    (root / "tmpfile").write_bytes(b"t")
    os.unlink(root / "tmpfile")
    os.unlink(root / "abs")
    assert errno_of(os.unlink, root / "tmpfile") == errno.ENOENT

    # readdir(plus): ls -l sees the right types and sizes.
    listing = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink(),
                        e.stat(follow_symlinks=False).st_size) for e in os.scandir(root)}
    assert listing["f2"] == (False, False, 3)
    assert listing["emptydir"][:2] == (True, False)
    assert listing["rel"] == (False, True, len("emptydir/c/deep.txt"))

    before = snapshot(root)
    m2 = remount_fresh(m, mounter, storage, tmp_path, "names")
    assert_same_tree(before, snapshot(m2.path), "after remount, empty cache")
    # And the namespace keeps working on the fresh mount (remote-only directories).
    os.rename(m2.path / "emptydir" / "c", m2.path / "a" / "c")
    os.unlink(m2.path / "a" / "c" / "deep.txt")
    os.rmdir(m2.path / "a" / "c")
    assert os.listdir(m2.path / "a") == []


# -- what operations cost -----------------------------------------------------------------
def test_ls_l_of_10000_files_costs_a_handful_of_requests(s3_bucket, s3_proxy, mounter,
                                                         tmp_path: Path):
    """A folder of 10,000 photos (its manifest written straight into the bucket): listing
    it with attributes costs a handful of requests, opening one file reads only its blob,
    and overwriting a file (O_TRUNC) downloads nothing."""
    m = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url)
    (m.path / "photos").mkdir()
    content = {i: os.urandom(1000 + i) for i in range(3)}
    for i, data in content.items():
        (m.path / "photos" / f"IMG_{i:05d}.jpg").write_bytes(data)
    m.unmount()

    from fsrepo.manifest import FileEntry, Manifest, parse_manifest, serialise_manifest
    client = s3_client(s3_bucket)
    key = f"{s3_bucket.prefix}/dirs/root.json"
    root = parse_manifest(client.get_object(Bucket=s3_bucket.bucket, Key=key)["Body"].read(),
                          "root")[0]
    photos_id = root.entries[b"photos"].id
    key = f"{s3_bucket.prefix}/dirs/{photos_id}.json"
    photos = parse_manifest(client.get_object(Bucket=s3_bucket.bucket, Key=key)["Body"].read(),
                            photos_id)[0]
    real = [photos.entries[f"IMG_{i:05d}.jpg".encode()] for i in range(3)]
    entries = {f"IMG_{i:05d}.jpg".encode(): real[i % 3] for i in range(10_000)}
    assert all(isinstance(e, FileEntry) for e in entries.values())
    client.put_object(Bucket=s3_bucket.bucket, Key=key,
                      Body=serialise_manifest(Manifest(photos_id, entries)))

    # Each operation's own requests are counted: no folder read-ahead (reading IMG_00004
    # and then IMG_00005 in name order would fetch the next files' blobs; tested in
    # tests/test_folder_readahead.py).
    m2 = mounter(s3_bucket.url, "--read-ahead-files", "0", endpoint_url=s3_proxy.url,
                 cache_dir=tmp_path / "fresh")
    s3_proxy.reset_counts()
    listing = subprocess.run(["ls", "-l", str(m2.path / "photos")], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    assert len(listing) == 10_001  # "total" and one line per file
    sizes = {e.name: e.stat(follow_symlinks=False).st_size
             for e in os.scandir(m2.path / "photos")}
    assert len(sizes) == 10_000 and sizes["IMG_09998.jpg"] == len(content[2])
    seen = [(r.method, r.path) for r in s3_proxy.requests]
    assert len(seen) <= 4, seen

    s3_proxy.reset_counts()
    assert (m2.path / "photos" / "IMG_00004.jpg").read_bytes() == content[1]
    blob_gets = [r.path for r in s3_proxy.requests if r.method == "GET"]
    assert len(blob_gets) == 1 and real[1].sha256 in blob_gets[0], blob_gets

    s3_proxy.reset_counts()
    (m2.path / "photos" / "IMG_00005.jpg").write_bytes(b"overwritten")
    assert (m2.path / "photos" / "IMG_00005.jpg").read_bytes() == b"overwritten"
    m2.wait_idle()
    assert not [r.path for r in s3_proxy.requests if r.method == "GET" and "/blobs/" in r.path]


# -- command line, signals, unmounting ----------------------------------------------------
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


def _one_line_error(proc: subprocess.CompletedProcess, *words: str,
                    foreground: bool = False) -> str:
    """Non-zero, no traceback, and the error is one line. In the foreground the mount's log
    also goes to stderr: those (timestamped) lines may precede it."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if foreground:
        assert all(LOG_LINE.match(line) for line in lines[:-1]), proc.stderr
    else:
        assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    err = lines[-1]
    assert err.startswith("imgrepo-mount: error: "), err
    for word in words:
        assert word in err, err
    return err


def test_cli_errors_before_mounting_are_one_line(tmp_path: Path, mounter, mount_env):
    url = f"file://{tmp_path}/repo"
    cache = ["--cache-dir", str(tmp_path / "cli-cache")]
    # Missing mountpoint.
    res = run_cli([str(tmp_path / "missing"), "--storage", url, *cache], mount_env, check=False)
    _one_line_error(res, "does not exist")
    # Not empty.
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_bytes(b"x")
    res = run_cli([str(full), "--storage", url, *cache, "--foreground"], mount_env,
                  check=False)
    _one_line_error(res, "not empty", foreground=True)
    # Already mounted (another cache, so the refusal comes from the mountpoint check).
    m = mounter(url)
    res = run_cli([str(m.path), "--storage", url, *cache], mount_env, check=False)
    _one_line_error(res, "already")
    assert os.path.ismount(m.path)
    # Storage that cannot be reached (nothing listens on the endpoint's port).
    target = tmp_path / "target"
    target.mkdir()
    dead = f"http://127.0.0.1:{closed_port()}"
    res = run_cli([str(target), "--storage", "s3://nobucket/p", "--endpoint-url", dead,
                   *cache], mount_env, check=False, timeout=120)
    err = _one_line_error(res)
    assert "unreachable" in err or "cannot reach" in err, err
    assert not os.path.ismount(target)
    # No FUSE on this machine: /dev replaced by an empty folder in a private mount
    # namespace of the command's own.
    if shutil.which("unshare"):
        script = 'mount -t tmpfs none /dev && exec "$@"'
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                              "sh", *CLI, str(target), "--storage", url, *cache],
                             env=mount_env, capture_output=True, text=True, timeout=60)
        _one_line_error(res, "FUSE is not available")
    # Unmounting something that is not mounted.
    res = run_cli(["--unmount", str(target)], mount_env, check=False)
    _one_line_error(res, "not mounted")


def test_background_mount_returns_when_ready(tmp_path: Path, mount_env):
    """Without --foreground the command returns once the mount answers, and --unmount ends
    the background process."""
    mnt = tmp_path / "bg"
    mnt.mkdir()
    args = [str(mnt), "--storage", f"file://{tmp_path}/repo",
            "--cache-dir", str(tmp_path / "bg-cache")]
    pid = None
    try:
        res = run_cli(args, mount_env, timeout=60)
        assert "mounted" in res.stdout
        assert os.path.ismount(mnt)  # ready at once, no waiting
        (mnt / "hello.txt").write_bytes(b"hello")
        pid = run_json_status(mnt, mount_env)["pid"]
        run_cli(["--unmount", str(mnt)], mount_env)
        assert not os.path.ismount(mnt)
        assert not pid_alive(pid)
        res = run_cli(args, mount_env, timeout=60)
        pid = run_json_status(mnt, mount_env)["pid"]
        assert (mnt / "hello.txt").read_bytes() == b"hello"
        run_cli(["--unmount", str(mnt)], mount_env)
        assert not pid_alive(pid)
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        force_unmount(mnt)


def run_json_status(mnt: Path, env: dict[str, str]) -> dict:
    import json
    return json.loads(run_cli(["--status", str(mnt), "--json"], env).stdout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(sig, tmp_path: Path, mounter):
    url = f"file://{tmp_path}/repo"
    m = mounter(url)
    (m.path / "kept.txt").write_bytes(b"kept")
    (m.path / "dir").mkdir()
    os.kill(m.proc.pid, sig)
    assert m.proc.wait(timeout=30) == 0, m.logtext()
    assert not os.path.ismount(m.path)
    assert "Traceback" not in m.logtext()
    m2 = mounter(url, cache_dir=m.cache_dir)  # same cache: anything pending resumes
    assert (m2.path / "kept.txt").read_bytes() == b"kept"
    m2.wait_idle()
    m3 = mounter(url, cache_dir=tmp_path / "fresh")
    assert sorted(os.listdir(m3.path)) == ["dir", "kept.txt"]


def test_plain_fusermount_keeps_pending_uploads_for_next_mount(s3_bucket, s3_proxy, mounter,
                                                               tmp_path: Path):
    """`fusermount3 -u` while blob uploads fail: nothing is lost; the next mount (same
    cache) finishes the uploads, and a fresh machine then sees the files."""
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url)
    s3_proxy.inject(method="PUT", path=r"/blobs/", status=503, times=None)
    files = {f"photo{i}.jpg": os.urandom(20_000 + i) for i in range(5)}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    assert m.status()["pending_files"] >= 5
    subprocess.run(["fusermount3", "-u", str(m.path)], check=True, capture_output=True)
    assert m.proc.wait(timeout=30) == 0, m.logtext()
    assert not os.path.ismount(m.path)
    log = m.logtext()
    assert "still to upload" in log or "the journal keeps their work" in log, log
    # Nothing of it reached the bucket.
    client = s3_client(s3_bucket)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket.bucket)
            .get("Contents", [])]
    assert not any("/blobs/" in k for k in keys), keys

    s3_proxy.clear_faults()
    m2 = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, cache_dir=m.cache_dir)
    assert m2.wait_idle()["pending_ops"] == 0
    m2.unmount()
    m3 = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url,
                 cache_dir=tmp_path / "fresh")
    for name, data in files.items():
        assert (m3.path / name).read_bytes() == data


def test_unmount_waits_until_everything_is_in_the_bucket(s3_bucket, s3_proxy, mounter):
    """`--unmount` with slow uploads: when it returns, the bucket holds every blob and
    every name (read straight from the bucket, not through imgrepo)."""
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url)
    s3_proxy.inject(method="PUT", path=r"/blobs/", delay=0.5, times=None)
    files = {f"slow{i}.jpg": os.urandom(30_000 + i) for i in range(6)}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    m.unmount()
    client = s3_client(s3_bucket)
    for data in files.values():
        digest = hashlib.sha256(data).hexdigest()
        key = f"{s3_bucket.prefix}/blobs/sha256/{digest[:2]}/{digest}"
        assert client.get_object(Bucket=s3_bucket.bucket, Key=key)["Body"].read() == data
    root = client.get_object(Bucket=s3_bucket.bucket,
                             Key=f"{s3_bucket.prefix}/dirs/root.json")["Body"].read()
    for name in files:
        assert name.encode() in root


def s3_client(target):  # noqa: ANN001, ANN201
    import boto3
    return boto3.client("s3", endpoint_url=target.endpoint_url, region_name="us-east-1")
