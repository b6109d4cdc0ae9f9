"""Servers without conditional writes, and caches that cannot be used any more,
with real mounts over HTTP.

The server that ignores If-Match/If-None-Match is moto behind `S3Proxy(strip_conditions=
True)`, as s3rver or `rclone serve s3` would behave. The rules: docs/cross-machine.md
("Servers without conditional writes") and SEMANTICS.md ("Write modes").
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fsrepo.config import Settings
from fsrepo.lease import LEASE_KEY, RENEW_EVERY, Lease
from fsrepo.repository import DESCRIPTOR_KEY
from fsrepo.store import open_store
from fsrepo.store.base import StoredObject
from testservers.s3proxy import S3Proxy

from .mountutil import file_tree, poll, run_cli


@pytest.fixture
def ignoring_server(moto_server) -> Iterator[S3Proxy]:
    with S3Proxy(moto_server.url, strip_conditions=True) as proxy:
        yield proxy


def _mount_detached(mountpoint: Path, url: str, cache: Path, endpoint: str,
                    env: dict[str, str], *extra: str):  # noqa: ANN202 - CompletedProcess
    """The user's way: `imgrepo-mount MNT ...` returns once mounted, or prints one line."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    return run_cli([str(mountpoint), "--storage", url, "--cache-dir", str(cache),
                    "--endpoint-url", endpoint, *extra], env, check=False, timeout=90)


def _repo_id_of_cache(url: str, cache: Path) -> str | None:
    db = Settings(storage=url, cache_root=cache).state_dir() / "state.db"
    if not db.exists():
        return None
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key='repo_id'").fetchone()
    return row[0] if row else None


def _bucket_descriptor(url: str, endpoint: str) -> dict:
    store = open_store(url, endpoint_url=endpoint)

    async def main() -> dict:
        try:
            obj = await store.get(DESCRIPTOR_KEY)
            assert isinstance(obj, StoredObject)
            return json.loads(obj.data)
        finally:
            await store.aclose()

    return trio.run(main)


def _bucket_writes(proxy: S3Proxy) -> list[str]:
    """Requests that changed the bucket, other than the writer lease's renewals."""
    return [f"{r.method} {r.path}" for r in proxy.requests
            if r.method in ("PUT", "POST", "DELETE") and not r.path.endswith("/lease.json")]


def test_second_machine_is_refused_reads_read_only_and_takes_over_after_unmount(
        s3_bucket, ignoring_server, mounter, mount_env, tmp_path: Path) -> None:
    proxy = ignoring_server
    a = mounter(s3_bucket.url, "--refresh", "1", endpoint_url=proxy.url, name="a")
    assert a.status()["write_mode"].startswith("single writer (lease held by this mount")
    (a.path / "photos").mkdir()
    (a.path / "photos" / "one.txt").write_bytes(b"from A")
    a.wait_idle()
    status_text = run_cli(["--status", str(a.path)], mount_env).stdout
    assert "writes:       single writer (lease held by this mount" in status_text

    refused = _mount_detached(tmp_path / "b", s3_bucket.url, tmp_path / "cache-b", proxy.url,
                              mount_env)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "ignores If-None-Match on PUT (no conditional writes)" in lines[0]
    assert f"the writer lease is held by {socket.gethostname()} (pid {a.proc.pid})" in lines[0]
    assert "since" in lines[0] and "expiring" in lines[0] and "--read-only" in lines[0]
    assert not os.path.ismount(tmp_path / "b")

    proxy.reset_counts()
    ro = mounter(s3_bucket.url, "--read-only", endpoint_url=proxy.url, name="ro")
    assert ro.status()["write_mode"] == "read-only"
    assert (ro.path / "photos" / "one.txt").read_bytes() == b"from A"
    for attempt in (lambda: (ro.path / "new.txt").write_bytes(b"x"),
                    lambda: (ro.path / "photos" / "one.txt").unlink(),
                    lambda: (ro.path / "sub").mkdir()):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EROFS
    ro.unmount()
    assert _bucket_writes(proxy) == []  # the read-only mount never wrote, not even a probe

    a.unmount()  # releases the lease
    c = mounter(s3_bucket.url, endpoint_url=proxy.url, cache_dir=tmp_path / "cache-b",
                name="c")
    assert c.status()["write_mode"].startswith("single writer (lease held by this mount")
    (c.path / "photos" / "two.txt").write_bytes(b"from C")
    c.wait_idle()
    c.unmount()
    fresh = mounter(s3_bucket.url, "--read-only", endpoint_url=proxy.url, name="fresh")
    assert file_tree(fresh.path) == {"photos/one.txt": b"from A", "photos/two.txt": b"from C"}


