"""Hostile or damaged buckets: nothing in the bucket can hurt the machine that mounts it.

Repositories are crafted by hand (tests/craft.py) with every kind of bad entry a bucket can
hold, then mounted for real. Each bad thing must be refused or isolated with a clear log
line, the rest of the tree must keep working, and nothing outside the mountpoint (and the
mount's own cache) may change. The manifest parser is also fuzzed with Hypothesis.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
import tracemalloc
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsrepo import namespace
from fsrepo.errors import ConfigError, FsError, ManifestError
from fsrepo.heads import HeadError, parse_head, writer_of
from fsrepo.inodes import ROOT_INO
from fsrepo.manifest import (
    MAX_ENTRIES,
    MAX_MANIFEST_BYTES,
    MAX_NAME,
    MAX_SIZE,
    DirEntry,
    FileEntry,
    Manifest,
    SymlinkEntry,
    check_name,
    entry_from_json,
    is_valid_dir_id,
    parse_manifest,
    serialise_manifest,
)
from fsrepo.store import open_store
from fsrepo.store.base import GET_LIMIT

from . import craft
from .coreutil import list_dir, makedirs, running_engine, write_file


def _listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def _errno_of(fn) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return 0


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the repository and the mount, with content that must never change."""
    folder = tmp_path / "outside"
    (folder / "etc").mkdir(parents=True)
    (folder / "etc" / "passwd").write_text("root:x:0:0\n")
    (folder / "secret").write_bytes(os.urandom(100))
    return folder


def _untouched(outside: Path, before: dict) -> None:
    assert craft.snapshot(outside) == before
    assert sorted(p.name for p in outside.parent.iterdir()) == sorted(
        p.name for p in outside.parent.iterdir() if p.name in {
            "outside", "repo", "home", "mnt1", "mnt2", "fresh"}
        or p.name.startswith("cache-") or p.name.endswith(".stderr"))


