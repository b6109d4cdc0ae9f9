"""`imgrepo-mount --verify [--data]` and `--gc`: checking and cleaning a repository.

The end-to-end tests write through a real mount, then run the real CLI against the bucket;
the damage tests craft broken objects by hand (tests/craft.py); the gc safety tests call the
collector in-process with a chosen clock, so the grace period can be crossed without
waiting.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import trio

from fsrepo.maintenance.gc import GC_STATE_KEY, collect
from fsrepo.maintenance.verify import verify
from fsrepo.namespace import EMPTY_SHA
from fsrepo.repository import blob_key
from fsrepo.store import open_store

from . import craft
from .mountutil import file_tree as _tree
from .mountutil import run_cli


def _cli(storage, env, *args, check=False):
    extra = ["--endpoint-url", storage.endpoint_url] if storage.endpoint_url else []
    return run_cli([*args, "--storage", storage.url, *extra], env, check=check)




def _blob_keys(store) -> set[str]:
    async def main():
        return {info.key async for info in store.list("blobs/")}
    return trio.run(main)


def test_verify_and_gc_end_to_end(storage, mounter, mount_env, tmp_path: Path):
    """Write, duplicate, overwrite and delete through a mount; verify finds nothing wrong;
    gc frees exactly the blobs nothing references (after the grace period) and the tree is
    intact afterwards, byte for byte, from a fresh cache."""
    m = mounter(storage.url, endpoint_url=storage.endpoint_url)
    keep = {f"photos/p{i}.jpg": os.urandom(50_000 + i) for i in range(6)}
    for rel, data in keep.items():
        (m.path / rel).parent.mkdir(exist_ok=True)
        (m.path / rel).write_bytes(data)
    (m.path / "copy.jpg").write_bytes(keep["photos/p0.jpg"])  # dedup: no new blob
    doomed = {f"tmp/t{i}.bin": os.urandom(70_000 + i) for i in range(3)}
    (m.path / "tmp").mkdir()
    for rel, data in doomed.items():
        (m.path / rel).write_bytes(data)
    m.wait_idle()  # everything above is in the bucket
    (m.path / "photos/p5.jpg").write_bytes(b"replaced")  # the old content becomes garbage
    keep["photos/p5.jpg"] = b"replaced"
    keep["copy.jpg"] = keep["photos/p0.jpg"]
    m.wait_idle()
    for rel in doomed:
        (m.path / rel).unlink()
    os.rmdir(m.path / "tmp")
    m.unmount()
    garbage_bytes = sum(len(d) for d in doomed.values()) + 50_005

    res = _cli(storage, mount_env, "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no problems found" in res.stdout
    assert "4 blobs" in res.stdout and "not referenced" in res.stdout  # noted, not a problem

    res = _cli(storage, mount_env, "--verify", "--data", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["problems"] == []
    assert report["files"] == 7 and report["blobs_hashed"] == report["blobs"]

    store = storage.open()
    try:
        before = _blob_keys(store)
        # Dry run: says what would go, deletes nothing, records nothing.
        res = _cli(storage, mount_env, "--gc", "--dry-run", "--grace", "0", check=True)
        assert f"would delete 4 blobs, would free {garbage_bytes / 1024:.1f} KiB" in res.stdout
        assert _blob_keys(store) == before
        # Default grace: the unreferenced blobs are young and only now first seen: kept.
        res = _cli(storage, mount_env, "--gc", check=True)
        assert "deleted 0 blobs" in res.stdout and "kept 4 unreferenced blobs" in res.stdout
        assert _blob_keys(store) == before
        res = _cli(storage, mount_env, "--gc", "--grace", "0", check=True)
        assert f"deleted 4 blobs, freed {garbage_bytes / 1024:.1f} KiB" in res.stdout
        after = _blob_keys(store)
        assert len(before - after) == 4 and after < before
        assert blob_key(EMPTY_SHA) not in before - after
        # Idempotent.
        res = _cli(storage, mount_env, "--gc", "--grace", "0", check=True)
        assert "deleted 0 blobs" in res.stdout
    finally:
        trio.run(store.aclose)

    res = _cli(storage, mount_env, "--verify", "--data")
    assert res.returncode == 0 and "no problems found" in res.stdout, res.stdout
    assert "not referenced" not in res.stdout
    m2 = mounter(storage.url, endpoint_url=storage.endpoint_url, cache_dir=tmp_path / "fresh")
    assert _tree(m2.path) == keep


def test_verify_reports_each_problem_precisely(tmp_path: Path, mount_env):
    root = craft.new_repo(tmp_path / "repo")
    good = craft.file_of(root, b"good content")
    gone = craft.sha(b"never uploaded")
    corrupt = craft.put_blob(root, b"not what the name says", name=craft.sha(b"original"))
    short = craft.put_blob(root, b"12345")
    craft.put_manifest(root, "root", {
        "ok.txt": good,
        "albums": craft.dir_entry("albums1"),
        "broken": craft.dir_entry("broken1"),
        "loop": craft.dir_entry("loop1"),
        "zagain": craft.dir_entry("albums1"),
    })
    craft.put_manifest(root, "albums1", {
        "missing.jpg": craft.file_entry(gone, 14),
        "corrupt.jpg": craft.file_entry(corrupt, len(b"not what the name says")),
        "short.jpg": craft.file_entry(short, 999),
        "bad..type": {"type": "socket"},
    }, raw_entries={b"a/b": good})
    craft.put_manifest(root, "broken1", body=b"{ this is not json")
    craft.put_manifest(root, "loop1", {"child": craft.dir_entry("loop2")})
    craft.put_manifest(root, "loop2", {"up": craft.dir_entry("loop1")})
    craft.put_manifest(root, "orphan1", {"x": good})
    url = f"file://{root}"

    res = run_cli(["--verify", "--storage", url, "--json"], mount_env, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(res.stdout)
    by_kind: dict[str, list[str]] = {}
    for p in report["problems"]:
        by_kind.setdefault(p["kind"], []).append(p["message"])
    assert by_kind.keys() == {"missing-blob", "size-mismatch", "bad-manifest", "refused-entry",
                              "cycle", "shared-directory"}, report["problems"]
    assert any("/albums/missing.jpg" in t and gone in t for t in by_kind["missing-blob"])
    assert any("/albums/short.jpg" in t and "999" in t for t in by_kind["size-mismatch"])
    assert any("/broken" in t and "not valid JSON" in t for t in by_kind["bad-manifest"])
    assert any("'a/b'" in t for t in by_kind["refused-entry"])
    assert any("socket" in t for t in by_kind["refused-entry"])
    assert any("/loop/child/up" in t for t in by_kind["cycle"])
    assert any("/zagain" in t and "/albums" in t for t in by_kind["shared-directory"])
    notes = {n["kind"]: n for n in report["notes"]}
    assert notes["unreachable-manifests"]["dir_ids"] == ["orphan1"]
    assert "corrupt-blob" not in by_kind  # only --data hashes contents

    res = run_cli(["--verify", "--data", "--storage", url], mount_env, check=False)
    assert res.returncode == 1
    lines = [line for line in res.stdout.splitlines() if line.startswith("problem: ")]
    corrupt_lines = [line for line in lines if "hashes to" in line]
    assert len(corrupt_lines) == 1 and corrupt in corrupt_lines[0]
    assert "/albums/corrupt.jpg" in corrupt_lines[0]
    assert "problems found" in res.stdout.splitlines()[-1]
    assert "Traceback" not in res.stderr


def test_verify_and_gc_refuse_a_location_without_repository(tmp_path: Path, mount_env):
    (tmp_path / "empty").mkdir()
    for args in (["--verify"], ["--gc"]):
        res = run_cli([*args, "--storage", f"file://{tmp_path}/empty"], mount_env, check=False)
        assert res.returncode != 0
        assert res.stderr.strip().startswith("imgrepo-mount: error:")
        assert "no imgrepo repository" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "empty" / "imgrepo.json").exists()
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == []
    for args in (["--verify"], ["--gc"]):  # a folder that is not there is not made
        res = run_cli([*args, "--storage", f"file://{tmp_path}/missing"], mount_env,
                      check=False)
        assert res.returncode != 0 and "no imgrepo repository" in res.stderr
        assert not (tmp_path / "missing").exists()


def _store(root: Path):
    return open_store(f"file://{root}")


def test_gc_grace_period_spans_two_runs_and_protects_reuse(tmp_path: Path):
    """A blob is deleted only when an earlier run saw it unreferenced at least GRACE ago
    and it is still unreferenced; re-use in between (dedup) saves it."""
    root = craft.new_repo(tmp_path / "repo")
    used = craft.file_of(root, b"in use")
    old1 = craft.put_blob(root, b"deleted photo 1")
    old2 = craft.put_blob(root, b"deleted photo 2")
    in_odd = craft.put_blob(root, b"named only by an unparseable manifest")
    craft.put_manifest(root, "root", {"a": used})
    # A manifest we cannot parse must still protect what it names.
    craft.put_manifest(root, "future1", body=b'{"imgrepo_manifest": 9, "x": "'
                       + in_odd.encode() + b'"}')
    past = time.time() - 3 * 86400
    for d in (old1, old2, in_odd, used["sha256"]):
        os.utime(craft.blob_path(root, d), (past, past))
    store = _store(root)
    hour = 3600.0
    now = time.time()

    async def run(at: float, dry: bool = False):
        return await collect(store, 24, dry, now=at)

    c = trio.run(run, now)
    assert (c.unreferenced, c.deleted, c.kept_young) == (2, 0, 2)
    assert craft.blob_path(root, old1).exists()
    # Between the runs, another machine re-uses old1 (a re-imported photo).
    craft.put_manifest(root, "root", {"a": used, "again": craft.file_entry(old1, 15)})
    c = trio.run(run, now + 23 * hour)
    assert c.deleted == 0  # not yet 24 h since first seen
    c = trio.run(run, now + 25 * hour, True)
    assert c.deleted_shas == [old2]  # dry run
    assert craft.blob_path(root, old2).exists()
    c = trio.run(run, now + 25 * hour)
    assert c.deleted_shas == [old2] and c.freed_bytes == 15
    for d in (used["sha256"], old1, in_odd):
        assert craft.blob_path(root, d).exists()
    assert not craft.blob_path(root, old2).exists()
    # old1 is unreferenced again: the clock starts afresh.
    craft.put_manifest(root, "root", {"a": used})
    c = trio.run(run, now + 26 * hour)
    assert c.deleted == 0 and c.kept_young == 1
    c = trio.run(run, now + 51 * hour)
    assert c.deleted_shas == [old1]
    state = json.loads((root / GC_STATE_KEY).read_bytes())
    assert state["candidates"] == {}
    trio.run(store.aclose)


def test_gc_keeps_recent_uploads_not_yet_referenced(tmp_path: Path):
    """A blob another machine just uploaded, whose manifest is not written yet."""
    root = craft.new_repo(tmp_path / "repo")
    craft.put_manifest(root, "root", {})
    fresh = craft.put_blob(root, b"uploaded a moment ago")
    old = craft.put_blob(root, b"garbage")
    past = time.time() - 3 * 86400
    os.utime(craft.blob_path(root, old), (past, past))
    state = {"format": 1, "candidates": {fresh: past, old: past}}
    (root / "gc").mkdir()
    (root / GC_STATE_KEY).write_text(json.dumps(state))
    store = _store(root)
    c = trio.run(collect, store, 1.0, False)
    assert c.deleted_shas == [old] and c.kept_young == 1
    assert craft.blob_path(root, fresh).exists()
    trio.run(store.aclose)


def test_gc_while_a_mount_writes(s3_bucket, mounter, tmp_path: Path):
    """gc runs over and over while a mount keeps adding, copying and deleting files:
    nothing that is referenced (or about to be) is ever deleted."""
    m = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url)
    written: dict[str, bytes] = {}
    # Files already in the bucket, deleted while gc runs: their blobs must be collected.
    # (Files deleted before their upload never cost an upload, so nothing to collect.)
    old = [f"old{k}" for k in range(20)]
    for name in old:
        written[name] = os.urandom(3000)
        (m.path / name).write_bytes(written[name])
    m.wait_idle()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set() and i < 400:
                if i % 10 == 0 and old:
                    name = old.pop()
                    (m.path / name).unlink()
                    del written[name]
                data = os.urandom(2000 + i)
                (m.path / f"f{i}").write_bytes(data)
                written[f"f{i}"] = data
                if i % 3 == 0 and i:
                    (m.path / f"f{i - 1}").unlink()
                    del written[f"f{i - 1}"]
                if i % 5 == 0 and i > 10:
                    (m.path / f"c{i}").write_bytes(written[f"f{i - 10}"] if f"f{i - 10}"
                                                   in written else b"x")
                    written[f"c{i}"] = (m.path / f"c{i}").read_bytes()
                i += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    store = s3_bucket.open()
    deleted = 0
    try:
        deadline = time.time() + 12
        while time.time() < deadline:
            c = trio.run(collect, store, 4 / 3600, False)  # a grace period of 4 seconds
            deleted += c.deleted
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    m.wait_idle()
    m.unmount()
    deleted += trio.run(collect, store, 0, False).deleted
    assert deleted > 0  # it did collect the deleted files' blobs
    v = trio.run(verify, store, True)
    trio.run(store.aclose)
    assert v.problems == []
    m2 = mounter(s3_bucket.url, endpoint_url=s3_bucket.endpoint_url,
                 cache_dir=tmp_path / "fresh")
    assert _tree(m2.path) == written


def test_content_reimported_after_gc_deleted_it_is_uploaded_again(storage, mounter,
                                                                   tmp_path: Path):
    """The mount remembers which blobs the bucket has (dedup). After a gc deleted one that
    nothing referenced any more, the same content written again must be uploaded again,
    not re-used from that memory (which would name a blob that is gone)."""
    photo = os.urandom(120_000)
    m = mounter(storage.url, endpoint_url=storage.endpoint_url, name="m")
    (m.path / "photo.jpg").write_bytes(photo)
    m.wait_idle()
    (m.path / "photo.jpg").unlink()
    m.unmount()
    store = storage.open()
    try:
        assert trio.run(collect, store, 0, False).deleted_shas == [craft.sha(photo)]
        m = mounter(storage.url, endpoint_url=storage.endpoint_url, name="m",
                    cache_dir=m.cache_dir)  # same local state: it still "knows" the blob
        (m.path / "again.jpg").write_bytes(photo)  # re-imported from the camera
        (m.path / "copy.jpg").write_bytes(photo)
        m.wait_idle()
        m.unmount()
        report = trio.run(verify, store, True)
        assert report.problems == [], report.problems
    finally:
        trio.run(store.aclose)
    fresh = mounter(storage.url, endpoint_url=storage.endpoint_url, name="fresh",
                    cache_dir=tmp_path / "cache-fresh")
    assert _tree(fresh.path) == {"again.jpg": photo, "copy.jpg": photo}