def test_two_first_mounts_at_once_make_one_repository(
        moto_server, ignoring_server, mount_env, tmp_path: Path) -> None:
    bucket = "imgrepo-test-" + uuid.uuid4().hex[:12]
    moto_server.create_bucket(bucket)
    url = f"s3://{bucket}/fresh"
    results: dict[str, object] = {}

    def first_mount(name: str) -> None:
        results[name] = _mount_detached(tmp_path / name, url, tmp_path / f"cache-{name}",
                                        ignoring_server.url, mount_env)

    threads = [threading.Thread(target=first_mount, args=(n,)) for n in ("m1", "m2")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        codes = {name: res.returncode for name, res in results.items()}  # type: ignore[attr-defined]
        assert sorted(codes.values())[0] == 0 and list(codes.values()).count(0) == 1, results
        loser = next(res for res in results.values() if res.returncode != 0)  # type: ignore[attr-defined]
        assert "writer lease" in loser.stderr  # type: ignore[attr-defined]
        bucket_id = _bucket_descriptor(url, moto_server.url)["repo_id"]
        for name in ("m1", "m2"):
            assert _repo_id_of_cache(url, tmp_path / f"cache-{name}") in (None, bucket_id)
    finally:
        for name in ("m1", "m2"):
            if os.path.ismount(tmp_path / name):
                run_cli(["--unmount", str(tmp_path / name)], mount_env, check=False)


@pytest.mark.parametrize("what_happened", ["other repository", "bucket deleted"])
def test_salvage_recovers_pending_files_of_a_cache_the_bucket_no_longer_matches(
        moto_server, s3_bucket, s3_proxy, mounter, mount_env, tmp_path: Path,
        what_happened: str) -> None:
    cache = tmp_path / "cache-a"
    a = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, cache_dir=cache, name="a")
    (a.path / "album").mkdir()
    (a.path / "album" / "uploaded.jpg").write_bytes(b"already in the bucket")
    a.wait_idle()
    s3_proxy.pause()  # the bucket cannot be reached: what follows stays pending
    (a.path / "album" / "sub").mkdir()
    (a.path / "album" / "new.jpg").write_bytes(b"new one")
    (a.path / "album" / "sub" / "deep.raw").write_bytes(os.urandom(300_000))
    deep = (a.path / "album" / "sub" / "deep.raw").read_bytes()
    (a.path / "top.txt").write_bytes(b"top")
    a.kill()
    s3_proxy.resume()

    if what_happened == "bucket deleted":
        moto_server.delete_bucket(s3_bucket.bucket)
    else:
        store = open_store(s3_bucket.url, endpoint_url=moto_server.url)
        other = {"format": "imgrepo", "version": 1, "hash": "sha256", "created": "",
                 "repo_id": uuid.uuid4().hex}
        trio.run(lambda: store.put(DESCRIPTOR_KEY, json.dumps(other).encode()))
        trio.run(store.aclose)

    again = _mount_detached(tmp_path / "a2", s3_bucket.url, cache, s3_proxy.url, mount_env)
    assert again.returncode != 0
    message = again.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "--salvage DEST" in message and f"--cache-dir {cache}" in message
    assert "move that directory away to start afresh" in message

    dest = tmp_path / "salvaged"
    before = time.time()
    advised = message.split("`")[1].split()  # the command the message gives, as typed
    assert advised[:2] == ["imgrepo-mount", "--salvage"] and "--endpoint-url" in advised
    out = run_cli([arg.replace("DEST", str(dest)) for arg in advised[1:]], mount_env)
    assert "copied 3 files not yet uploaded" in out.stdout
    assert file_tree(dest) == {"album/new.jpg": b"new one", "album/sub/deep.raw": deep,
                               "top.txt": b"top"}
    assert os.stat(dest / "top.txt").st_mtime < before  # its own mtime, not the copy's
    again = run_cli([arg.replace("DEST", str(dest)) for arg in advised[1:]], mount_env,
                    check=False)
    assert again.returncode != 0 and "not an empty folder" in again.stderr


def test_a_mount_whose_lease_was_taken_stops_writing_and_says_so(
        s3_bucket, ignoring_server, mounter, tmp_path: Path) -> None:
    a = mounter(s3_bucket.url, endpoint_url=ignoring_server.url, name="a")
    (a.path / "kept.txt").write_bytes(b"before")
    a.wait_idle()
    # Another machine took the lease (this one slept past its expiry, say).
    thief = Lease("desktop", 4242, "thief", time.time(), time.time() + 3600)
    store = open_store(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url)
    trio.run(lambda: store.put(LEASE_KEY, thief.encode()))
    trio.run(store.aclose)
    status = poll(lambda: (s := a.status())["write_mode"].startswith("single writer (lease "
                                                                     "LOST") and s,
                  timeout=RENEW_EVERY + 15, what="the renewal to notice the takeover")
    assert "desktop (pid 4242)" in status["write_mode"]
    assert "stopped writing" in status["writes_refused"]
    with pytest.raises(OSError) as err:
        (a.path / "after.txt").write_bytes(b"x")
    assert err.value.errno == errno.EROFS
    assert "was taken by desktop (pid 4242)" in a.logtext()
    assert (a.path / "kept.txt").read_bytes() == b"before"  # reading goes on
