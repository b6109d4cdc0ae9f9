"""Several machines, one repository: two real mounts of one bucket.

Each "machine" is an `imgrepo-mount` process with its own cache directory, both mounting
the same moto bucket over HTTP. The cross-machine rules checked here are written down in
docs/cross-machine.md.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fsrepo import control
from fsrepo.manifest import DirEntry, parse_manifest
from fsrepo.repository import manifest_key

from .mountutil import file_tree as tree

REFRESH = 1.0  # --refresh for every mount here
MARGIN = 2.0  # freshness: visible within REFRESH + MARGIN of reaching the bucket
CONFLICT_RE = r" \(conflict [^)]+ \d{4}-\d\d-\d\d \d{6}(?: \d+)?\)"


# -- helpers ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _control_socket_dir(mount_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The mounts' control sockets are asked from this process: no `imgrepo-mount --status`
    subprocess, whose fork would flush (and so save) files a test holds open for writing."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", mount_env["XDG_RUNTIME_DIR"])


def ask(m: Any, cmd: str) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for reply in control.request(m.path, {"cmd": cmd}, timeout=120):
        last = reply
    assert last.get("done") and not last.get("error"), last
    return last


def idle(m: Any) -> dict[str, Any]:
    """Everything closed on this mount is in the bucket."""
    return ask(m, "wait")


def status(m: Any) -> dict[str, Any]:
    return ask(m, "status")


def until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll `check` until it returns something true; OSError counts as 'not yet'."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                 f"last answer: {last!r}")
        time.sleep(0.02)


def two_machines(bucket: Any, mounter: Any, a_endpoint: str | None = None,
                 b_endpoint: str | None = None) -> tuple[Any, Any]:
    a = mounter(bucket.url, "--refresh", str(REFRESH), name="alpha",
                endpoint_url=a_endpoint or bucket.endpoint_url)
    b = mounter(bucket.url, "--refresh", str(REFRESH), name="beta",
                endpoint_url=b_endpoint or bucket.endpoint_url)
    return a, b


@contextmanager
def logs_on_failure(*mounts: Any) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for m in mounts:
            print(f"---- log of {m.path.name} ----\n{m.logtext()[-6000:]}")
        raise


def content(tag: str, i: int, size: int) -> bytes:
    seed = hashlib.sha256(f"{tag}/{i}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def gone(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    return False


def conflict_copies(names: list[str], stem: str, suffix: str) -> list[str]:
    pattern = re.compile(re.escape(stem) + CONFLICT_RE + re.escape(suffix) + r"$")
    return [n for n in names if pattern.match(n)]




# -- concurrent adds ------------------------------------------------------------------------
def test_two_mounts_copying_300_files_each_into_one_directory_keep_all_600(
        s3_bucket, mounter, tmp_path: Path):
    a, b = two_machines(s3_bucket, mounter)
    with logs_on_failure(a, b):
        (a.path / "shared").mkdir()
        idle(a)
        until("the directory on beta", lambda: (b.path / "shared").is_dir())
        expected: dict[str, bytes] = {}
        for side in ("a", "b"):
            src = tmp_path / f"src-{side}"
            src.mkdir()
            for i in range(300):
                name = f"{side}-{i:03d}.jpg"
                data = content(side, i, 700 + 37 * i)
                (src / name).write_bytes(data)
                expected[name] = data
        # Two real `cp` processes, one per machine, started together.
        procs = [subprocess.Popen(["cp", "-r", f"{tmp_path}/src-{side}/.", str(m.path / "shared")],
                                  stderr=subprocess.PIPE)
                 for side, m in (("a", a), ("b", b))]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        idle(a)
        idle(b)
        for m in (a, b):
            until(f"all 600 names on {m.path.name}",
                  lambda m=m: sorted(os.listdir(m.path / "shared")) == sorted(expected),
                  timeout=30)
        for m in (a, b):
            for name, data in expected.items():
                assert (m.path / "shared" / name).read_bytes() == data, (m.path.name, name)
        assert status(a)["conflicts"] == 0 and status(b)["conflicts"] == 0


# -- same name written on both --------------------------------------------------------------
def test_same_name_written_on_both_keeps_both_versions_on_both_mounts(s3_bucket, mounter):
    a, b = two_machines(s3_bucket, mounter)
    with logs_on_failure(a, b):
        # 1. Both create the same new name at the same moment.
        va, vb = b"alpha's report\n" * 300, b"beta's report\n" * 200
        gate = threading.Barrier(2)

        def write(path: Path, data: bytes) -> None:
            gate.wait()
            path.write_bytes(data)

        threads = [threading.Thread(target=write, args=(a.path / "report.txt", va)),
                   threading.Thread(target=write, args=(b.path / "report.txt", vb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        idle(a)
        idle(b)

        def both_kept(m: Any) -> dict[str, bytes] | None:
            names = os.listdir(m.path)
            copies = conflict_copies(names, "report", ".txt")
            if "report.txt" not in names or len(copies) != 1:
                return None
            return {n: (m.path / n).read_bytes() for n in ["report.txt", *copies]}

        seen_a = until("both versions on alpha", lambda: both_kept(a))
        seen_b = until("both versions on beta", lambda: both_kept(b))
        assert seen_a == seen_b
        assert sorted(seen_a.values()) == sorted([va, vb])

        # 2. An existing file edited on both: beta's editor has seen alpha's new version
        # arrive before it saves. Nothing is overwritten: the later save becomes the copy.
        v0 = b"first version\n" * 100
        (a.path / "notes.txt").write_bytes(v0)
        idle(a)
        until("v0 on beta", lambda: (b.path / "notes.txt").read_bytes() == v0)
        editor = open(b.path / "notes.txt", "r+b")  # noqa: SIM115 - held open on purpose
        try:
            editor.write(b"BETA WAS HERE\n")
            editor.flush()
            v1 = b"alpha rewrote it\n" * 10
            (a.path / "notes.txt").write_bytes(v1)
            (a.path / "marker-1").write_bytes(b"")
            idle(a)
            # The marker is committed with or after v1: once beta sees it, it knows v1.
            until("the marker on beta", lambda: (b.path / "marker-1").exists())
        finally:
            editor.close()
        v_beta = b"BETA WAS HERE\n" + v0[len(b"BETA WAS HERE\n"):]
        idle(b)

        def edit_kept(m: Any) -> dict[str, bytes] | None:
            names = os.listdir(m.path)
            copies = conflict_copies(names, "notes", ".txt")
            if "notes.txt" not in names or len(copies) != 1:
                return None
            return {"notes.txt": (m.path / "notes.txt").read_bytes(),
                    "copy": (m.path / copies[0]).read_bytes(), "name": copies[0].encode()}

        got_b = until("alpha's version and beta's copy on beta", lambda: edit_kept(b))
        got_a = until("alpha's version and beta's copy on alpha", lambda: edit_kept(a))
        assert got_a == got_b
        assert got_a["notes.txt"] == v1  # the version saved first keeps the name
        assert got_a["copy"] == v_beta  # the later save is the conflict copy
        assert status(b)["conflicts"] >= 1


# -- delete versus edit ---------------------------------------------------------------------
def test_edit_wins_over_a_concurrent_delete(s3_bucket, s3_proxy, mounter):
    # alpha talks to the bucket through a proxy, so one of its writes can be held back.
    a, b = two_machines(s3_bucket, mounter, a_endpoint=s3_proxy.url)
    with logs_on_failure(a, b):
        v0 = b"original\n" * 1000
        (a.path / "edited-while-deleted.txt").write_bytes(v0)
        (a.path / "deleted-while-edited.txt").write_bytes(v0 + b"!")
        idle(a)
        until("both files on beta", lambda: (b.path / "edited-while-deleted.txt").read_bytes()
              == v0 and (b.path / "deleted-while-edited.txt").exists())

        # 1. Beta is editing a file when alpha's delete arrives; beta saves afterwards.
        editor = open(b.path / "edited-while-deleted.txt", "r+b")  # noqa: SIM115
        try:
            editor.write(b"EDITED ON BETA, PART 1\n")
            editor.flush()
            os.unlink(a.path / "edited-while-deleted.txt")
            idle(a)
            until("the delete to reach beta", lambda: gone(b.path / "edited-while-deleted.txt"))
            editor.seek(0, os.SEEK_END)
            editor.write(b"EDITED ON BETA, PART 2\n")
        finally:
            editor.close()
        edited = b"EDITED ON BETA, PART 1\n" + v0[len(b"EDITED ON BETA, PART 1\n"):] + b"EDITED ON BETA, PART 2\n"
        idle(b)
        for m in (b, a):
            until(f"beta's edit back on {m.path.name}",
                  lambda m=m: (m.path / "edited-while-deleted.txt").read_bytes() == edited)

        # 2. Alpha deletes, but its delete reaches the bucket only after beta's edit did.
        held = s3_proxy.inject(method="PUT", path=r"/dirs/root\.json", delay=3.0, times=1)
        os.unlink(a.path / "deleted-while-edited.txt")
        assert gone(a.path / "deleted-while-edited.txt")
        v2 = b"beta's new text\n" * 50
        (b.path / "deleted-while-edited.txt").write_bytes(v2)
        idle(b)
        idle(a)
        assert held.hits == 1
        for m in (a, b):
            until(f"beta's edit on {m.path.name}",
                  lambda m=m: (m.path / "deleted-while-edited.txt").read_bytes() == v2)

        # 3. Beta has the file open for writing, but writes only after the delete arrived.
        (a.path / "open-for-writing.txt").write_bytes(v0)
        idle(a)
        until("the file on beta", lambda: (b.path / "open-for-writing.txt").exists())
        with open(b.path / "open-for-writing.txt", "r+b", buffering=0) as late:
            os.unlink(a.path / "open-for-writing.txt")
            idle(a)
            until("the delete to reach beta", lambda: gone(b.path / "open-for-writing.txt"))
            late.write(b"LATE EDIT\n")
        idle(b)
        for m in (a, b):
            until(f"the late edit on {m.path.name}",
                  lambda m=m: (m.path / "open-for-writing.txt").read_bytes()
                  == b"LATE EDIT\n" + v0[len(b"LATE EDIT\n"):])
        assert sorted(os.listdir(a.path)) == sorted(os.listdir(b.path)) == \
            ["deleted-while-edited.txt", "edited-while-deleted.txt", "open-for-writing.txt"]


# -- rename versus add ----------------------------------------------------------------------
def test_files_added_into_a_directory_renamed_elsewhere_end_up_in_the_renamed_one(
        s3_bucket, mounter):
    a, b = two_machines(s3_bucket, mounter)
    with logs_on_failure(a, b):
        (a.path / "album").mkdir()
        (a.path / "album" / "first.jpg").write_bytes(content("first", 0, 5000))
        idle(a)
        until("album on beta", lambda: (b.path / "album" / "first.jpg").exists())

        # Beta keeps adding files into the folder (through a descriptor on it, as a program
        # sitting in that folder would) while alpha renames it.
        dfd = os.open(b.path / "album", os.O_RDONLY | os.O_DIRECTORY)
        written: dict[str, bytes] = {"first.jpg": content("first", 0, 5000)}
        stop = threading.Event()
        problems: list[BaseException] = []

        def add_files() -> None:
            i, after_stop = 0, 0
            try:
                while after_stop < 5:  # and 5 more once beta has seen the rename
                    name = f"beta-{i:04d}.jpg"
                    data = content("beta", i, 3000 + i)
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
                    try:
                        os.write(fd, data)
                    finally:
                        os.close(fd)
                    written[name] = data
                    i += 1
                    after_stop += stop.is_set()
                    stop.wait(0.02)  # a steady trickle, as a camera import would be
                    if i > 3000:
                        raise AssertionError("beta never saw the rename")
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                problems.append(exc)

        adder = threading.Thread(target=add_files)
        try:
            adder.start()
            until("beta's first files", lambda: len(written) > 5)
            os.rename(a.path / "album", a.path / "album-2024")
            idle(a)
            until("the old name to go on beta", lambda: gone(b.path / "album"))
            # Before anything looked up the new name: the folder itself is still there.
            assert os.path.samestat(os.fstat(dfd), os.stat(b.path / "album-2024"))
            stop.set()
            adder.join(timeout=60)
        finally:
            stop.set()
            os.close(dfd)
        assert not problems, problems
        idle(b)
        idle(a)
        for m in (a, b):
            until(f"every file in album-2024 on {m.path.name}",
                  lambda m=m: sorted(os.listdir(m.path / "album-2024")) == sorted(written))
            assert os.listdir(m.path) == ["album-2024"]
            assert tree(m.path / "album-2024") == written


# -- read while replaced ---------------------------------------------------------------------
def test_a_file_open_for_reading_keeps_its_version_while_replaced_elsewhere(
        s3_bucket, mounter):
    a, b = two_machines(s3_bucket, mounter)
    with logs_on_failure(a, b):
        old = content("old", 0, 3 * 1024 * 1024 + 11)
        new = content("new", 0, 1024 * 1024 + 5)
        (a.path / "photo.raw").write_bytes(old)
        idle(a)
        until("the file on beta", lambda: (b.path / "photo.raw").exists())
        with open(b.path / "photo.raw", "rb", buffering=0) as reader:
            head = reader.read(64 * 1024)
            (a.path / "photo.raw").write_bytes(new)
            idle(a)
            until("beta to open the new version",
                  lambda: (b.path / "photo.raw").read_bytes() == new)
            assert os.stat(b.path / "photo.raw").st_size == len(new)
            rest = b""
            while chunk := reader.read(1 << 20):
                rest += chunk
            assert os.fstat(reader.fileno()).st_size == len(old)
        assert head + rest == old  # the open handle read the old version, whole
        assert (b.path / "photo.raw").read_bytes() == new


# -- freshness --------------------------------------------------------------------------------
def test_changes_show_on_the_other_mount_within_the_refresh_delay(
        s3_bucket, s3_proxy, moto_server, mounter):
    # beta goes through the proxy, which counts what its revalidation costs.
    a, b = two_machines(s3_bucket, mounter, b_endpoint=s3_proxy.url)
    client = moto_server.client()
    with logs_on_failure(a, b):
        live = a.path / "live"
        live.mkdir()
        (live / "f.txt").write_bytes(b"one\n")
        (a.path / "other.txt").write_bytes(b"other\n")
        idle(a)
        root = parse_manifest(client.get_object(
            Bucket=s3_bucket.bucket, Key=f"{s3_bucket.prefix}/{manifest_key('root')}")["Body"]
            .read(), "root")[0]
        live_id = root.entries[b"live"]
        assert isinstance(live_id, DirEntry)
        key = f"{s3_bucket.prefix}/{manifest_key(live_id.id)}"
        bl = b.path / "live"
        until("the tree on beta", lambda: (bl / "f.txt").read_bytes() == b"one\n"
              and sorted(os.listdir(b.path)) == ["live", "other.txt"])
        assert os.stat(bl / "f.txt").st_size == 4

        def etag() -> str:
            return client.head_object(Bucket=s3_bucket.bucket, Key=key)["ETag"]

        delays: dict[str, float] = {}

        def measure(what: str, change: Callable[[], None], visible: Callable[[], bool]) -> None:
            before = etag()
            change()
            until(f"{what} in the bucket", lambda: etag() != before)
            t0 = time.monotonic()
            until(f"{what} on beta", visible, timeout=REFRESH + MARGIN + 10)
            delays[what] = time.monotonic() - t0

        # Only stat/open here (no readdir, which revalidates on its own): the refresher
        # and the kernel invalidation must do the work.
        measure("a new file", lambda: (live / "g.txt").write_bytes(b"gee\n" * 3),
                lambda: os.stat(bl / "g.txt").st_size == 12)
        measure("new content", lambda: (live / "f.txt").write_bytes(b"two, longer\n"),
                lambda: (bl / "f.txt").read_bytes() == b"two, longer\n"
                and os.stat(bl / "f.txt").st_size == 12)
        # Same size and, as `cp -p` or `rsync -t` leave it, the same mtime: nothing in the
        # attributes tells beta's kernel its cached pages are stale; the invalidations do.
        assert (bl / "f.txt").read_bytes() == b"two, longer\n"  # pages cached on beta

        def same_size_same_mtime() -> None:
            mtime = os.stat(live / "f.txt").st_mtime_ns
            (live / "f.txt").write_bytes(b"TWO, LONGER\n")
            os.utime(live / "f.txt", ns=(mtime, mtime))

        measure("same-size content", same_size_same_mtime,
                lambda: (bl / "f.txt").read_bytes() == b"TWO, LONGER\n")
        measure("a rename", lambda: os.rename(live / "g.txt", live / "h.txt"),
                lambda: gone(bl / "g.txt") and os.stat(bl / "h.txt").st_size == 12)
        measure("a delete", lambda: os.unlink(live / "f.txt"), lambda: gone(bl / "f.txt"))
        assert os.listdir(bl) == ["h.txt"]
        assert (bl / "h.txt").read_bytes() == b"gee\n" * 3
        print("seen on beta after (s):", {k: round(v, 2) for k, v in delays.items()})
        slow = {k: round(v, 2) for k, v in delays.items() if v > REFRESH + MARGIN}
        assert not slow, f"seen later than --refresh {REFRESH} + {MARGIN} s: {slow}"

        # An unchanged tree costs one conditional GET per directory per period, answered
        # 304 without a body.
        s3_proxy.reset_counts()
        until("a few revalidation rounds", lambda: s3_proxy.count("GET", path=r"/dirs/") >= 6)
        seen = s3_proxy.requests
        manifest_gets = [r for r in seen if r.method == "GET" and "/dirs/" in r.path]
        assert manifest_gets and all(r.status == 304 for r in manifest_gets), seen
        assert all(r.method == "GET" and "/dirs/" in r.path for r in seen), seen


def test_remote_delete_of_an_open_file_keeps_it_readable(s3_bucket, mounter):
    """A reader on beta keeps its bytes when alpha deletes the file, and the name goes."""
    a, b = two_machines(s3_bucket, mounter)
    with logs_on_failure(a, b):
        data = content("keep", 1, 2 * 1024 * 1024)
        (a.path / "doomed.bin").write_bytes(data)
        idle(a)
        until("the file on beta", lambda: (b.path / "doomed.bin").exists())
        with open(b.path / "doomed.bin", "rb", buffering=0) as reader:
            first = reader.read(4096)
            os.unlink(a.path / "doomed.bin")
            idle(a)
            until("the delete on beta", lambda: gone(b.path / "doomed.bin"))
            with pytest.raises(OSError) as exc:
                open(b.path / "doomed.bin", "rb")
            assert exc.value.errno == errno.ENOENT
            rest = reader.read()
        assert first + rest == data
        assert os.listdir(b.path) == []


def test_a_machine_mounting_again_revalidates_what_it_cached_before_using_it(
        s3_bucket, mounter):
    a, b = two_machines(s3_bucket, mounter)
    with logs_on_failure(a, b):
        (a.path / "d").mkdir()
        (a.path / "d" / "old.txt").write_bytes(b"old\n")
        idle(a)
        until("the folder on beta", lambda: (b.path / "d" / "old.txt").read_bytes() == b"old\n")
        b.unmount()
        os.unlink(a.path / "d" / "old.txt")
        (a.path / "d" / "new.txt").write_bytes(b"new\n")
        idle(a)
    # Beta comes back an hour later (its cached manifests say so) with --refresh 60: its
    # refresher would look only after 15 s, so the first use itself must revalidate.
    (db_path,) = b.cache_dir.glob("repos/*/state.db")
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE manifests SET checked = checked - 3600")
    db.close()
    b2 = mounter(s3_bucket.url, "--refresh", "60", name="beta-again", cache_dir=b.cache_dir,
                 endpoint_url=s3_bucket.endpoint_url)
    with logs_on_failure(a, b2):
        assert (b2.path / "d" / "new.txt").read_bytes() == b"new\n"
        assert gone(b2.path / "d" / "old.txt")
        assert os.listdir(b2.path / "d") == ["new.txt"]
