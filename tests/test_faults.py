"""Faults: nothing closed is ever lost, whatever the storage, the disk or a kill -9 do.

The S3 tests put tests/s3proxy.py between real mounts and moto's server and inject faults
there: random 500s, 503 SlowDown, 409 ConditionalRequestConflict on writes, slow answers,
connections reset before, after or in the middle of a body, an outage, and moto itself
killed and restarted. The disk test gives the mount a small tmpfs as its cache disk. The
crash test runs a short version of scripts/soak_crash.py.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from fsrepo.maintenance.verify import verify
from testservers.s3proxy import Fault, S3Proxy

from .mountutil import file_tree as tree

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RandomFault(Fault):
    """A fault that hits each matching request with probability `chance` (no budget)."""

    chance: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def matches(self, method: str, path: str, query: str) -> bool:
        if not super().matches(method, path, query):
            return False
        with self._lock:
            return self.rng.random() < self.chance


def storm(proxy: S3Proxy, seed: int) -> list[Fault]:
    """Every kind of fault S3 and networks produce, each at random."""
    rng = random.Random(seed)
    faults = [
        RandomFault(times=None, chance=0.05, status=500, rng=rng),
        RandomFault(times=None, chance=0.05, status=503, rng=rng),  # SlowDown
        RandomFault(times=None, method="PUT", chance=0.12, status=409, rng=rng),
        RandomFault(times=None, chance=0.03, delay=0.6, rng=rng),
        RandomFault(times=None, chance=0.01, delay=2.5, rng=rng),
        RandomFault(times=None, chance=0.03, drop="before", rng=rng),
        RandomFault(times=None, method="PUT", chance=0.04, drop="after", rng=rng),
        RandomFault(times=None, method="GET", chance=0.12, drop="midway", rng=rng),
    ]
    with proxy._lock:
        proxy._faults.extend(faults)
    return faults




def _payload(rng: random.Random, i: int) -> bytes:
    size = [0, 1, 700, 40_000, 300_000, 2_500_000][i % 6] + i
    return rng.randbytes(size)


def _verify_bucket(target) -> None:
    store = target.open()
    try:
        report = trio.run(verify, store, True)
    finally:
        trio.run(store.aclose)
    assert report.problems == [], report.problems


def test_error_storm_loses_nothing_and_reads_retry(s3_bucket, s3_proxy, mounter,
                                                    tmp_path: Path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    writer = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, name="writer")
    expected: dict[str, bytes] = {}
    for i in range(6):  # already in the bucket before the storm: read back during it
        expected[f"before/b{i}"] = _payload(rng, i)
        (writer.path / "before").mkdir(exist_ok=True)
        (writer.path / f"before/b{i}").write_bytes(expected[f"before/b{i}"])
    writer.wait_idle()
    reader = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, name="reader")

    # A few of each for sure (matched first), then the random storm.
    s3_proxy.inject(status=500, times=2)
    s3_proxy.inject(status=503, times=2)
    s3_proxy.inject(method="GET", path="/blobs/", drop="midway", times=2)
    s3_proxy.inject(method="PUT", path="/dirs/", status=409, times=1)
    faults = storm(s3_proxy, seed)
    for i in range(30):
        folder = f"d{i % 4}"
        (writer.path / folder).mkdir(exist_ok=True)
        expected[f"{folder}/f{i}"] = _payload(rng, i)
        (writer.path / f"{folder}/f{i}").write_bytes(expected[f"{folder}/f{i}"])
    for i in range(0, 30, 6):  # renames across folders, overwrites, deletes
        src = f"d{i % 4}/f{i}"
        os.rename(writer.path / src, writer.path / f"d3/moved{i}")
        expected[f"d3/moved{i}"] = expected.pop(src)
        victim = f"d{(i + 1) % 4}/f{i + 1}"
        expected[victim] = rng.randbytes(5000 + i)
        (writer.path / victim).write_bytes(expected[victim])
        gone = f"d{(i + 2) % 4}/f{i + 2}"
        os.unlink(writer.path / gone)
        del expected[gone]
    # Reads during the storm (fresh cache: every byte comes through the proxy).
    for i in range(6):
        assert (reader.path / f"before/b{i}").read_bytes() == expected[f"before/b{i}"]
    writer.wait_idle(timeout=300)
    hits = {f"{f.status or ''}{f.drop or ''}{f.delay or ''}": f.hits for f in faults}
    assert sum(hits.values()) >= 10, hits  # the storm did blow

    s3_proxy.clear_faults()
    writer.unmount()
    reader.unmount()
    fresh = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, name="fresh")
    assert tree(fresh.path) == expected, f"seed {seed}"
    _verify_bucket(s3_bucket)
    log = writer.logtext() + reader.logtext()
    assert "Traceback" not in log, log[log.find("Traceback"):][:3000]
    # What the storm did is in the log, though every fault was ridden out.
    assert "failed (attempt" in log and "): 503" in log and "): 500" in log
    assert "409 ConditionalRequestConflict" in log and "broke off" in log


def test_conditional_write_conflicts_409_are_retried(s3_bucket, s3_proxy, mounter):
    m = mounter(s3_bucket.url, endpoint_url=s3_proxy.url)
    manifest_409 = s3_proxy.inject(method="PUT", path="/dirs/", status=409, times=8)
    blob_409 = s3_proxy.inject(method="PUT", path="/blobs/", status=409, times=8)
    files = {f"p{i}.jpg": os.urandom(3000 + i) for i in range(5)}
    for name, data in files.items():
        (m.path / name).write_bytes(data)
    m.wait_idle(timeout=180)
    assert manifest_409.hits == 8 and blob_409.hits == 8
    assert m.logtext().count("409 ConditionalRequestConflict") >= 16
    m.unmount()
    _verify_bucket(s3_bucket)
    fresh = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, name="fresh")
    assert tree(fresh.path) == files


def _snapshot_bucket(client, bucket: str) -> dict[str, bytes]:
    """Every object's bytes, once two listings in a row agree (requests the proxy was still
    forwarding when it paused may land just after)."""
    import botocore.exceptions

    previous: dict[str, str] | None = None
    for _ in range(50):
        listing = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents") or ():
                listing[obj["Key"]] = obj["ETag"]
        if listing == previous:
            try:
                return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read()
                        for key in listing}
            except botocore.exceptions.FlexibleChecksumError:
                pass  # read while being overwritten: look again
        previous = listing
        time.sleep(0.2)
    raise AssertionError("the bucket never stopped changing")


def test_server_killed_and_restarted(private_moto_server, mounter, tmp_path: Path):
    """moto is killed while files are being written and restarted a while later (with the
    bucket's content restored, as a real server with disks would have it). Every file
    closed before, during and after the outage ends up in the bucket, byte for byte."""
    moto = private_moto_server
    moto.create_bucket("crash")
    client = moto.client()
    with S3Proxy(moto.url) as proxy:
        m = mounter("s3://crash/repo", endpoint_url=proxy.url)
        expected = {f"a{i}": os.urandom(20_000 + i) for i in range(5)}
        for name, data in expected.items():
            (m.path / name).write_bytes(data)
        m.wait_idle()
        during = {f"b{i}": os.urandom(30_000 + i) for i in range(5)}
        for name, data in list(during.items())[:2]:  # some still on their way at the kill
            (m.path / name).write_bytes(data)
        proxy.pause()
        saved = _snapshot_bucket(client, "crash")
        moto.stop()  # killed: in-flight requests die with it
        for name, data in list(during.items())[2:]:  # the outage: close() still works
            (m.path / name).write_bytes(data)
        expected.update(during)
        assert (m.path / "a1").read_bytes() == expected["a1"]  # cached: readable offline
        deadline = time.time() + 90
        while not m.status().get("last_error"):  # the mount notices, and says so
            assert time.time() < deadline, "the outage went unnoticed"
            time.sleep(0.2)
        assert m.status()["pending_ops"] > 0
        moto.restart()
        client = moto.client()
        client.create_bucket(Bucket="crash")
        for key, body in saved.items():
            client.put_object(Bucket="crash", Key=key, Body=body)
        proxy.resume()
        m.wait_idle(timeout=240)
        (m.path / "c0").write_bytes(b"after the restart")
        expected["c0"] = b"after the restart"
        m.unmount()
        fresh = mounter("s3://crash/repo", endpoint_url=proxy.url, name="fresh")
        assert tree(fresh.path) == expected
        log = m.logtext()
        assert "will retry" in log or "unreachable" in log, log[-3000:]
        assert "Traceback" not in log


def test_outage_reads_fail_cleanly_and_recover(s3_bucket, s3_proxy, mounter):
    """With the storage unreachable, reading a file that is not cached fails with an error
    (not a hang); once the storage is back, the same read works."""
    w = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, name="w")
    data = os.urandom(200_000)
    (w.path / "remote.jpg").write_bytes(data)
    w.unmount()
    r = mounter(s3_bucket.url, endpoint_url=s3_proxy.url, name="r")
    assert os.listdir(r.path) == ["remote.jpg"]
    s3_proxy.pause()
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append((r.path / "remote.jpg").read_bytes())
        except OSError as exc:
            outcome.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout=150)
    assert not t.is_alive(), "a read with the storage down hung"
    assert isinstance(outcome[0], OSError), outcome
    assert outcome[0].errno in (errno.EIO, errno.ENETDOWN, errno.EHOSTUNREACH)
    s3_proxy.resume()
    deadline = time.time() + 60
    while True:
        try:
            assert (r.path / "remote.jpg").read_bytes() == data
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    log = r.logtext()
    assert "Traceback" not in log


# -- the cache disk fills up ----------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path, mounter):
    """An 8 MiB tmpfs (unmounted at teardown, after the mounts that use it)."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(disk)],
                   check=True)
    try:
        yield disk
    finally:
        mounter.cleanup()
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(path: Path) -> None:
    """Write until the disk says ENOSPC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> int:
    """0, or the errno the write (or the close) failed with."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        return exc.errno
    return 0