def test_bad_names_and_entries_are_refused_one_by_one(tmp_path: Path, mounter, outside):
    root = craft.new_repo(tmp_path / "repo")
    good = craft.file_of(root, b"good photo")
    ok_dir_file = craft.file_of(root, b"inside")
    craft.put_manifest(root, "sub1", {"inner.txt": ok_dir_file})
    long_ok = "L" * MAX_NAME
    entries = {
        "ok.txt": good,
        long_ok: good,
        "sub": craft.dir_entry("sub1"),
        "link": {"type": "symlink", "target": "../../outside/etc/passwd", "mtime_ns": 0},
        "future": {**good, "mtime_ns": 1 << 62},
        "past": {**good, "mtime_ns": -(1 << 62)},
        "setuid": {**good, "mode": 0o4755},
        # refused:
        "L" * (MAX_NAME + 1): good,
        "nul\u0000name": good,
        ".": good,
        "..": good,
        "": good,
        "list": [1, 2],
        "number": 5,
        "string": "file",
        "no type": {"sha256": good["sha256"], "size": 10},
        "bad sha": {**good, "sha256": "../../../../etc/passwd"},
        "short sha": {**good, "sha256": "abc"},
        "negative": {**good, "size": -1},
        "too big": {**good, "size": MAX_SIZE + 1},
        "size as text": {**good, "size": "10"},
        "bool size": {**good, "size": True},
        "float size": {**good, "size": 10.0},
        "mode": {**good, "mode": 0o170000},
        "escape dir": craft.dir_entry("../../outside"),
        "slash dir": {"type": "dir", "id": "a/b", "mtime_ns": 0},
        "root again": craft.dir_entry("root"),
        "nul link": {"type": "symlink", "target": "a\u0000b", "mtime_ns": 0},
        "empty link": {"type": "symlink", "target": "", "mtime_ns": 0},
        "long link": {"type": "symlink", "target": "x" * 5000, "mtime_ns": 0},
        "device": {"type": "chardev", "rdev": 0},
    }
    raw = {
        b"\xff\xferaw-ok": good,  # not UTF-8, but a fine name
        b"a/b": good,
        b"../../outside/secret": good,
        b"x\x00y": good,
    }
    craft.put_manifest(root, "root", entries, raw, extra_field={"ignored": True})
    # A base64 key that does not decode.
    doc = json.loads((root / "dirs/root.json").read_bytes())
    doc["raw_entries"]["!!not base64!!"] = good
    craft.put_manifest(root, "root", body=json.dumps(doc).encode())
    before_outside = craft.snapshot(outside)
    before_repo = craft.snapshot(root)

    m = mounter(f"file://{root}")
    names = set(os.listdir(m.path))
    assert names == {"ok.txt", long_ok, "sub", "link", "future", "past", "setuid",
                     os.fsdecode(b"\xff\xferaw-ok")}
    assert (m.path / "ok.txt").read_bytes() == b"good photo"
    assert (m.path / os.fsdecode(b"\xff\xferaw-ok")).read_bytes() == b"good photo"
    assert (m.path / long_ok).read_bytes() == b"good photo"
    assert (m.path / "sub" / "inner.txt").read_bytes() == b"inside"
    assert os.readlink(m.path / "link") == "../../outside/etc/passwd"
    assert os.stat(m.path / "future").st_mtime_ns == 1 << 62
    assert os.stat(m.path / "past").st_mtime_ns == -(1 << 62)
    # The mount is nosuid: a set-uid bit from the bucket cannot raise anyone's privileges.
    assert os.statvfs(m.path).f_flag & os.ST_NOSUID
    assert stat.S_IMODE(os.stat(m.path / "setuid").st_mode) == 0o4755
    for bad in ("nul link", "escape dir", "a", "list"):
        assert _errno_of(lambda b=bad: os.stat(m.path / b)) in (errno.ENOENT,), bad

    log = m.logtext()
    refused = [line for line in log.splitlines() if "refused entry" in line]
    assert len(refused) == 28, "\n".join(refused)
    assert all(" WARNING " in line for line in refused)
    for shown in ("'nul\\x00name'", "'..'", "'a/b'", "'../../outside/secret'", "'x\\x00y'",
                  "'!!not base64!!'", "'escape dir'", "'too big'", "'device'"):
        assert any(shown in line for line in refused), shown
    assert "Traceback" not in log

    # The tree keeps working for writes too.
    (m.path / "new.txt").write_bytes(b"new")
    (m.path / "sub" / "more.txt").write_bytes(b"more")
    m.unmount()
    m2 = mounter(f"file://{root}", cache_dir=tmp_path / "cache-fresh")
    assert (m2.path / "new.txt").read_bytes() == b"new"
    assert (m2.path / "sub" / "more.txt").read_bytes() == b"more"
    assert (m2.path / "ok.txt").read_bytes() == b"good photo"
    m2.unmount()
    _untouched(outside, before_outside)
    after_repo = craft.snapshot(root)
    for key in before_repo:  # blobs and other manifests were only read
        if key != "dirs/root.json" and key != "dirs/sub1.json":
            assert after_repo[key] == before_repo[key], key


