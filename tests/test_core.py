"""The repository core without FUSE against file:// and moto over HTTP.

The engine (fsrepo/engine.py: the very assembly a mount runs) is driven through the calls
the FUSE layer makes (FileManager.create/write/flush/release, Namespace.mkdir/remove);
separate writers are separate processes (tests/core_worker.py) with their own local state.
On s3, every request goes through the counting proxy (tests/s3proxy.py), so uploads and
manifest writes are counted as the server saw them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from fsrepo.errors import FsError
from fsrepo.inodes import ROOT_INO
from fsrepo.manifest import DirEntry, FileEntry, Manifest, serialise_manifest
from fsrepo.repository import DESCRIPTOR_KEY, blob_key, manifest_key
from testservers.moto import MotoServer
from testservers.s3proxy import S3Proxy

from .core_worker import content
from .coreutil import (
    list_dir,
    makedirs,
    overwrite_file,
    read_file,
    remove,
    resolve,
    running_engine,
    start_uploader,
    write_file,
)
from .mountutil import force_unmount, run_cli

WORKER = Path(__file__).resolve().parent / "core_worker.py"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the two backends, seen from outside imgrepo ---------------------------------------------
@dataclass
class Backend:
    kind: str
    url: str
    endpoint_url: str | None = None
    proxy: S3Proxy | None = None
    root: Path | None = None  # file://
    moto: MotoServer | None = None  # s3://
    bucket: str = ""
    prefix: str = ""

    def objects(self, under: str = "") -> dict[str, bytes]:
        """Every object (key relative to the repository) with its bytes, read directly."""
        if self.root is not None:
            out = {}
            if self.root.exists():
                for path in sorted(self.root.rglob("*")):
                    key = path.relative_to(self.root).as_posix()
                    if path.is_file() and key.startswith(under) and not _local_scratch(key):
                        out[key] = path.read_bytes()
            return out
        assert self.moto is not None
        client = self.moto.client()
        try:
            out = {}
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/{under}")
            for page in pages:
                for obj in page.get("Contents") or ():
                    body = client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                    out[obj["Key"][len(self.prefix) + 1:]] = body
            return out
        finally:
            client.close()

    def put_raw(self, key: str, data: bytes) -> None:
        """Change an object behind imgrepo's back."""
        if self.root is not None:
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return
        assert self.moto is not None
        client = self.moto.client()
        try:
            client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)
        finally:
            client.close()

    def count(self, method: str, path: str) -> int | None:
        """Requests the server saw (None on file://: there is no server)."""
        return None if self.proxy is None else self.proxy.count(method, path=path)


def _local_scratch(key: str) -> bool:
    """The file:// backend's own temporary and lock files are not objects."""
    return any(part.startswith(".") for part in key.split("/")) or key.endswith((".lock", ".tmp"))


def unchanged(before: dict[str, bytes], after: dict[str, bytes]) -> bool:
    """Nothing was changed or removed, and nothing but blobs (immutable, named by their
    content, referenced by nothing yet) was added."""
    added = set(after) - set(before)
    return all(after.get(k) == v for k, v in before.items()) and \
        all(k.startswith("blobs/") for k in added)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        root = tmp_path / "repository"
        return Backend("file", f"file://{root}", root=root)
    bucket = request.getfixturevalue("s3_bucket")
    proxy = request.getfixturevalue("s3_proxy")
    return Backend("s3", bucket.url, proxy.url, proxy=proxy,
                   moto=request.getfixturevalue("moto_server"), bucket=bucket.bucket,
                   prefix=bucket.prefix)


def engine(backend: Backend, cache: Path, **kw):  # noqa: ANN201
    return running_engine(backend.url, backend.endpoint_url, cache, **kw)


def blob_keys(backend: Backend) -> set[str]:
    return set(backend.objects("blobs/"))


