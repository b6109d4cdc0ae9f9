"""Folders that merge and removals that stick, on real mounts of one moto bucket over HTTP
(issue 15; the rules are in docs/cross-machine.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .mountutil import file_tree as tree
from .mountutil import run_cli
from .test_multi_machine import content, idle, logs_on_failure, status, until

LEVELS = ("2024", "2024/summer", "2024/summer/beach")
REFRESH = "1"


@pytest.fixture(autouse=True)
def _control_socket_dir(mount_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The mounts' control sockets are asked from this process (as in test_multi_machine)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", mount_env["XDG_RUNTIME_DIR"])


def two_mounts(mounter, bucket) -> tuple:
    """Two machines on one bucket, each with its own cache, refreshing every REFRESH s."""
    return tuple(mounter(bucket.url, "--refresh", REFRESH, name=name,
                         endpoint_url=bucket.endpoint_url) for name in ("alpha", "beta"))


def verify(bucket, env: dict[str, str]) -> dict:
    res = run_cli(["--verify", "--json", "--storage", bucket.url,
                   "--endpoint-url", bucket.endpoint_url], env, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


def unreachable(report: dict) -> int:
    return sum(n.get("count", 0) for n in report.get("notes", ())
               if n.get("kind") == "unreachable-manifests")


def source_tree(root: Path, side: str, count: int) -> dict[str, bytes]:
    """`count` files over three same-named folder levels, named after the side."""
    out = {}
    for i in range(count):
        rel = f"{LEVELS[i % 3]}/{side}-{i:03d}.jpg"
        out[rel] = content(side, i, 300 + 11 * i)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(out[rel])
    return out


def copy_at_once(sources: list[Path], mounts: list) -> None:
    """One real `cp -r` per machine, started together, of a same-named folder tree."""
    procs = [subprocess.Popen(["cp", "-r", str(src / "2024"), str(m.path)],
                              stderr=subprocess.PIPE) for src, m in zip(sources, mounts, strict=True)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err


def test_three_machines_copying_one_same_named_tree_make_one_tree(
        s3_bucket, mounter, mount_env, tmp_path: Path):
    mounts = [mounter(s3_bucket.url, "--refresh", REFRESH, name=n,
                      endpoint_url=s3_bucket.endpoint_url) for n in ("alpha", "beta", "gamma")]
    with logs_on_failure(*mounts):
        expected: dict[str, bytes] = {}
        sources = []
        for side in ("a", "b", "c"):
            src = tmp_path / f"src-{side}"
            expected |= source_tree(src, side, 200)
            sources.append(src)
        copy_at_once(sources, mounts)
        for m in mounts:
            idle(m)
        for m in mounts:
            idle(m)  # (a merge found by one commit may queue more)
        for m in mounts:
            until(f"the union on {m.path.name}",
                  lambda m=m: tree(m.path) == expected, timeout=60)
            assert sorted(os.listdir(m.path)) == ["2024"]
        assert sum(status(m)["conflicts"] for m in mounts) == 0
        fresh = mounter(s3_bucket.url, name="fresh", endpoint_url=s3_bucket.endpoint_url)
        assert tree(fresh.path) == expected
        assert not [p for p in tree(fresh.path) if "conflict" in p]
    report = verify(s3_bucket, mount_env)
    assert report["problems"] == [] and unreachable(report) == 0, report


def test_rsync_delete_into_one_mount_leaves_nothing_unreachable(
        s3_bucket, mounter, mount_env, tmp_path: Path):
    if shutil.which("rsync") is None:
        pytest.fail("rsync is not installed (bash scripts/setup.sh --tests installs it)")
    m = mounter(s3_bucket.url, "--refresh", REFRESH, endpoint_url=s3_bucket.endpoint_url)
    src = tmp_path / "src"
    with logs_on_failure(m):
        for top in ("status", "logs", "photos"):
            for sub in ("a", "b", "a/deep"):
                for i in range(8):
                    path = src / top / sub / f"f{i}.txt"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(content(f"{top}/{sub}", i, 200))
        rsync = ["rsync", "-a", "--delete", f"{src}/", f"{m.path}/"]
        subprocess.run(rsync, check=True, capture_output=True, timeout=180)
        m.wait_idle()
        # Folders renamed (and one re-created under an old name) in the source.
        (src / "status").rename(src / "state")
        (src / "photos" / "a").rename(src / "photos" / "c")
        (src / "logs" / "a" / "deep").rename(src / "logs" / "deeper")
        (src / "status").mkdir()
        (src / "status" / "new.txt").write_bytes(b"new")
        subprocess.run(rsync, check=True, capture_output=True, timeout=180)
        m.wait_idle()
        subprocess.run(rsync, check=True, capture_output=True, timeout=180)  # nothing to do
        m.wait_idle()
        want = tree(src)
        assert tree(m.path) == want
        assert "another machine" not in m.logtext()
    fresh = mounter(s3_bucket.url, name="fresh", endpoint_url=s3_bucket.endpoint_url)
    assert tree(fresh.path) == want
    report = verify(s3_bucket, mount_env)
    assert report["problems"] == [] and unreachable(report) == 0, report


def test_a_mount_killed_during_a_folder_merge_loses_nothing(
        s3_bucket, mounter, mount_env, tmp_path: Path):
    a, b = two_mounts(mounter, s3_bucket)
    with logs_on_failure(a, b):
        expected = source_tree(tmp_path / "src-a", "a", 90)
        expected |= source_tree(tmp_path / "src-b", "b", 90)
        copy_at_once([tmp_path / "src-a", tmp_path / "src-b"], [a, b])
        idle(a)
        # beta is killed once its first folder merge is done, while the merges of the
        # subfolders and its uploads are still on their way
        until("beta's first merge", lambda: "merged this machine" in b.logtext()
              or status(b)["pending_ops"] == 0, timeout=60)
        b.kill()
        b2 = mounter(s3_bucket.url, "--refresh", REFRESH, name="beta",
                     cache_dir=b.cache_dir, endpoint_url=s3_bucket.endpoint_url)
        idle(b2)
        idle(b2)
        fresh = mounter(s3_bucket.url, name="fresh", endpoint_url=s3_bucket.endpoint_url)
        assert tree(fresh.path) == expected
    report = verify(s3_bucket, mount_env)
    assert report["problems"] == [] and unreachable(report) == 0, report


def test_one_folder_renamed_to_two_names_on_two_mounts_ends_under_one(
        s3_bucket, mounter, mount_env):
    a, b = two_mounts(mounter, s3_bucket)
    with logs_on_failure(a, b):
        (a.path / "d" / "inner").mkdir(parents=True)
        (a.path / "d" / "inner" / "f.txt").write_bytes(b"f")
        idle(a)
        until("d on beta", lambda: (b.path / "d" / "inner" / "f.txt").exists())
        os.rename(a.path / "d", a.path / "x")
        os.rename(b.path / "d", b.path / "y")
        idle(a)
        idle(b)
        idle(a)
        for m in (a, b):
            until(f"one name on {m.path.name}",
                  lambda m=m: len(os.listdir(m.path)) == 1, timeout=30)
        names = {os.listdir(m.path)[0] for m in (a, b)}
        assert len(names) == 1 and names <= {"x", "y"}
        fresh = mounter(s3_bucket.url, name="fresh", endpoint_url=s3_bucket.endpoint_url)
        assert tree(fresh.path) == {f"{names.pop()}/inner/f.txt": b"f"}
    report = verify(s3_bucket, mount_env)
    assert report["problems"] == [] and unreachable(report) == 0, report


def test_a_folder_removed_on_one_mount_while_the_other_adds_to_it(
        s3_bucket, mounter, mount_env):
    a, b = two_mounts(mounter, s3_bucket)
    with logs_on_failure(a, b):
        for d in ("d1", "d2"):
            (a.path / d).mkdir()
            (a.path / d / "old.txt").write_bytes(b"old")
        idle(a)
        until("the folders on beta", lambda: (b.path / "d2" / "old.txt").exists())
        for d, first in (("d1", a), ("d2", b)):  # either machine's change lands first
            (a.path / d / "old.txt").unlink()
            (b.path / d / "new.txt").write_bytes(b"new " + d.encode())
            os.rmdir(a.path / d)
            second = b if first is a else a
            idle(first)
            idle(second)
            idle(first)
        fresh = mounter(s3_bucket.url, name="fresh", endpoint_url=s3_bucket.endpoint_url)
        assert tree(fresh.path) == {"d1/new.txt": b"new d1", "d2/new.txt": b"new d2"}
        for m in (a, b):
            until(f"both folders on {m.path.name}",
                  lambda m=m: tree(m.path) == tree(fresh.path), timeout=30)
    report = verify(s3_bucket, mount_env)
    assert report["problems"] == [] and unreachable(report) == 0, report


# kill -9 of one machine at a step of a folder merge, held there by the proxy: (the side
# killed, the request held: method, path). "alpha" copies first; beta's tree merges in.
MERGE_KILLS = {
    # beta's write of the root (the name "2024" meeting alpha's) never lands
    "beta-before-its-root-write": ("beta", "PUT", r"/dirs/root\.json"),
    # beta's merge landed; the merged-away folder's manifest is not yet deleted
    "beta-after-the-merge-landed": ("beta", "DELETE", r"/dirs/"),
    # alpha's own root write never lands: beta's "2024" takes the name meanwhile, and
    # alpha's tree merges into it when alpha comes back
    "alpha-before-its-root-write": ("alpha", "PUT", r"/dirs/root\.json"),
}


@pytest.mark.parametrize("case", sorted(MERGE_KILLS))
def test_kill_9_during_a_folder_merge_loses_nothing(
        s3_bucket, s3_proxy, mounter, mount_env, tmp_path: Path, case):
    """Both machines copy a same-named three-level tree; one is killed (SIGKILL) while a
    request of the merge is held at the proxy (answered 503 once the mount is dead), then
    mounted again on its cache: both list the union, and so does a fresh mount."""
    killed, method, path = MERGE_KILLS[case]
    # A beta to be killed must not see alpha's "2024" before its own commit meets it (its
    # `cp -r` would copy into alpha's folder, no merge): it refreshes only once an hour.
    a, b = (mounter(s3_bucket.url, "--refresh", "3600" if (name, killed) == ("beta",) * 2
                    else REFRESH, name=name, endpoint_url=s3_proxy.url)
            for name in ("alpha", "beta"))
    expected: dict[str, bytes] = {}
    sources = {}
    for side, m in (("a", a), ("b", b)):
        sources[m.path.name] = tmp_path / f"src-{side}"
        expected |= source_tree(sources[m.path.name], side, 30)
    victim = a if killed == "alpha" else b
    with logs_on_failure(a, b):
        for m in (a, b):  # alpha copies first; the victim is killed once its request is held
            if m is victim:
                held = s3_proxy.inject(method=method, path=path, delay=120, status=503)
            shutil.copytree(sources[m.path.name] / "2024", m.path / "2024")
            if m is victim:
                until(f"{m.path.name}'s held request", lambda held=held: held.hits == 1,
                      timeout=60)
                victim.kill()
            else:
                idle(m)
        s3_proxy.clear_faults()  # (the held request is answered 503 to a dead mount)
        again = mounter(s3_bucket.url, "--refresh", REFRESH, name=victim.path.name + "-2",
                        cache_dir=victim.cache_dir, endpoint_url=s3_proxy.url)
        survivor = b if victim is a else a
        for m in (again, survivor, again):
            idle(m)
        for m in (again, survivor):
            until(f"the union on {m.path.name}",
                  lambda m=m: tree(m.path) == expected, timeout=60)
        fresh = mounter(s3_bucket.url, name="fresh", endpoint_url=s3_bucket.endpoint_url)
        assert tree(fresh.path) == expected
        # (the killed machine's tree was merged, before or after the kill)
        assert "was also created on another machine" in victim.logtext() + again.logtext()
    report = verify(s3_bucket, mount_env)
    assert report["problems"] == [] and unreachable(report) == 0, report