def test_damaged_manifests_are_isolated_and_recover(tmp_path: Path, mounter, outside):
    root = craft.new_repo(tmp_path / "repo")
    good = craft.file_of(root, b"fine")
    craft.put_manifest(root, "root", {
        "good": craft.dir_entry("good1"),
        "notjson": craft.dir_entry("bad1"),
        "wrongid": craft.dir_entry("bad2"),
        "array": craft.dir_entry("bad3"),
        "newer": craft.dir_entry("bad4"),
        "entries-list": craft.dir_entry("bad5"),
        "deep": craft.dir_entry("bad6"),
        "binary": craft.dir_entry("bad7"),
        "empty": craft.dir_entry("never-written"),
        "top.txt": good,
    })
    craft.put_manifest(root, "good1", {"a.txt": good})
    craft.put_manifest(root, "bad1", body=b'{"imgrepo_manifest": 1, "dir_id": "bad1", ')
    craft.put_manifest(root, "bad2", body=json.dumps(
        {"imgrepo_manifest": 1, "dir_id": "good1", "entries": {"x": good}}).encode())
    craft.put_manifest(root, "bad3", body=b"[1, 2, 3]")
    craft.put_manifest(root, "bad4", body=json.dumps(
        {"imgrepo_manifest": 2, "dir_id": "bad4", "entries": {}}).encode())
    craft.put_manifest(root, "bad5", body=json.dumps(
        {"imgrepo_manifest": 1, "dir_id": "bad5", "entries": [["x", good]]}).encode())
    craft.put_manifest(root, "bad6", body=b"[" * 100_000 + b"]" * 100_000)
    craft.put_manifest(root, "bad7", body=os.urandom(4096))
    before = craft.snapshot(outside)

    m = mounter(f"file://{root}")
    assert set(os.listdir(m.path)) == {"good", "notjson", "wrongid", "array", "newer",
                                       "entries-list", "deep", "binary", "empty", "top.txt"}
    for name in ("notjson", "wrongid", "array", "newer", "entries-list", "deep", "binary"):
        assert _errno_of(lambda n=name: os.listdir(m.path / n)) == errno.EIO, name
        assert _errno_of(lambda n=name: (m.path / n / "f").write_bytes(b"x")) == errno.EIO
    assert os.listdir(m.path / "empty") == []
    assert (m.path / "good" / "a.txt").read_bytes() == b"fine"
    (m.path / "good" / "b.txt").write_bytes(b"still writable")
    (m.path / "empty" / "c.txt").write_bytes(b"into an empty directory")
    log = m.logtext()
    assert "manifest of directory bad1 is not valid JSON" in log
    assert "manifest of directory bad2 claims to be 'good1'" in log
    assert "manifest of directory bad3 is not a JSON object" in log
    assert "manifest of directory bad4 has unsupported format 2" in log
    assert "manifest of directory bad5: entries are not objects" in log
    assert "manifest of directory bad6 is not valid JSON" in log
    assert "Traceback" not in log
    # Repaired in the bucket: the directory works without a remount.
    craft.put_manifest(root, "bad1", {"healed.txt": good})
    assert (m.path / "notjson" / "healed.txt").read_bytes() == b"fine"
    m.wait_idle()
    assert m.status()["pid"] == m.proc.pid  # the mount is alive and well
    m.unmount()
    _untouched(outside, before)


def test_directory_cycles_are_refused(tmp_path: Path, mounter):
    root = craft.new_repo(tmp_path / "repo")
    good = craft.file_of(root, b"x")
    craft.put_manifest(root, "root", {"a": craft.dir_entry("A1"), "f": good})
    craft.put_manifest(root, "A1", {"b": craft.dir_entry("B1"), "self": craft.dir_entry("A1"),
                                    "fa": good})
    craft.put_manifest(root, "B1", {"back": craft.dir_entry("A1"), "fb": good})
    m = mounter(f"file://{root}")
    seen = []
    for dirpath, dirs, files in os.walk(m.path):  # terminates
        seen.append((os.path.relpath(dirpath, m.path), sorted(dirs), sorted(files)))
        assert len(seen) < 10
    assert seen == [(".", ["a"], ["f"]), ("a", ["b"], ["fa"]), ("a/b", [], ["fb"])]
    assert _errno_of(lambda: os.stat(m.path / "a" / "self")) == errno.EIO
    assert _errno_of(lambda: os.stat(m.path / "a" / "b" / "back")) == errno.EIO
    # A cycle cannot be made from inside either.
    assert _errno_of(lambda: os.rename(m.path / "a", m.path / "a" / "b" / "a")) == errno.EINVAL
    log = m.logtext()
    assert "lists its own ancestor A1 as b'self': refused (a cycle)" in log
    assert "lists its own ancestor A1 as b'back': refused (a cycle)" in log