# -- workers in separate processes ---------------------------------------------------------------
class Worker:
    def __init__(self, backend: Backend, cache: Path, *args: str, host: str | None = None):
        cmd = [sys.executable, str(WORKER), "--storage", backend.url, "--cache", str(cache)]
        if backend.endpoint_url:
            cmd += ["--endpoint-url", backend.endpoint_url]
        if host:
            cmd += ["--host", host]
        self.stderr_path = cache.parent / f"{cache.name}-worker.stderr"
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*cmd, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._pending = b""  # read from stdout, not yet a whole line

    def expect(self, prefix: str, timeout: float = 120) -> str:
        """Read stdout lines until one starts with `prefix`. Lines are cut here from raw
        reads: a buffered readline() after select() may take several lines into its buffer,
        and select() never reports the ones left there (the wait then missed lines the
        worker had printed)."""
        import selectors
        import time
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        try:
            while True:
                while b"\n" not in self._pending:
                    left = deadline - time.monotonic()
                    if left <= 0 or not sel.select(left):
                        raise AssertionError(f"worker: no {prefix!r} in time:\n"
                                             f"{self.diagnose()}")
                    data = os.read(fd, 65536)
                    if not data:
                        raise AssertionError(f"worker exited ({self.proc.wait()}) before "
                                             f"{prefix!r}:\n{self.diagnose()}")
                    self._pending += data
                raw, _, self._pending = self._pending.partition(b"\n")
                line = raw.decode()
                self.lines.append(line)
                if line.startswith(prefix):
                    return line
        finally:
            sel.close()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def finish(self) -> None:
        assert self.proc.wait(timeout=60) == 0, self.diagnose()
        assert "Traceback" not in self.stderr_path.read_text(errors="replace")

    def diagnose(self) -> str:
        self._err.flush()
        return "\n".join(self.lines) + "\n--- stderr ---\n" + \
            self.stderr_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._err.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


# -- dedup ------------------------------------------------------------------------------------------
def test_same_content_under_1000_names_is_one_blob_and_one_upload(backend, tmp_path):
    data = os.urandom(64 * 1024)

    async def main():
        async with engine(backend, tmp_path / "a") as eng:
            for d in range(4):
                parent = await makedirs(eng, f"dir{d}")
                for i in range(250):
                    await write_file(eng, f"dir{d}/copy-{i}.jpg", data, parent=parent)
            await eng.uploader.wait_idle()
            assert eng.uploader.status.uploaded_blobs == 1
        assert blob_keys(backend) == {blob_key(sha(data))}
        assert backend.count("PUT", "/blobs/") in (None, 1)
        # Another machine storing the same bytes again costs no upload at all.
        async with engine(backend, tmp_path / "b") as other:
            await write_file(other, "elsewhere/again.jpg", data)
            await other.uploader.wait_idle()
            assert other.uploader.status.uploaded_blobs == 0
        assert blob_keys(backend) == {blob_key(sha(data))}
        assert backend.count("PUT", "/blobs/") in (None, 1)
        async with engine(backend, tmp_path / "fresh") as fresh:
            for d in range(4):
                assert len(await list_dir(fresh, f"dir{d}")) == 250
            assert await read_file(fresh, "dir3/copy-249.jpg") == data
            assert await read_file(fresh, "elsewhere/again.jpg") == data
    trio.run(main)


def test_an_empty_file_uploads_the_empty_blob_only_when_it_stays_empty(backend, tmp_path):
    async def main():
        async with engine(backend, tmp_path / "a") as eng:
            await write_file(eng, "full.txt", b"content")
            await eng.uploader.wait_idle()
            assert blob_keys(backend) == {blob_key(sha(b"content"))}
            await write_file(eng, "empty.txt", b"")
            await eng.uploader.wait_idle()
        assert blob_keys(backend) == {blob_key(sha(b"content")), blob_key(sha(b""))}
        async with engine(backend, tmp_path / "fresh") as fresh:
            assert await read_file(fresh, "empty.txt") == b""
            assert (await list_dir(fresh))[b"empty.txt"].size == 0
    trio.run(main)


# -- batching ---------------------------------------------------------------------------------------
def test_200_creates_in_one_directory_take_few_manifest_writes(backend, tmp_path):
    async def main():
        async with engine(backend, tmp_path / "a") as eng:
            parent = await makedirs(eng, "photos")
            for i in range(200):
                await write_file(eng, f"photos/img{i:03d}.jpg", os.urandom(2000) + b"%d" % i,
                                 parent=parent)
            await eng.uploader.wait_idle()
            commits = eng.uploader.status.commits
            photos_id = (await resolve(eng, "photos"))[0].dir_id
        assert commits <= 10, commits
        writes = backend.count("PUT", f"/dirs/{photos_id}")
        assert writes is None or 1 <= writes <= 10, writes
        assert backend.count("PUT", "/blobs/") in (None, 200)
        async with engine(backend, tmp_path / "fresh") as fresh:
            assert len(await list_dir(fresh, "photos")) == 200
    trio.run(main)


# -- concurrent writers ---------------------------------------------------------------------
def _shared_dir(backend: Backend, tmp_path: Path, name: str = "shared") -> None:
    async def main():
        async with engine(backend, tmp_path / "setup") as eng:
            await makedirs(eng, name)
            await eng.uploader.wait_idle()
    trio.run(main)


