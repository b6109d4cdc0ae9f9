"""Crash safety, deduplication, write-back and the cache limit, through real mounts.

- kill -9 of the mount in the middle of a copy: every file whose close() had returned is
  there after mounting again, byte for byte, and reaches the bucket (a fresh machine, with
  an empty cache, reads it back);
- identical content costs one blob upload, whatever the number of names, and nothing more
  from another machine later (uploads counted at an HTTP proxy in front of moto);
- closing files does not wait for the network: copies finish with the storage unreachable;
- the blob cache stays within --cache-size once uploads are done, never drops what is open,
  and evicted files read back from the bucket.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path

from .mountutil import poll as _poll

MiB = 1 << 20




def test_kill_9_mid_copy_keeps_every_closed_file(storage, mounter, tmp_path: Path):
    seed = int(os.environ.get("IMGREPO_CRASH_SEED", str(time.time_ns() % 1_000_000)))
    rng = random.Random(seed)
    files = {f"album{i % 5}/day{i % 3}/IMG_{i:04d}.jpg":
             rng.randbytes(rng.randrange(1_000, 80_000)) for i in range(300)}
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    closed: list[str] = []
    stopped: list[BaseException] = []

    kill_after = rng.randrange(20, 280)
    mid_file = threading.Event()  # the writer is half-way through the next file
    killed = threading.Event()

    def copy() -> None:  # what `cp -r` does, noting each file whose close() returned
        try:
            for rel, data in files.items():
                path = m.path / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as fh:
                    if len(closed) == kill_after:  # the kill lands inside this file
                        fh.write(data[:len(data) // 2])
                        mid_file.set()
                        killed.wait(60)
                    fh.write(data)
                closed.append(rel)
        except OSError as exc:
            stopped.append(exc)

    writer = threading.Thread(target=copy, daemon=True)
    writer.start()
    _poll(lambda: mid_file.is_set() or not writer.is_alive(), 120, "the copy")
    m.kill()
    killed.set()
    writer.join(60)
    assert not writer.is_alive()
    survivors = list(closed)
    context = f"seed {seed}: killed after {kill_after} files, {len(survivors)} closed"
    assert stopped and len(survivors) < len(files), f"the kill did not interrupt: {context}"

    m2 = mounter(storage.url, endpoint_url=storage.endpoint_url, cache_dir=m.cache_dir)
    for rel in survivors:
        assert (m2.path / rel).read_bytes() == files[rel], f"{rel} differs; {context}"
    final = m2.wait_idle()
    assert final["pending_ops"] == 0 and final["pending_files"] == 0, final
    m2.unmount()

    m3 = mounter(storage.url, endpoint_url=storage.endpoint_url, cache_dir=tmp_path / "fresh")
    for rel in survivors:
        assert (m3.path / rel).read_bytes() == files[rel], f"{rel} not in the bucket; {context}"


def test_identical_content_is_uploaded_once(s3_bucket, s3_proxy, mounter, tmp_path: Path):
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url)
    payload = os.urandom(256 * 1024)
    for i in range(200):
        folder = m.path / f"dir{i % 4}"
        folder.mkdir(exist_ok=True)
        (folder / f"copy{i:03d}.jpg").write_bytes(payload)
    status = m.wait_idle()
    assert status["pending_ops"] == 0
    assert s3_proxy.count("PUT", path=r"/blobs/") == 1, [
        r.path for r in s3_proxy.requests if r.method == "PUT" and "/blobs/" in r.path]
    assert status["dedup_saved_bytes"] >= 150 * len(payload), status

    # Another machine (its own, empty cache) stores the same bytes under new names later.
    s3_proxy.reset_counts()
    other = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, cache_dir=tmp_path / "other")
    (other.path / "elsewhere").mkdir()
    for i in range(20):
        (other.path / "elsewhere" / f"again{i}.jpg").write_bytes(payload)
    other.wait_idle()
    assert s3_proxy.count("PUT", path=r"/blobs/") == 0
    assert s3_proxy.count("PUT", path=r"/dirs/") >= 1  # the names did go to the bucket
    other.unmount()
    m.unmount()
    fresh = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url,
                    cache_dir=tmp_path / "fresh")
    assert (fresh.path / "elsewhere" / "again7.jpg").read_bytes() == payload
    assert (fresh.path / "dir3" / "copy199.jpg").read_bytes() == payload
    assert len(os.listdir(fresh.path / "dir0")) == 50


def test_copy_does_not_wait_for_the_network(s3_bucket, s3_proxy, mounter, tmp_path: Path):
    """With the storage unreachable, a copy of a folder of photos (new folders included)
    still completes: close() waits for the local journal only. The uploads follow when the
    storage is back."""
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url)
    (m.path / "existing").mkdir()
    m.wait_idle()
    s3_proxy.pause()
    try:
        files = {f"trip/day{i % 3}/IMG_{i:03d}.jpg": os.urandom(10_000 + i)
                 for i in range(60)}
        for rel, data in files.items():
            (m.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (m.path / rel).write_bytes(data)
        (m.path / "existing" / "note.txt").write_bytes(b"offline note")
        assert m.status()["pending_files"] >= 60
        for rel, data in files.items():
            assert (m.path / rel).read_bytes() == data
    finally:
        s3_proxy.resume()
    assert m.wait_idle()["pending_ops"] == 0
    m.unmount()
    fresh = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url,
                    cache_dir=tmp_path / "fresh")
    for rel, data in files.items():
        assert (fresh.path / rel).read_bytes() == data
    assert (fresh.path / "existing" / "note.txt").read_bytes() == b"offline note"


def _cached_blob_bytes(cache_dir: Path) -> int:
    total = 0
    for blobs in cache_dir.glob("repos/*/blobs"):
        for path in blobs.glob("??/*"):
            total += path.stat().st_size
    return total


def test_cache_stays_within_its_limit(storage, mounter, tmp_path: Path):
    limit = 2 * MiB
    m = mounter(storage.url, "--cache-size", "2M", endpoint_url=storage.endpoint_url)
    files = {f"f{i}.bin": os.urandom(MiB) for i in range(10)}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    assert m.wait_idle()["pending_ops"] == 0
    # Once everything is in the bucket, eviction brings the cache back under its limit.
    _poll(lambda: _cached_blob_bytes(m.cache_dir) <= limit, 30, "eviction after uploads")

    # Read everything back (most of it from the bucket), holding the first file open: what
    # is open is never evicted, and the limit holds again once the downloads are done.
    held_name = "f0.bin"
    held_sha = hashlib.sha256(files[held_name]).hexdigest()
    with open(m.path / held_name, "rb") as held:
        first = held.read(1000)
        for name, data in files.items():
            assert (m.path / name).read_bytes() == data, name
        blob = next(m.cache_dir.glob(f"repos/*/blobs/{held_sha[:2]}/{held_sha}"), None)
        assert blob is not None, "the blob of an open file was evicted"
        assert first + held.read() == files[held_name]
    _poll(lambda: _cached_blob_bytes(m.cache_dir) <= limit, 30, "eviction after downloads")
    assert m.status()["cache_used"] <= limit

    # More open at once than the limit holds: all of it stays while open, and the cache
    # shrinks back once they are closed.
    opened = [open(m.path / name, "rb") for name in list(files)[:4]]  # noqa: SIM115
    try:
        for fh, data in zip(opened, files.values(), strict=False):
            assert fh.read() == data
    finally:
        for fh in opened:
            fh.close()
    _poll(lambda: _cached_blob_bytes(m.cache_dir) <= limit, 30, "eviction after closing")