def test_missing_corrupt_and_oversized_blobs_fail_reads_cleanly(tmp_path: Path, mounter,
                                                                outside):
    root = craft.new_repo(tmp_path / "repo")
    good = craft.file_of(root, b"good bytes")
    corrupt = craft.put_blob(root, b"tampered", name=craft.sha(b"original!"))
    small = craft.put_blob(root, b"tiny")
    craft.put_manifest(root, "root", {
        "good.jpg": good,
        "missing.jpg": craft.file_entry(craft.sha(b"never uploaded"), 14),
        "corrupt.jpg": craft.file_entry(corrupt, len(b"tampered")),
        "short.jpg": craft.file_entry(small, 400),
        "huge.bin": craft.file_entry(small, MAX_SIZE),
    })
    before = craft.snapshot(outside)
    m = mounter(f"file://{root}")
    assert os.stat(m.path / "huge.bin").st_size == MAX_SIZE
    for name in ("missing.jpg", "corrupt.jpg", "short.jpg"):
        assert _errno_of(lambda n=name: (m.path / n).read_bytes()) == errno.EIO, name
    with open(m.path / "huge.bin", "rb") as fh:
        assert _errno_of(lambda: fh.read(1 << 20)) == errno.EIO
    with open(m.path / "huge.bin", "rb") as fh:  # far into a file that is not there
        fh.seek(MAX_SIZE // 2)
        assert _errno_of(lambda: fh.read(10)) == errno.EIO
    assert (m.path / "good.jpg").read_bytes() == b"good bytes"
    # Nothing bad was kept in the cache: reading again fails again (no stale success).
    assert _errno_of(lambda: (m.path / "corrupt.jpg").read_bytes()) == errno.EIO
    cached = {p.name for p in m.cache_dir.rglob("*") if p.is_file()}
    assert corrupt not in cached and small not in cached
    log = m.logtext()
    assert f"blob {corrupt} from the bucket is corrupt" in log
    assert f"blob {small} has 4 bytes in the bucket, the manifest says 400" in log
    assert "does not exist" in log
    assert "Traceback" not in log
    # Copying a broken file out fails; writing over it works.
    (m.path / "corrupt.jpg").write_bytes(b"replaced")
    assert (m.path / "corrupt.jpg").read_bytes() == b"replaced"
    m.unmount()
    _untouched(outside, before)


# -- fuzzing the parser ----------------------------------------------------------------------
def _check_result(data: bytes, dir_id: str) -> None:
    """parse_manifest either refuses the whole object with ManifestError, or returns only
    well-formed entries, which survive a serialise/parse round trip unchanged."""
    try:
        manifest, problems = parse_manifest(data, dir_id)
    except ManifestError as exc:
        assert dir_id in str(exc)
        return
    assert all(isinstance(p, str) and len(p) < 400 for p in problems)
    for name, entry in manifest.entries.items():
        check_name(name)
        assert isinstance(entry, FileEntry | DirEntry | SymlinkEntry)
        if isinstance(entry, FileEntry):
            assert 0 <= entry.size <= MAX_SIZE and len(entry.sha256) == 64
        if isinstance(entry, DirEntry):
            assert entry.id != "root" and "/" not in entry.id and "." not in entry.id
        if isinstance(entry, SymlinkEntry):
            assert entry.target and b"\0" not in entry.target
    again, problems2 = parse_manifest(serialise_manifest(manifest), dir_id)
    assert again.entries == manifest.entries and problems2 == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["file", "dir", "symlink", "root", "a" * 64]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
entry_values = st.fixed_dictionaries(
    {"type": st.sampled_from(["file", "dir", "symlink", "other"])},
    optional={
        "sha256": st.sampled_from(["a" * 64, "A" * 64, "0" * 63, "g" * 64]) | json_values,
        "size": st.integers(-5, MAX_SIZE + 5) | json_values,
        "mtime_ns": st.integers(-(2**63), 2**63) | json_values,
        "mode": st.integers(-1, 0o10000) | json_values,
        "id": st.sampled_from(["root", "abc", "../x", "a/b", "x" * 65, "ok-id_1"])
        | json_values,
        "target": st.text(max_size=10) | json_values,
        "target_b64": st.sampled_from(["", "AA==", "!!", "aGk="]) | json_values,
    },
)
names = st.text(max_size=10) | st.sampled_from(["", ".", "..", "a/b", "x\0", "n" * 256])
manifest_docs = st.fixed_dictionaries(
    {"imgrepo_manifest": st.sampled_from([1, 1, 1, 2, "1", None]),
     "dir_id": st.sampled_from(["d1", "d1", "d2", None])},
    optional={
        "entries": st.dictionaries(names, entry_values | json_values, max_size=6)
        | json_values,
        "raw_entries": st.dictionaries(
            st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode()) | names,
            entry_values | json_values, max_size=4) | json_values,
    },
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_parse_random_bytes(data: bytes):
    _check_result(data, "d1")


@FUZZ
@given(manifest_docs)
def test_fuzz_parse_random_manifests(doc):
    _check_result(json.dumps(doc).encode(), "d1")


def _valid_body() -> bytes:
    m = Manifest("d1", {
        b"a.jpg": FileEntry("ab" * 32, 10, 5, 0o644),
        b"sub": DirEntry("sub-1", 6, 0o755),
        b"\xff raw": FileEntry("cd" * 32, 0, 7, 0o600),
        b"link": SymlinkEntry(b"../a.jpg", 8),
        b"odd link": SymlinkEntry(b"\xfe\xff", 9),
    })
    return serialise_manifest(m)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["flip", "del", "ins"]),
                          st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_parse_mutated_manifests(mutations):
    data = bytearray(_valid_body())
    for pos, kind, value in mutations:
        pos %= len(data) + 1
        if kind == "flip" and pos < len(data):
            data[pos] ^= value or 1
        elif kind == "del" and pos < len(data):
            del data[pos]
        else:
            data.insert(pos, value)
    _check_result(bytes(data), "d1")