def test_two_writer_processes_add_500_names_each_to_one_directory(backend, tmp_path, workers):
    _shared_dir(backend, tmp_path)
    for label in ("A", "B"):
        workers.append(Worker(backend, tmp_path / f"cache-{label}", "write", "--dir", "shared",
                              "--prefix", f"{label}-", "--count", "500", "--label", label,
                              "--go", host=f"host{label}"))
    for w in workers:
        w.expect("ready")
    for w in workers:
        w.go()
    for w in workers:
        w.expect("idle", timeout=180)
        w.finish()
    expected = {f"{label}-{i:04d}".encode(): content(label, f"{label}-{i:04d}")
                for label in ("A", "B") for i in range(500)}

    async def main():
        async with engine(backend, tmp_path / "fresh") as fresh:
            entries = await list_dir(fresh, "shared")
            assert set(entries) == set(expected)
            for name, entry in entries.items():
                assert isinstance(entry, FileEntry) and entry.sha256 == sha(expected[name])
            assert await read_file(fresh, "shared/B-0499") == expected[b"B-0499"]
    trio.run(main)
    assert blob_keys(backend) == {blob_key(sha(d)) for d in expected.values()}


def test_two_writer_processes_writing_the_same_name_keep_both(backend, tmp_path, workers):
    _shared_dir(backend, tmp_path)
    for label in ("A", "B"):
        workers.append(Worker(backend, tmp_path / f"cache-{label}", "write", "--dir", "shared",
                              "--names", f"same.txt,only-{label}.txt", "--label", label,
                              "--upload", "after", "--go", host=f"host{label}"))
    for w in workers:
        w.expect("ready")
    for w in workers:  # both write before either uploads: a true concurrent edit
        w.go()
    for w in workers:
        w.expect("acked 2")
    for w in workers:
        w.go()
    conflicts = 0
    for w in workers:
        conflicts += json.loads(w.expect("idle").split(" ", 1)[1])["conflicts"]
        w.finish()
    assert conflicts == 1

    async def main():
        async with engine(backend, tmp_path / "fresh") as fresh:
            entries = await list_dir(fresh, "shared")
            copies = [n for n in entries if n.startswith(b"same (conflict host")]
            assert len(copies) == 1 and copies[0].endswith(b").txt")
            assert set(entries) == {b"same.txt", b"only-A.txt", b"only-B.txt", copies[0]}
            got = {await read_file(fresh, b"shared/same.txt"),
                   await read_file(fresh, b"shared/" + copies[0])}
            assert got == {content("A", "same.txt"), content("B", "same.txt")}
            loser = copies[0].split(b" ")[2].decode()  # "(conflict hostX <date> <time>).txt"
            assert await read_file(fresh, b"shared/" + copies[0]) == \
                content(loser[-1], "same.txt")
    trio.run(main)


@pytest.mark.expected_logs(r"conflict: /\S* was changed on another machine", reason="both engines edit the "
                           "same names on purpose: each conflict copy is announced")
def test_412_merges_both_engines_changes(backend, tmp_path):
    """Two engines with separate state change one directory from the same starting point;
    the second to commit meets 412, re-reads and re-applies its ops."""
    v1, va, vb = b"version 1", b"version A", b"version B"

    async def main():
        async with engine(backend, tmp_path / "setup") as eng:
            for name in ("keep.txt", "edit-vs-delete.txt", "both-edit.txt"):
                await write_file(eng, name, v1)
            await eng.uploader.wait_idle()
        async with engine(backend, tmp_path / "a", upload=False, host="hostA") as a, \
                engine(backend, tmp_path / "b", upload=False, host="hostB") as b:
            for i in range(30):
                await write_file(a, f"a{i}", b"a%d" % i)
                await write_file(b, f"b{i}", b"b%d" % i)
            await remove(a, "edit-vs-delete.txt")
            await overwrite_file(b, "edit-vs-delete.txt", vb)
            await overwrite_file(a, "both-edit.txt", va)
            await overwrite_file(b, "both-edit.txt", vb)
            await write_file(a, "new.txt", va)
            await write_file(b, "new.txt", vb)
            start_uploader(a)
            await a.uploader.wait_idle()
            assert a.uploader.status.conflicts == 0
            start_uploader(b)
            await b.uploader.wait_idle()
            assert b.uploader.status.conflicts == 2
            # b's view is the merged manifest; a sees it after revalidating
            await a.ns.views.revalidate("root")
            assert set(await list_dir(a)) == set(await list_dir(b))
        async with engine(backend, tmp_path / "fresh") as fresh:
            entries = await list_dir(fresh)
            names = set(entries)
            assert {f"a{i}".encode() for i in range(30)} <= names
            assert {f"b{i}".encode() for i in range(30)} <= names
            assert await read_file(fresh, "keep.txt") == v1
            assert await read_file(fresh, "edit-vs-delete.txt") == vb  # an edit beats a delete
            assert await read_file(fresh, "both-edit.txt") == va  # first committed keeps it
            assert await read_file(fresh, "new.txt") == va
            copies = sorted(n for n in names if b"(conflict hostB " in n)
            assert [c.split(b" (")[0] for c in copies] == [b"both-edit", b"new"]
            for c in copies:
                assert c.endswith(b".txt") and await read_file(fresh, c) == vb
            assert len(names) == 60 + 3 + 1 + 2
    trio.run(main)
    if backend.proxy is not None:
        assert any(s.status == 412 and s.method == "PUT" and "/dirs/root" in s.path
                   for s in backend.proxy.requests)


