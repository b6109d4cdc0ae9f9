"""`--sync`, `--status` and offline use, through real mounts on moto's S3 server mode.

The mount under test talks to moto through the test proxy (tests/s3proxy.py): pausing the
proxy is a network outage that keeps moto's data. Repositories are filled by a second mount
that talks to moto directly, so the mount under test starts with an empty cache.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pty
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio

from fsrepo.connectivity import GuardedStore
from fsrepo.errors import StorageOffline, StorageUnavailable
from fsrepo.store.base import Store, StoredObject

from .mountutil import CLI, REPO_ROOT, poll, run_cli

KiB = 1024




def make_tree(seed: int, files: int, dirs: int, min_size: int, max_size: int,
              duplicates: int = 0) -> dict[str, bytes]:
    """relpath -> content; the last `duplicates` files repeat earlier contents."""
    rng = random.Random(seed)
    tree: dict[str, bytes] = {}
    contents: list[bytes] = []
    for i in range(files):
        folder = f"d{i % dirs:02d}/sub{i % 3}" if dirs else ""
        name = f"{folder}/f{i:04d}.bin" if folder else f"f{i:04d}.bin"
        if i >= files - duplicates:
            data = contents[i % len(contents)]
        else:
            data = rng.randbytes(rng.randint(min_size, max_size))
            contents.append(data)
        tree[name] = data
    return tree


def write_tree(root: Path, tree: dict[str, bytes]) -> None:
    for rel, data in tree.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def unique(tree: dict[str, bytes]) -> dict[str, int]:
    return {hashlib.sha256(d).hexdigest(): len(d) for d in tree.values()}


def seed_repository(mounter, url: str, endpoint: str | None, tree: dict[str, bytes]) -> None:  # noqa: ANN001
    """Fill a repository through a mount of its own (cache and mountpoint apart)."""
    writer = mounter(url, endpoint_url=endpoint, name="writer")
    write_tree(writer.path, tree)
    writer.unmount()


def blob_gets(proxy) -> list:  # noqa: ANN001
    return [r for r in proxy.requests if r.method == "GET" and "/blobs/" in r.path]


def test_sync_then_everything_reads_with_the_storage_gone(s3_bucket, s3_proxy, mounter):
    tree = make_tree(seed=1, files=240, dirs=6, min_size=0, max_size=12 * KiB, duplicates=20)
    blobs = unique(tree)
    seed_repository(mounter, s3_bucket.url, s3_bucket.endpoint_url, tree)

    m = mounter(s3_bucket.url, "--refresh", "1", endpoint_url=s3_proxy.url)
    s3_proxy.reset_counts()
    res = run_cli(["--sync", str(m.path)], m.env)
    nonempty = {sha: size for sha, size in blobs.items() if size}
    assert f"fetched {len(blobs)} files" in res.stdout, res.stdout + res.stderr
    assert f"all {len(tree)} files are in the local cache" in res.stdout
    assert "to fetch" in res.stderr  # plain lines when stderr is not a terminal
    # Every blob exactly once (the empty blob needs no request), every one a success.
    gets = blob_gets(s3_proxy)
    assert sorted(r.path.rsplit("/", 1)[1] for r in gets) == sorted(nonempty)
    assert all(r.status in (200, 206) for r in gets)

    st = m.status()
    assert st["online"] is True
    assert st["cache_used"] == sum(blobs.values())
    assert st["cache_used"] <= st["cache_limit"]
    assert st["repository_files"] == len(tree)
    assert st["repository_bytes"] == sum(len(d) for d in tree.values())
    assert st["repository_unique_bytes"] == sum(blobs.values())
    assert st["pending_files"] == st["pending_ops"] == st["pending_bytes"] == 0
    assert st["syncs_running"] == 0 and st["downloads_in_flight"] == 0

    # A second sync has nothing to do and downloads nothing.
    res = run_cli(["--sync", str(m.path)], m.env)
    assert "fetched 0 files" in res.stdout
    assert len(blob_gets(s3_proxy)) == len(nonempty)

    # The storage goes away. The mount notices (its refresher revalidates every second)...
    paused_at = time.time()
    s3_proxy.pause()
    st = poll(lambda: (s := m.status())["online"] is False and s, what="offline status")
    assert paused_at - 1 <= st["offline_since"] <= time.time()
    assert "UNREACHABLE" in run_cli(["--status", str(m.path)], m.env).stdout

    # ... and the whole tree browses and reads back intact, from the cache alone.
    seen = {}
    for dirpath, _dirs, names in os.walk(m.path):
        for name in names:
            full = Path(dirpath) / name
            seen[str(full.relative_to(m.path))] = full.read_bytes()
    assert seen.keys() == tree.keys()
    assert all(seen[k] == tree[k] for k in tree)

    # A sync while offline says why it cannot run, in one line.
    res = run_cli(["--sync", str(m.path)], m.env, check=False)
    assert res.returncode == 1
    assert "unreachable" in res.stderr and "Traceback" not in res.stderr

    s3_proxy.resume()
    poll(lambda: m.status()["online"], what="back online")


def _read_pty(fd: int, sink: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        sink += chunk


def test_interrupted_sync_resumes_and_downloads_nothing_twice(s3_bucket, s3_proxy, mounter):
    tree = make_tree(seed=2, files=48, dirs=3, min_size=64 * KiB, max_size=128 * KiB)
    blobs = unique(tree)
    seed_repository(mounter, s3_bucket.url, s3_bucket.endpoint_url, tree)
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url)
    s3_proxy.reset_counts()
    # Slow downloads, so that Ctrl-C lands half way (at 0.5 s a GET the whole sync took ~3 s,
    # and a loaded machine once delivered the Ctrl-C after its end).
    s3_proxy.inject(method="GET", path=r"/blobs/", delay=1.5, times=None)

    # Ctrl-C from a terminal: the client shows a progress bar there.
    master, slave = pty.openpty()
    out = bytearray()
    proc = subprocess.Popen([*CLI, "--sync", str(m.path)], env=m.env, cwd=REPO_ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    reader = threading.Thread(target=_read_pty, args=(master, out), daemon=True)
    reader.start()
    try:
        poll(lambda: len(blob_gets(s3_proxy)) >= 12, what="a quarter of the downloads")
        poll(lambda: b"left" in out, what="the progress bar")
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 130, text
    assert "\r\x1b[K" in text and "files," in text and "/s," in text  # the bar
    assert "interrupted" in text and "again to continue" in text
    assert "Traceback" not in text

    # The mount stops the sync: in-flight downloads finish (and are kept), no new ones start.
    st = poll(lambda: (s := m.status())["syncs_running"] == 0
              and s["downloads_in_flight"] == 0 and s, what="the sync to stop")
    first = len(blob_gets(s3_proxy))
    assert 12 <= first < len(blobs), first
    fetched = {r.path.rsplit("/", 1)[1] for r in blob_gets(s3_proxy)}
    assert st["cache_used"] == sum(size for sha, size in blobs.items() if sha in fetched)
    assert len(blob_gets(s3_proxy)) == first  # nothing more was started

    s3_proxy.clear_faults()
    res = run_cli(["--sync", str(m.path)], m.env)
    assert f"fetched {len(blobs) - first} files" in res.stdout, res.stdout + res.stderr
    gets = blob_gets(s3_proxy)
    assert sorted(r.path.rsplit("/", 1)[1] for r in gets) == sorted(blobs)  # each once
    assert all(r.status in (200, 206) for r in gets)
    st = m.status()
    assert st["cache_used"] == sum(blobs.values())

    s3_proxy.pause()  # everything is local now
    for rel, data in tree.items():
        assert (m.path / rel).read_bytes() == data
    s3_proxy.resume()


def test_sync_cut_off_by_a_network_loss_continues_when_run_again(s3_bucket, s3_proxy,
                                                                  mounter):
    tree = make_tree(seed=3, files=40, dirs=2, min_size=32 * KiB, max_size=64 * KiB)
    blobs = unique(tree)
    seed_repository(mounter, s3_bucket.url, s3_bucket.endpoint_url, tree)
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url)
    s3_proxy.inject(method="GET", path=r"/blobs/", delay=0.5, times=None)
    s3_proxy.reset_counts()

    proc = subprocess.Popen([*CLI, "--sync", str(m.path)], env=m.env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        poll(lambda: len(blob_gets(s3_proxy)) >= 10, what="some downloads")
        s3_proxy.pause()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The sync stops (it does not grind through every file) and says what to do.
    assert proc.returncode == 1, stdout + stderr
    assert "storage is unreachable" in stdout and "run it again" in stdout
    assert "Traceback" not in stderr
    st = m.status()
    assert st["online"] is False and st["syncs_running"] == 0
    had = set(blobs) & _cached(m)
    assert 0 < len(had) < len(blobs)

    s3_proxy.resume()
    poll(lambda: m.status()["online"], what="back online")
    s3_proxy.clear_faults()
    s3_proxy.reset_counts()
    res = run_cli(["--sync", str(m.path)], m.env)
    assert f"fetched {len(blobs) - len(had)} files" in res.stdout, res.stdout + res.stderr
    fetched = {r.path.rsplit("/", 1)[1] for r in blob_gets(s3_proxy)}
    assert fetched == set(blobs) - had  # what was cached before was not fetched again
    assert m.status()["cache_used"] == sum(blobs.values())


def _cached(m) -> set[str]:  # noqa: ANN001
    """The blobs in a mount's cache directory."""
    return {p.name for p in m.cache_dir.rglob("*") if p.is_file() and len(p.name) == 64
            and p.parent.name != "partial"}