def test_parse_pathological_json_is_a_manifest_error():
    for body in (b"[" * 200_000 + b"]" * 200_000,
                 b'{"imgrepo_manifest":1,"dir_id":"d1","entries":' + b'{"a":' * 100_000
                 + b"1" + b"}" * 100_001,
                 b"\xef\xbb\xbf{}", b"", b"\x00" * 10, "é".encode("latin-1")):
        with pytest.raises(ManifestError):
            parse_manifest(body, "d1")


# -- limits and exact patterns -------------------------------------------------------------
def _many_entries(dir_id: str, count: int, entry: dict) -> bytes:
    """A manifest of `count` copies of `entry` (built as bytes: fast, and no dict of them)."""
    one = json.dumps(entry, separators=(",", ":")).encode()
    return (b'{"imgrepo_manifest":1,"dir_id":"' + dir_id.encode() + b'","entries":{'
            + b",".join(b'"p%07d.jpg":' % i + one for i in range(count)) + b"}}")


@pytest.mark.expected_logs(r"over the limit|more than 200000 entries|over the 80 MiB|"
                           r"refused entry|cannot read directory",
                           reason="the oversized manifests and the bad patterns are refused")
def test_oversized_manifests_are_refused_and_the_rest_works(tmp_path: Path, mounter):
    root = craft.new_repo(tmp_path / "repo")
    good = craft.file_of(root, b"fine")
    craft.put_manifest(root, "root", {
        "crowded": craft.dir_entry("crowded1"), "bulky": craft.dir_entry("bulky1"),
        "giant": craft.dir_entry("giant1"), "good": craft.dir_entry("good1"),
        "top.txt": good,
        # `$` in a pattern would take these (a trailing newline):
        "newline sha": {**good, "sha256": good["sha256"] + "\n"},
        "newline id": craft.dir_entry("good1\n"),
    })
    craft.put_manifest(root, "good1", {"a.txt": good})
    craft.put_manifest(root, "crowded1", body=_many_entries("crowded1", MAX_ENTRIES + 1, good))
    # Over the byte limit, and over what a `get` reads whole at all (sparse: cheap to make).
    for dir_id, size in (("bulky1", MAX_MANIFEST_BYTES + 1), ("giant1", GET_LIMIT + 1)):
        with open(craft.put_manifest(root, dir_id, {}), "r+b") as fh:
            fh.truncate(size)

    m = mounter(f"file://{root}")
    assert set(os.listdir(m.path)) == {"crowded", "bulky", "giant", "good", "top.txt"}
    for name in ("crowded", "bulky", "giant"):
        assert _errno_of(lambda n=name: os.listdir(m.path / n)) == errno.EIO, name
    assert (m.path / "good" / "a.txt").read_bytes() == b"fine"
    (m.path / "good" / "b.txt").write_bytes(b"still writable")
    m.wait_idle()
    log = m.logtext()
    assert f"manifest of directory crowded1 has more than {MAX_ENTRIES} entries" in log
    assert f"over the limit of {MAX_MANIFEST_BYTES >> 20} MiB" in log
    assert "giant1.json is 80 MiB, over the 80 MiB" in log
    refused = [line for line in log.splitlines() if "refused entry" in line]
    assert len(refused) == 2 and all("\\n" not in line for line in refused), refused
    assert "Traceback" not in log
    m.unmount()