@pytest.mark.expected_logs(r"conflict: /both\.txt was changed on another machine",
                           reason="both engines write both.txt on purpose")
def test_a_conflict_is_counted_while_another_folder_commits(backend, tmp_path):
    """The conflict counter adds what a commit returns once it has returned: a commit of
    another folder that started earlier and ends later must not write back its older
    figure over the copy counted meanwhile (--status showed 0 conflicts and one copy)."""

    async def main():
        async with engine(backend, tmp_path / "setup") as eng:
            await makedirs(eng, "album")
            await eng.uploader.wait_idle()
        async with engine(backend, tmp_path / "a", upload=False, host="hostA") as a, \
                engine(backend, tmp_path / "b", upload=False, host="hostB") as b:
            await list_dir(b)  # B's view of the root is from before A's write
            await write_file(a, "both.txt", b"A")
            start_uploader(a)
            await a.uploader.wait_idle()
            await write_file(b, "both.txt", b"B")
            await write_file(b, "album/photo.jpg", b"photo")
            album = (await resolve(b, "album"))[1].id
            commit = b.uploader.manifests.commit
            album_started, root_done = trio.Event(), trio.Event()

            async def ordered(dir_id, batch):  # album's commit spans root's
                if dir_id == album:
                    album_started.set()
                    await root_done.wait()
                    return await commit(dir_id, batch)
                await album_started.wait()
                try:
                    return await commit(dir_id, batch)
                finally:
                    root_done.set()

            b.uploader.manifests.commit = ordered
            start_uploader(b)
            with trio.fail_after(120):
                await b.uploader.wait_idle()
            assert b.uploader.status.conflicts == 1
            assert len(b.uploader.manifests.conflict_copies) == 1
            assert b"photo.jpg" in await list_dir(b, "album")
    trio.run(main)


# -- crash -------------------------------------------------------------------------------------------
def test_killed_after_acknowledging_a_new_process_finishes_the_upload(backend, tmp_path,
                                                                     workers):
    _shared_dir(backend, tmp_path, "in")
    before = backend.objects()
    if backend.proxy is not None:
        # the uploader runs, but every write to the bucket fails: killed mid-retry
        backend.proxy.inject(method="PUT", status=503, times=None)
        mode = "during"
    else:
        mode = "never"
    w = Worker(backend, tmp_path / "cache", "write", "--dir", "in", "--prefix", "f",
               "--count", "60", "--size", "3000", "--each", "--upload", mode)
    workers.append(w)
    w.expect("acked 25")
    w.kill()  # SIGKILL while it keeps writing
    acked = max(int(line.split()[1]) for line in w.lines if line.startswith("acked"))
    assert acked >= 25
    assert backend.objects() == before  # nothing reached the bucket
    if backend.proxy is not None:
        backend.proxy.clear_faults()

    drain = Worker(backend, tmp_path / "cache", "drain")
    workers.append(drain)
    assert int(drain.expect("ready").split()[1]) >= acked
    drain.expect("idle")
    drain.finish()

    async def main():
        async with engine(backend, tmp_path / "fresh") as fresh:
            entries = await list_dir(fresh, "in")
            for i in range(acked):  # everything acknowledged is there, byte for byte
                name = f"f{i:04d}"
                assert await read_file(fresh, f"in/{name}") == content("w", name, 3000)
            for name in entries:  # a file not yet closed is whole or empty, never torn
                data = await read_file(fresh, b"in/" + name)
                assert data in (b"", content("w", name.decode(), 3000))
    trio.run(main)


@pytest.mark.expected_logs(r"was pending upload but its cache file is gone",
                           r"neither in the local cache nor in the bucket; dropping",
                           reason="the test deletes a pending blob on purpose: the loss and "
                           "the dropped change must be reported")