def test_offline_writes_are_queued_and_drain_when_the_storage_returns(
        s3_bucket, s3_proxy, mounter, tmp_path):
    remote_only = os.urandom(200 * KiB)
    seed_repository(mounter, s3_bucket.url, s3_bucket.endpoint_url,
                    {"remote_only.bin": remote_only, "docs/a.txt": b"seen before\n"})
    m = mounter(s3_bucket.url, "--refresh", "1", endpoint_url=s3_proxy.url)
    assert sorted(os.listdir(m.path)) == ["docs", "remote_only.bin"]
    assert (m.path / "docs" / "a.txt").read_bytes() == b"seen before\n"  # now cached
    (m.path / "edit.txt").write_bytes(b"version 1\n")
    before = m.wait_idle()
    assert before["online"] is True and before["last_error"] is None

    paused_at = time.time()
    s3_proxy.pause()
    poll(lambda: m.status()["online"] is False, what="offline status")

    # Browsing and cached reads work; an uncached file fails at once, with ENETDOWN.
    assert sorted(os.listdir(m.path)) == ["docs", "edit.txt", "remote_only.bin"]
    assert (m.path / "docs" / "a.txt").read_bytes() == b"seen before\n"
    with pytest.raises(OSError) as exc:
        os.open(m.path / "remote_only.bin", os.O_RDONLY)  # the open itself fails
    assert exc.value.errno == errno.ENETDOWN
    cat = subprocess.run(["cat", str(m.path / "remote_only.bin")], capture_output=True,
                         text=True, timeout=20)
    assert cat.returncode == 1 and "Network is down" in cat.stderr

    # New and changed files are accepted and queued.
    photo = os.urandom(300 * KiB)
    (m.path / "new1.bin").write_bytes(photo)
    (m.path / "new2.bin").write_bytes(photo)  # the same content: no second upload
    (m.path / "offline").mkdir()
    (m.path / "offline" / "notes.txt").write_bytes(b"written offline\n" * 100)
    (m.path / "edit.txt").write_bytes(b"version 2, longer\n")
    (m.path / "docs" / "a.txt").rename(m.path / "offline" / "a.txt")  # moves no data
    new_blobs = {hashlib.sha256(d).hexdigest(): len(d) for d in
                 (photo, b"written offline\n" * 100, b"version 2, longer\n")}

    st = m.status()
    assert st["online"] is False
    assert paused_at <= st["offline_since"] <= time.time()
    assert st["pending_files"] == len(new_blobs)
    assert st["pending_bytes"] == sum(new_blobs.values())
    assert st["pending_ops"] >= 5
    assert st["dedup_saved_bytes"] == before["dedup_saved_bytes"] + len(photo)
    assert st["cache_used"] == before["cache_used"] + sum(new_blobs.values())
    human = run_cli(["--status", str(m.path)], m.env).stdout
    assert "UNREACHABLE" in human and f"{len(new_blobs)} files" in human
    # The queue waits while offline: uploads fail fast, and the error says why.
    st = poll(lambda: (s := m.status())["last_error"] and s, what="an upload error")
    assert paused_at <= st["last_error_at"] <= time.time()
    assert "unreachable" in st["last_error"]
    assert st["uploaded_files"] == before["uploaded_files"]

    s3_proxy.resume()
    done = m.wait_idle(timeout=60)  # returns once everything is in the bucket
    assert done["online"] is True
    assert done["pending_files"] == done["pending_ops"] == done["pending_bytes"] == 0
    assert done["uploaded_files"] == before["uploaded_files"] + len(new_blobs)
    assert done["uploaded_bytes"] == before["uploaded_bytes"] + sum(new_blobs.values())
    assert done["online_again_at"] >= st["offline_since"]

    # Another machine, straight on the bucket, sees everything.
    other = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url, name="other")
    assert (other.path / "new1.bin").read_bytes() == photo
    assert (other.path / "new2.bin").read_bytes() == photo
    assert (other.path / "offline" / "notes.txt").read_bytes() == b"written offline\n" * 100
    assert (other.path / "edit.txt").read_bytes() == b"version 2, longer\n"
    assert (other.path / "offline" / "a.txt").read_bytes() == b"seen before\n"
    assert os.listdir(other.path / "docs") == []
    assert (other.path / "remote_only.bin").read_bytes() == remote_only