def test_a_manifest_over_the_entry_limit_is_refused_before_it_is_all_built():
    good = {"type": "file", "sha256": "ab" * 32, "size": 1, "mtime_ns": 1, "mode": 0o644}
    body = _many_entries("d1", 2 * MAX_ENTRIES, good)
    assert len(body) < MAX_MANIFEST_BYTES  # the entry count is what refuses it
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match="more than 200000 entries"):
            parse_manifest(body, "d1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Building all 400,000 entries' objects takes ~280 MiB; stopped at the limit, ~160.
    assert peak < 210 << 20, peak >> 20


def test_hash_and_id_patterns_match_whole_strings():
    sha = "ab" * 32
    for bad in (sha + "\n", "\n" + sha, sha + "\x00"):
        with pytest.raises(ValueError):
            entry_from_json({"type": "file", "sha256": bad, "size": 1})
    assert not is_valid_dir_id("abc\n") and is_valid_dir_id("abc")
    assert writer_of("heads/" + "f" * 32 + ".json") == "f" * 32
    assert writer_of("heads/abc\n.json") is None
    with pytest.raises(HeadError):
        parse_head(json.dumps({"writer": "w", "seq": 2, "changes": [[1, "d1\n"]]}).encode(), "k")
    with pytest.raises(ConfigError):
        open_store("s3://bucket\n/p")


@pytest.mark.expected_logs(r"the limit of one directory", reason="the full directory says so")
def test_a_directory_at_the_entry_limit_refuses_new_names(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(namespace, "MAX_ENTRIES", 3)  # the real limit, met sooner

    async def main() -> None:
        async with running_engine(f"file://{tmp_path}/repo", None, tmp_path / "cache") as eng:
            full = await makedirs(eng, "full")
            for name in ("a", "b", "c"):
                await write_file(eng, f"full/{name}", name.encode())
            await write_file(eng, "elsewhere", b"x")
            with pytest.raises(FsError) as err:
                await write_file(eng, "full/d", b"d")
            assert err.value.errno == errno.ENOSPC
            with pytest.raises(FsError) as err:
                await eng.ns.mkdir(full.ino, b"sub", 0o755)
            assert err.value.errno == errno.ENOSPC
            root = eng.ns.node(ROOT_INO)
            with pytest.raises(FsError) as err:
                await eng.ns.rename(root.ino, b"elsewhere", full.ino, b"e")
            assert err.value.errno == errno.ENOSPC
            # Within the directory, and over an existing name, nothing is added: allowed.
            await eng.ns.rename(full.ino, b"a", full.ino, b"a2")
            await eng.ns.rename(root.ino, b"elsewhere", full.ino, b"b")
            assert sorted(await list_dir(eng, "full")) == [b"a2", b"b", b"c"]

    trio.run(main)