def test_a_blob_lost_from_the_cache_drops_only_the_changes_that_need_it(backend, tmp_path,
                                                                        caplog):
    """A crash between journaling a close and storing its blob (or a damaged cache) leaves
    ops naming a blob that is nowhere: they are dropped with an error, everything else in
    the directory still goes; a blob the bucket has meanwhile is not lost at all."""
    lost, elsewhere = b"never stored", b"uploaded by another machine"

    async def main():
        async with engine(backend, tmp_path / "a", upload=False) as eng:
            for name, data in (("keep1", b"1"), ("lost", lost), ("keep2", b"2"),
                               ("there", elsewhere)):
                await write_file(eng, f"d/{name}", data)
            paths = [eng.cache.path(sha(lost)), eng.cache.path(sha(elsewhere))]
        for path in paths:
            path.unlink()
        async with engine(backend, tmp_path / "b") as other:
            await write_file(other, "x/copy", elsewhere)
            await other.uploader.wait_idle()
        async with engine(backend, tmp_path / "a") as eng:
            with trio.fail_after(60):
                await eng.uploader.wait_idle()
        async with engine(backend, tmp_path / "fresh") as fresh:
            entries = await list_dir(fresh, "d")
            assert {b"keep1", b"keep2", b"there"} <= set(entries) <= \
                {b"keep1", b"keep2", b"there", b"lost"}
            assert await read_file(fresh, "d/there") == elsewhere
            assert await read_file(fresh, "d/keep2") == b"2"
            if b"lost" in entries:  # its name was journaled before its content: empty
                assert await read_file(fresh, "d/lost") == b""
    with caplog.at_level(logging.WARNING, logger="fsrepo"):
        trio.run(main)
    dropped = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(dropped) == 1 and "lost" in dropped[0], dropped
    assert blob_key(sha(lost)) not in blob_keys(backend)


@pytest.mark.expected_logs(r"in the local cache is damaged",
                           r"neither in the local cache nor in the bucket; dropping",
                           reason="the test tears a pending blob on purpose: the damage and "
                           "the dropped change must be reported")
def test_a_torn_pending_blob_from_an_earlier_run_is_never_uploaded(backend, tmp_path, caplog):
    """A power loss can tear a blob file whose close() never returned while its journal
    op survived. The next run hashes such leftovers before sending them: a torn one is
    dropped with an error and never reaches the bucket; an intact one is uploaded."""
    torn, intact = b"t" * 70_000, b"i" * 50_000

    async def main():
        async with engine(backend, tmp_path / "a", upload=False) as eng:
            await write_file(eng, "d/torn", torn)
            await write_file(eng, "d/intact", intact)
            torn_path = eng.cache.path(sha(torn))
        torn_path.write_bytes(torn[:1000] + b"\0" * (len(torn) - 1000))
        async with engine(backend, tmp_path / "a") as eng:
            with trio.fail_after(60):
                await eng.uploader.wait_idle()
        async with engine(backend, tmp_path / "fresh") as fresh:
            assert await read_file(fresh, "d/intact") == intact
            entries = await list_dir(fresh, "d")
            if b"torn" in entries:  # its name was journaled before its content: empty
                assert await read_file(fresh, "d/torn") == b""
    with caplog.at_level(logging.WARNING, logger="fsrepo"):
        trio.run(main)
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert blob_key(sha(torn)) not in blob_keys(backend)
    assert blob_key(sha(intact)) in blob_keys(backend)


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_killed_after_its_manifest_write_landed_the_replay_makes_no_conflicts(
        backend, tmp_path, workers):
    """The bucket took the manifest write but the writer died before it heard so: the new
    process re-applies the same ops onto its own write (412, merge) and must see them as
    already done, not as someone else's edit."""
    _shared_dir(backend, tmp_path, "in")
    assert backend.proxy is not None
    backend.proxy.inject(method="PUT", path="/dirs/", drop="after", times=None)
    w = Worker(backend, tmp_path / "cache", "write", "--dir", "in", "--prefix", "f",
               "--count", "20")
    workers.append(w)
    w.expect("acked 20")
    import time
    deadline = time.monotonic() + 60
    while not any(s.method == "PUT" and "/dirs/" in s.path and s.fault
                  for s in backend.proxy.requests):
        assert time.monotonic() < deadline, w.diagnose()
        time.sleep(0.05)
    w.kill()
    backend.proxy.clear_faults()
    landed = [k for k in backend.objects("dirs/") if k != "dirs/root.json"]
    assert landed  # the write did reach the bucket

    drain = Worker(backend, tmp_path / "cache", "drain")
    workers.append(drain)
    assert json.loads(drain.expect("idle").split(" ", 1)[1])["conflicts"] == 0
    drain.finish()

    async def main():
        async with engine(backend, tmp_path / "fresh") as fresh:
            entries = await list_dir(fresh, "in")
            assert set(entries) == {f"f{i:04d}".encode() for i in range(20)}
            for name in entries:
                assert await read_file(fresh, b"in/" + name) == content("w", name.decode())
    trio.run(main)


# -- integrity -------------------------------------------------------------------------------------
@pytest.mark.expected_logs(r"from the bucket is corrupt", reason="the test corrupts blobs "
                           "in the bucket on purpose; each refused download is reported")
