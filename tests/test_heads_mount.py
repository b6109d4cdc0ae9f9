"""Change records with real mounts over HTTP (docs/cross-machine.md, "Seeing the others'
changes"): an idle mount's requests do not grow with the folders it loaded, other machines'
changes still show within the refresh bound, and a remount trusts its cache."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testservers.s3proxy import S3Proxy

from .mountutil import poll

REFRESH = 1.0
BOUND = REFRESH + 2.0  # visible within the interval (+ margin) of reaching the bucket
FOLDERS = 50


def make_folders(root: Path, n: int) -> None:
    for i in range(n):
        d = root / f"y{i // 10}" / f"event{i}"
        d.mkdir(parents=True)
        (d / "photo.jpg").write_bytes(f"photo {i}\n".encode())


def walk(root: Path) -> list[str]:
    """`find` over the tree: every folder listed, every entry stat'ed."""
    out = subprocess.run(["find", str(root)], capture_output=True, text=True, timeout=120,
                         check=True)
    return out.stdout.split()


def seed(mounter, bucket, n: int) -> None:  # noqa: ANN001
    writer = mounter(bucket.url, name="seed", endpoint_url=bucket.endpoint_url)
    make_folders(writer.path, n)
    writer.unmount()


def visible_within(what: str, check, bound: float = BOUND) -> float:  # noqa: ANN001
    def seen() -> bool:
        try:
            return bool(check())
        except OSError:  # not there yet
            return False
    start = time.monotonic()
    poll(seen, timeout=bound + 10, what=what, interval=0.02)
    took = time.monotonic() - start
    assert took <= bound, f"{what}: seen after {took:.2f} s (bound {bound} s)"
    return took


@pytest.fixture
def ignoring_server(moto_server) -> Iterator[S3Proxy]:  # noqa: ANN001
    """A server that ignores If-Match/If-None-Match: single-writer mode."""
    with S3Proxy(moto_server.url, strip_conditions=True) as proxy:
        yield proxy


def test_an_idle_mount_sends_at_most_one_request_per_interval(s3_bucket, s3_proxy, mounter):
    seed(mounter, s3_bucket, FOLDERS)
    m = mounter(s3_bucket.url, "--refresh", str(REFRESH), endpoint_url=s3_proxy.url)
    assert len(walk(m.path)) > 2 * FOLDERS  # every folder loaded
    time.sleep(2 * REFRESH)  # whatever the walk left to do is done
    s3_proxy.reset_counts()
    idle = 6.0
    time.sleep(idle)
    seen = s3_proxy.requests
    assert len(seen) <= idle / REFRESH + 1, [(r.method, r.path) for r in seen]
    assert all("heads-touched" in r.path for r in seen), [(r.method, r.path) for r in seen]
    assert len(seen) >= idle / REFRESH - 2  # it does poll


def test_another_mounts_create_rename_and_delete_show_within_the_bound(
        s3_bucket, mounter):
    a = mounter(s3_bucket.url, "--refresh", str(REFRESH), name="alpha",
                endpoint_url=s3_bucket.endpoint_url)
    b = mounter(s3_bucket.url, "--refresh", str(REFRESH), name="beta",
                endpoint_url=s3_bucket.endpoint_url)
    (a.path / "album").mkdir()
    (a.path / "album" / "one.jpg").write_bytes(b"one\n")
    a.wait_idle()
    visible_within("the new folder", lambda: (b.path / "album" / "one.jpg").read_bytes()
                   == b"one\n")
    assert sorted(os.listdir(b.path / "album")) == ["one.jpg"]  # now a loaded view

    (a.path / "album" / "two.jpg").write_bytes(b"two\n")
    a.wait_idle()
    visible_within("a created file", lambda: "two.jpg" in os.listdir(b.path / "album"))

    (a.path / "album" / "one.jpg").rename(a.path / "album" / "uno.jpg")
    a.wait_idle()
    visible_within("a rename", lambda: sorted(os.listdir(b.path / "album"))
                   == ["two.jpg", "uno.jpg"])
    assert (b.path / "album" / "uno.jpg").read_bytes() == b"one\n"

    (a.path / "album" / "two.jpg").unlink()
    a.wait_idle()
    visible_within("a delete", lambda: os.listdir(b.path / "album") == ["uno.jpg"])
    assert not (b.path / "album" / "two.jpg").exists()

    # And the other way round.
    (b.path / "album" / "from-b.jpg").write_bytes(b"b\n")
    b.wait_idle()
    visible_within("b's file on a", lambda: "from-b.jpg" in os.listdir(a.path / "album"))


def test_a_remount_trusts_its_cache_and_sees_what_changed_meanwhile(
        s3_bucket, s3_proxy, mounter, tmp_path):
    seed(mounter, s3_bucket, FOLDERS)
    cache = tmp_path / "cache-laptop"
    m = mounter(s3_bucket.url, "--refresh", str(REFRESH), name="laptop", cache_dir=cache,
                endpoint_url=s3_proxy.url)
    warm = walk(m.path)
    m.unmount()

    # Remount, repository unchanged: the cached manifests are used without a request.
    s3_proxy.reset_counts()
    m = mounter(s3_bucket.url, "--refresh", str(REFRESH), name="laptop", cache_dir=cache,
                endpoint_url=s3_proxy.url)
    assert not [r for r in s3_proxy.requests if "/dirs/" in r.path]
    s3_proxy.reset_counts()
    assert walk(m.path) == warm
    during = s3_proxy.requests
    assert len(during) <= 2, [(r.method, r.path) for r in during]
    assert not [r for r in during if "/dirs/" in r.path]
    m.unmount()

    # Another machine changes one folder while the laptop is away.
    other = mounter(s3_bucket.url, name="other", endpoint_url=s3_bucket.endpoint_url)
    (other.path / "y3" / "event31" / "new.jpg").write_bytes(b"new\n")
    (other.path / "y0" / "event1" / "photo.jpg").unlink()
    other.unmount()

    s3_proxy.reset_counts()
    m = mounter(s3_bucket.url, "--refresh", str(REFRESH), name="laptop", cache_dir=cache,
                endpoint_url=s3_proxy.url)
    now = walk(m.path)
    assert str(m.path / "y3" / "event31" / "new.jpg") in now
    assert str(m.path / "y0" / "event1" / "photo.jpg") not in now
    assert (m.path / "y3" / "event31" / "new.jpg").read_bytes() == b"new\n"
    # Only the folders that changed were read again.
    dir_gets = {r.path.rsplit("/", 1)[1] for r in s3_proxy.requests if "/dirs/" in r.path}
    assert len(dir_gets) == 2, dir_gets


def test_a_reader_sees_the_single_writers_changes_through_its_head(
        s3_bucket, ignoring_server, mounter):
    a = mounter(s3_bucket.url, "--refresh", str(REFRESH), endpoint_url=ignoring_server.url,
                name="writer")
    assert a.status()["write_mode"].startswith("single writer")
    (a.path / "photos").mkdir()
    (a.path / "photos" / "one.txt").write_bytes(b"one")
    a.wait_idle()
    ro = mounter(s3_bucket.url, "--read-only", "--refresh", str(REFRESH),
                 endpoint_url=ignoring_server.url, name="reader")
    assert os.listdir(ro.path / "photos") == ["one.txt"]
    (a.path / "photos" / "two.txt").write_bytes(b"two")
    a.wait_idle()
    visible_within("the writer's new file", lambda: (ro.path / "photos" / "two.txt")
                   .read_bytes() == b"two")