def test_cache_disk_full(tmp_path: Path, small_disk: Path, mounter):
    m = mounter(f"file://{tmp_path}/repo", cache_dir=small_disk)
    a = os.urandom(1 << 20)
    (m.path / "a.bin").write_bytes(a)
    m.wait_idle()
    ballast = small_disk / "ballast"
    _fill(ballast)
    b = os.urandom(3 << 20)
    assert _write(m.path / "b.bin", b) == errno.ENOSPC
    assert (m.path / "a.bin").read_bytes() == a  # nothing closed is lost
    assert m.status()["pid"] == m.proc.pid
    assert _write(m.path / "b2.bin", os.urandom(2 << 20)) == errno.ENOSPC
    ballast.unlink()  # space returns
    c = os.urandom(2 << 20)
    (m.path / "c.bin").write_bytes(c)
    (m.path / "d").mkdir()
    (m.path / "d" / "e.bin").write_bytes(b"small")
    m.wait_idle()
    log = m.logtext()
    m.unmount()
    fresh = mounter(f"file://{tmp_path}/repo", cache_dir=tmp_path / "cache-fresh")
    got = tree(fresh.path)
    assert got["a.bin"] == a and got["c.bin"] == c and got["d/e.bin"] == b"small"
    for partial in ("b.bin", "b2.bin"):  # a failed write may leave what it had written
        if partial in got:
            assert got[partial] == (b if partial == "b.bin" else got[partial])[:len(got[partial])]
    assert "No space left on device" in log or "disk is full" in log
    assert "Traceback" not in log, log[log.find("Traceback") - 500:][:4000]


# -- kill -9, many times --------------------------------------------------------------------
def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_crash",
                                                  REPO_ROOT / "scripts" / "soak_crash.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_kill_9_during_a_mixed_workload(backend, request, tmp_path: Path, mount_env):
    soak = _soak_module()
    endpoint = None
    storage = f"file://{tmp_path}/repository"
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        storage, endpoint = bucket.url, bucket.endpoint_url
    lines: list[str] = []
    try:
        summary = soak.soak(storage, tmp_path / "soak", rounds=3, endpoint_url=endpoint,
                            env=mount_env, min_s=0.3, max_s=1.5, log=lines.append)
    except soak.SoakFailure as exc:
        pytest.fail("\n".join(lines) + f"\n{exc}")
    assert summary["ops"] > 0 and summary["rounds"] == 3