def test_a_corrupted_blob_is_detected_and_never_served(backend, tmp_path, caplog):
    small, big = b"small and precious\n", os.urandom(1024 * 1024 + 5)

    async def main():
        async with engine(backend, tmp_path / "a") as eng:
            await write_file(eng, "small.txt", small)
            await write_file(eng, "big.bin", big)
            await eng.uploader.wait_idle()
        # Same sizes, different bytes: only the hash can tell.
        backend.put_raw(blob_key(sha(small)), b"X" + small[1:])
        backend.put_raw(blob_key(sha(big)), big[:-1] + bytes([big[-1] ^ 0xFF]))
        async with engine(backend, tmp_path / "reader") as eng:
            node, _ = await resolve(eng, "small.txt")
            handle = await eng.files.open(node, os.O_RDONLY)
            with pytest.raises(FsError) as exc:
                await eng.files.read(handle.fh, 0, 4096)  # not one byte of it
            assert exc.value.errno == errno.EIO
            with pytest.raises(FsError):  # and not later either
                await eng.files.read(handle.fh, 0, 4)
            await eng.files.release(handle.fh)
            for name in ("big.bin", "small.txt"):  # reopening fetches again, fails again
                with pytest.raises(FsError) as exc:
                    await read_file(eng, name)
                assert exc.value.errno == errno.EIO
            for blob in (small, big):
                assert not eng.cache.has(sha(blob))
                assert not eng.cache.path(sha(blob)).exists()
            # repaired behind our back: the same engine reads the right bytes
            backend.put_raw(blob_key(sha(small)), small)
            backend.put_raw(blob_key(sha(big)), big)
            assert await read_file(eng, "small.txt") == small
            assert await read_file(eng, "big.bin") == big
    with caplog.at_level(logging.ERROR, logger="fsrepo"):
        trio.run(main)
    corrupt = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert corrupt and all(r.exc_info is None and "\n" not in r.getMessage() for r in corrupt)


# -- names ---------------------------------------------------------------------------------------------
NAMES = [b"plain.txt", "日本語 ü.jpg".encode(), b"caf\xe9.jpg", b"\xff\xfe\xfd", b"\x80",
         b"new\nline", b" leading and trailing ", b"-rf", b"...", b"x" * 255, b"\\back\\slash",
         b'quote"s', b"\x01\x1f"]


def test_arbitrary_byte_names_round_trip_exactly(backend, tmp_path):
    async def main():
        async with engine(backend, tmp_path / "a") as eng:
            sub = await makedirs(eng, b"dir \xff")
            for name in NAMES:
                await write_file(eng, name, name)
                await write_file(eng, name, name[::-1], parent=sub)
            await eng.ns.symlink(ROOT_INO, b"link\xfe", b"dir \xff/\x80")
            await eng.uploader.wait_idle()
        async with engine(backend, tmp_path / "fresh") as fresh:
            root = await list_dir(fresh)
            assert set(root) == {*NAMES, b"dir \xff", b"link\xfe"}
            assert set(await list_dir(fresh, b"dir \xff")) == set(NAMES)
            for name in NAMES:
                assert await read_file(fresh, name) == name
                assert await read_file(fresh, b"dir \xff/" + name) == name[::-1]
            assert root[b"link\xfe"].target == b"dir \xff/\x80"
    trio.run(main)


BAD_NAMES = [(b".", errno.EINVAL), (b"..", errno.EINVAL), (b"a/b", errno.EINVAL),
             (b"../escape", errno.EINVAL), (b"nul\0", errno.EINVAL), (b"", errno.EINVAL),
             (b"x" * 256, errno.ENAMETOOLONG)]


def test_names_that_cannot_be_entries_are_refused(tmp_path):
    async def main():
        async with running_engine(f"file://{tmp_path}/repo", None, tmp_path / "c") as eng:
            await write_file(eng, "ok", b"ok")
            for name, code in BAD_NAMES:
                for fn, args in ((eng.files.create, (ROOT_INO, name, 0o644)),
                                 (eng.ns.mkdir, (ROOT_INO, name, 0o755)),
                                 (eng.ns.symlink, (ROOT_INO, name, b"target")),
                                 (eng.ns.rename, (ROOT_INO, b"ok", ROOT_INO, name))):
                    with pytest.raises(FsError) as exc:
                        await fn(*args)
                    assert exc.value.errno == code, name
            await eng.uploader.wait_idle()
        async with running_engine(f"file://{tmp_path}/repo", None, tmp_path / "f") as fresh:
            assert set(await list_dir(fresh)) == {b"ok"}
    trio.run(main)