def test_mount_starts_offline_from_its_local_state(s3_bucket, s3_proxy, mounter, tmp_path):
    cache = tmp_path / "cache-laptop"
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, cache_dir=cache)
    (m.path / "album").mkdir()
    (m.path / "album" / "one.jpg").write_bytes(b"\xff\xd8one" * 1000)
    m.unmount()

    s3_proxy.pause()
    m2 = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, cache_dir=cache)
    st = m2.status()
    assert st["online"] is False
    assert os.listdir(m2.path) == ["album"]
    assert (m2.path / "album" / "one.jpg").read_bytes() == b"\xff\xd8one" * 1000
    (m2.path / "album" / "two.jpg").write_bytes(b"\xff\xd8two" * 1000)
    st = m2.status()
    assert st["pending_files"] == 1 and st["pending_bytes"] == 5 * 1000

    s3_proxy.resume()
    done = m2.wait_idle(timeout=60)
    assert done["online"] is True and done["pending_ops"] == 0
    other = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url, name="other")
    assert sorted(os.listdir(other.path / "album")) == ["one.jpg", "two.jpg"]
    assert (other.path / "album" / "two.jpg").read_bytes() == b"\xff\xd8two" * 1000


def test_sync_larger_than_the_cache_stops_at_the_limit(tmp_path, mounter):
    url = f"file://{tmp_path}/repository"
    size = 100 * KiB
    tree = {f"f{i}.bin": bytes([i]) * size for i in range(10)}
    seed_repository(mounter, url, None, tree)
    m = mounter(url, "--cache-size", str(4 * size), name="small")

    res = run_cli(["--sync", str(m.path)], m.env, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "sync will stop at the limit" in res.stderr  # said before starting
    assert "stopped at the cache limit" in res.stdout
    assert "fetched 4 files" in res.stdout
    st = m.status()
    assert st["cache_used"] == 4 * size <= st["cache_limit"]
    kept = sorted(p.name for p in (tmp_path / "cache-small").rglob("*")
                  if p.is_file() and len(p.name) == 64 and p.stat().st_size == size)

    # Running it again fetches nothing more and evicts nothing it fetched.
    res = run_cli(["--sync", str(m.path)], m.env, check=False)
    assert "6 of 10 files to fetch" in res.stderr
    assert "fetched 0 files" in res.stdout
    assert sorted(p.name for p in (tmp_path / "cache-small").rglob("*")
                  if p.is_file() and len(p.name) == 64 and p.stat().st_size == size) == kept
    assert len(kept) == 4


def test_sync_of_some_paths_fetches_only_those(tmp_path, mounter):
    url = f"file://{tmp_path}/repository"
    tree = {"2023/a.jpg": b"a" * 5000, "2023/deep/b.jpg": b"b" * 6000,
            "2024/c.jpg": b"c" * 7000, "top.txt": b"t" * 100}
    seed_repository(mounter, url, None, tree)
    m = mounter(url, name="reader")
    res = run_cli(["--sync", str(m.path), str(m.path / "2023")], m.env)
    assert "fetched 2 files (10.7 KiB)" in res.stdout, res.stdout + res.stderr
    assert m.status()["cache_used"] == 11000
    res = run_cli(["--sync", str(m.path), "2024", "2023/deep"], m.env)  # relative works too
    assert "fetched 1 files" in res.stdout
    assert m.status()["cache_used"] == 18000
    res = run_cli(["--sync", str(m.path), str(m.path / "top.txt")], m.env)  # one file
    assert "fetched 1 files" in res.stdout and "all 1 files" in res.stdout
    assert m.status()["cache_used"] == 18100
    res = run_cli(["--sync", str(m.path), "nowhere/x.jpg"], m.env, check=False)
    assert res.returncode == 1 and "not a file or directory" in res.stderr
    assert "Traceback" not in res.stderr


# -- the connectivity guard on its own (no FUSE, no network) ---------------------------------
class _FakeStore(Store):
    """A store whose reads can hang (an unanswered request) or fail on demand."""

    url = "fake://"

    def __init__(self) -> None:
        self.hang = False
        self.fail: Exception | None = None
        self.calls = 0

    async def _answer(self) -> bytes:
        self.calls += 1
        if self.hang:
            await trio.sleep_forever()
        if self.fail is not None:
            raise self.fail
        return b"data"

    async def get(self, key, if_none_match=None):  # noqa: ANN001, ANN201
        return StoredObject(await self._answer(), "etag")

    async def get_range(self, key, start, end):  # noqa: ANN001, ANN201
        return await self._answer()

    async def download(self, key, dest, start=0, on_chunk=None):  # noqa: ANN001, ANN201
        await self._answer()

    async def head(self, key):  # noqa: ANN001, ANN201
        return len(await self._answer())

    async def list(self, prefix):  # noqa: ANN001, ANN201
        await self._answer()
        return
        yield

    async def put(self, key, data, *, if_match=None, if_none_match=False):  # noqa: ANN001, ANN201
        await self._answer()
        return "etag"

    async def put_file(self, key, path, sha256_hex):  # noqa: ANN001, ANN201
        await self._answer()
        return True

    async def delete(self, key):  # noqa: ANN001, ANN201
        await self._answer()


@pytest.mark.expected_logs(r"unreachable, working offline", reason="the endpoint is cut on purpose")
def test_guard_goes_offline_fails_fast_and_comes_back(tmp_path):
    endpoint, gone = tmp_path / "endpoint", tmp_path / "gone"
    endpoint.mkdir()

    async def main() -> None:
        inner = _FakeStore()
        guard = GuardedStore(inner, patience=0.2, check_every=0.2, probe_every=0.1)
        guard._target = endpoint  # reachable while this folder exists
        back: list[float] = []
        guard.on_online.append(lambda: back.append(time.time()))
        assert (await guard.get("k")).data == b"data"

        # An unanswered request while the endpoint is unreachable: offline, and the caller
        # is answered long before the request itself would give up (it never does here).
        inner.hang = True
        endpoint.rename(gone)
        with trio.fail_after(10):
            with pytest.raises(StorageOffline):
                await guard.get("k")
        assert guard.online is False and guard.status()["offline_since"]
        calls = inner.calls
        for call in (guard.head("k"), guard.put("k", b"x"), guard.get_range("k", 0, 1)):
            with pytest.raises(StorageOffline):
                await call  # at once, without touching the storage
        assert inner.calls == calls

        # It comes back by itself, and says so.
        inner.hang = False
        gone.rename(endpoint)
        with trio.fail_after(10):
            while not guard.online:
                await trio.sleep(0.02)
        assert len(back) == 1 and guard.status()["online_again_at"]
        assert await guard.head("k") == 4

        # A failing but reachable storage (a 503 storm) is not "offline": the error passes.
        inner.fail = StorageUnavailable("503 SlowDown, again and again")
        with pytest.raises(StorageUnavailable) as exc:
            await guard.get("k")
        assert not isinstance(exc.value, StorageOffline) and guard.online
        # A slow but reachable storage is waited for.
        inner.fail = None
        inner.hang = True
        with trio.move_on_after(0.8):
            await guard.get("k")
        assert guard.online

    trio.run(main)


def test_unmount_while_offline_leaves_the_queue_for_the_next_mount(s3_bucket, s3_proxy,
                                                                  mounter):
    """--unmount does not wait forever for an unreachable storage: it says what stays
    queued, unmounts, and the next mount uploads it."""
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url)
    s3_proxy.pause()
    data = os.urandom(50 * KiB)
    (m.path / "kept.bin").write_bytes(data)
    res = run_cli(["--unmount", str(m.path)], m.env, timeout=120)
    assert "stay queued" in res.stderr and "Traceback" not in res.stderr
    m.proc.wait(timeout=30)
    assert not os.path.ismount(m.path)
    s3_proxy.resume()
    m.start()
    m.wait_idle()
    fresh = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url, name="fresh")
    assert (fresh.path / "kept.bin").read_bytes() == data