@pytest.mark.expected_logs(r"refused entry", r"refused: it is one of the folders above it \(a cycle",
                           reason="the test writes a hostile manifest on purpose; each "
                           "refused entry is reported")
def test_manifest_entries_that_would_escape_the_tree_are_skipped(backend, tmp_path, caplog):
    good = b"good bytes"

    async def main():
        async with engine(backend, tmp_path / "a") as eng:
            await write_file(eng, "good.txt", good)
            await makedirs(eng, "sub")
            await eng.uploader.wait_idle()
            sub_id = (await resolve(eng, "sub"))[0].dir_id
        file_entry = {"type": "file", "sha256": sha(good), "size": len(good),
                      "mtime_ns": 0, "mode": 0o644}
        doc = {"imgrepo_manifest": 1, "dir_id": "root", "entries": {
            "good.txt": file_entry,
            "sub": {"type": "dir", "id": sub_id, "mtime_ns": 0},
            "..": file_entry, ".": file_entry, "a/b": file_entry, "../../etc": file_entry,
            "itself": {"type": "dir", "id": "root", "mtime_ns": 0},
            "up": {"type": "dir", "id": "../../x", "mtime_ns": 0},
        }, "raw_entries": {
            "Li4vZXNjYXBl": file_entry,  # b"../escape"
        }}
        backend.put_raw(manifest_key("root"), json.dumps(doc).encode())
        # a directory listing its own ancestor: a cycle
        backend.put_raw(manifest_key(sub_id), serialise_manifest(Manifest(sub_id, {
            b"loop": DirEntry(sub_id, 0), b"fine": FileEntry(sha(good), len(good), 0)})))
        async with engine(backend, tmp_path / "fresh") as fresh:
            assert set(await list_dir(fresh)) == {b"good.txt", b"sub"}
            assert await read_file(fresh, "good.txt") == good
            for bad in (b"..", b".", b"../../etc", b"itself", b"up"):
                with pytest.raises(FsError):
                    await fresh.ns.lookup(ROOT_INO, bad)
            with pytest.raises(FsError) as exc:
                await resolve(fresh, "sub/loop")
            assert exc.value.errno == errno.EIO
            assert await read_file(fresh, "sub/fine") == good
    with caplog.at_level(logging.WARNING, logger="fsrepo"):
        trio.run(main)
    refused = [r.getMessage() for r in caplog.records if "refused entry" in r.getMessage()]
    assert len(set(refused)) == 7, refused


# -- bad input: a malformed manifest ---------------------------------------------------------
MALFORMED = {
    "not-json": b"{this is not json",
    "unknown-version": json.dumps({"imgrepo_manifest": 99, "dir_id": "DIR",
                                   "entries": {}}).encode(),
    "wrong-dir": json.dumps({"imgrepo_manifest": 1, "dir_id": "someone-else",
                             "entries": {}}).encode(),
}


@pytest.mark.parametrize("backend,case", [("file", "not-json"), ("s3", "not-json"),
                                          ("s3", "unknown-version"), ("s3", "wrong-dir")],
                         indirect=["backend"])
@pytest.mark.expected_logs(r"manifest of directory \w+ (is not valid JSON|has unsupported "
                           r"format|claims to be)", r"update of directory \w+ failed",
                           reason="the test damages a manifest on purpose: reading it is an "
                           "error, and committing onto it fails and is retried")
def test_a_malformed_manifest_is_an_error_and_changes_nothing(backend, tmp_path, caplog, case):
    body = MALFORMED[case]

    async def main():
        async with engine(backend, tmp_path / "a") as eng:
            await write_file(eng, "top.txt", b"top")
            await write_file(eng, "sub/inside.txt", b"inside")
            await eng.uploader.wait_idle()
            sub_id = (await resolve(eng, "sub"))[0].dir_id
        # An engine that already knows `sub` has a change pending for it when it breaks.
        async with engine(backend, tmp_path / "a", upload=False) as eng:
            await write_file(eng, "sub/pending.txt", b"pending")
            backend.put_raw(manifest_key(sub_id), body.replace(b"DIR", sub_id.encode()))
            before = backend.objects()
            start_uploader(eng)
            with trio.fail_after(30):
                while "manifest" not in (eng.uploader.status.last_error or ""):
                    await trio.sleep(0.05)
            # kept, to be retried
            assert {p.op.name for p in eng.journal.by_seq.values()} == {b"pending.txt"}
            assert unchanged(before, backend.objects())
        # A new machine: the broken directory reads as an I/O error, the rest works.
        async with engine(backend, tmp_path / "fresh") as fresh:
            with pytest.raises(FsError) as exc:
                await list_dir(fresh, "sub")
            assert exc.value.errno == errno.EIO
            with pytest.raises(FsError):
                await write_file(fresh, "sub/new.txt", b"x")
            assert await read_file(fresh, "top.txt") == b"top"
            await fresh.uploader.wait_idle()
        assert unchanged(before, backend.objects())
    with caplog.at_level(logging.WARNING, logger="fsrepo"):
        trio.run(main)
    about = [r for r in caplog.records if "manifest of directory" in r.getMessage()]
    assert about and all(r.exc_info is None and "\n" not in r.getMessage() for r in about)


# -- bad input at the command line: one line, no traceback, nothing changed -----------------
def _assert_one_line_error(res: subprocess.CompletedProcess, *says: str) -> None:
    """Exit non-zero with one line on stderr that contains one of `says`."""
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("imgrepo-mount: error: "), lines[0]
    assert any(s in lines[0] for s in says), lines[0]
    assert "Traceback" not in res.stderr + res.stdout


def _mount_fails(mount_env: dict, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    try:
        return run_cli([str(mnt), *args, "--cache-dir", str(tmp_path / "cache")], mount_env,
                       check=False, timeout=120)
    finally:
        mounted = os.path.ismount(mnt)
        force_unmount(mnt)
        assert not mounted, "the mount should have been refused"


DESCRIPTORS = {
    "newer-format": (json.dumps({"format": "imgrepo", "version": 7, "hash": "sha256",
                                 "repo_id": "x"}).encode(), "newer imgrepo"),
    "not-json": (b"\x00garbage", "not valid JSON"),
    "foreign": (json.dumps({"format": "borg"}).encode(), "not describe an imgrepo"),
}


@pytest.mark.parametrize("backend,case", [("file", "not-json"), ("file", "newer-format"),
                                          ("s3", "newer-format"), ("s3", "foreign")],
                         indirect=["backend"])
def test_mount_refuses_a_bad_descriptor(backend, tmp_path, mount_env, case):
    body, says = DESCRIPTORS[case]
    backend.put_raw(DESCRIPTOR_KEY, body)
    backend.put_raw("dirs/root.json", b"left alone")
    before = backend.objects()
    args = ["--storage", backend.url]
    if backend.endpoint_url:
        args += ["--endpoint-url", backend.endpoint_url]
    _assert_one_line_error(_mount_fails(mount_env, tmp_path, *args), says)
    assert backend.objects() == before


@pytest.mark.parametrize("backend", ["s3"], indirect=True)
def test_mount_refuses_a_location_holding_other_data(backend, tmp_path, mount_env):
    backend.put_raw("photos/2024/cat.jpg", b"meow")
    before = backend.objects()
    args = ["--storage", backend.url]
    if backend.endpoint_url:
        args += ["--endpoint-url", backend.endpoint_url]
    _assert_one_line_error(_mount_fails(mount_env, tmp_path, *args), "already holds data")
    assert backend.objects() == before


def test_mount_with_an_unreachable_endpoint(tmp_path, mount_env):
    res = _mount_fails(mount_env, tmp_path, "--storage", "s3://somebucket/repo",
                       "--endpoint-url", "http://127.0.0.1:1")  # never a test server's port
    _assert_one_line_error(res, "unreachable", "cannot reach")


def test_mount_with_a_missing_bucket(moto_server, tmp_path, mount_env):
    res = _mount_fails(mount_env, tmp_path, "--storage", "s3://no-such-bucket-here/repo",
                       "--endpoint-url", moto_server.url)
    _assert_one_line_error(res, "no-such-bucket-here")
    client = moto_server.client()
    try:
        names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    finally:
        client.close()
    assert "no-such-bucket-here" not in names  # not created behind the user's back


def test_mount_with_wrong_credentials(private_moto_server, tmp_path, mount_env):
    private_moto_server.create_bucket("guarded-bucket")
    client = private_moto_server.client()
    client.put_object(Bucket="guarded-bucket", Key="repo/x", Body=b"x")
    private_moto_server.enable_auth()
    try:
        res = _mount_fails(mount_env, tmp_path, "--storage", "s3://guarded-bucket/repo",
                           "--endpoint-url", private_moto_server.url)
    finally:
        private_moto_server.disable_auth()
    _assert_one_line_error(res, "guarded-bucket")
    assert re.search(r"credential|denied|access|login", res.stderr, re.IGNORECASE), res.stderr
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="guarded-bucket")["Contents"]]
    client.close()
    assert keys == ["repo/x"]


def test_a_bad_config_file_is_one_line(tmp_path, mount_env):
    cfg = tmp_path / "config.toml"
    cfg.write_bytes(b"storage = [\xff")
    env = {**mount_env, "IMGREPO_CONFIG": str(cfg)}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli([str(mnt)], env, check=False)
    _assert_one_line_error(res, str(cfg))
    assert not os.path.ismount(mnt)
