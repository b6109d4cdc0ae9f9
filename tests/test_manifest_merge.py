"""Unit tests of the pure core: manifests, the three-way merge, settings, the repository
descriptor (the last against both backends, through the `store` fixture)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import trio

from fsrepo.config import Settings, load_settings, normalise_storage_url, parse_size
from fsrepo.errors import ConfigError, ImgrepoError, ManifestError, RepositoryFormatError
from fsrepo.manifest import (
    MAX_NAME,
    DirEntry,
    FileEntry,
    Manifest,
    SymlinkEntry,
    check_name,
    parse_manifest,
    serialise_manifest,
)
from fsrepo.merge import Op, apply_op, apply_ops, coalesce, conflict_name, moved_dirs
from fsrepo.repository import DESCRIPTOR_KEY, FORMAT_VERSION, open_repository

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
T = 1_700_000_000_000_000_000


def f(sha: str = SHA_A, size: int = 1, mtime: int = T, mode: int = 0o644) -> FileEntry:
    return FileEntry(sha, size, mtime, mode)


# -- manifests ---------------------------------------------------------------------------
def test_round_trip_keeps_every_name_and_target_byte_for_byte():
    entries = {
        b"plain.txt": f(SHA_A, 5, T, 0o600),
        "日本語 ü.jpg".encode(): f(SHA_B, 0),
        b"caf\xe9.jpg": f(SHA_C, 7),  # Latin-1: not UTF-8
        b"\xff\xfe\xfd": f(),
        b"line\nbreak\ttab": f(),
        b"x" * MAX_NAME: f(),
        b"sub": DirEntry("0123abcd", T, 0o700),
        b"link-utf8": SymlinkEntry("../über/ziel".encode(), T),
        b"link-raw": SymlinkEntry(b"/tmp/\xff\xc3(", T),
        b"link\x80raw-name": SymlinkEntry(b"t", -5),
    }
    body = serialise_manifest(Manifest("d1", dict(entries)))
    doc = json.loads(body)
    assert doc["imgrepo_manifest"] == 1 and doc["dir_id"] == "d1"
    # UTF-8 names are readable JSON keys; the others are base64 keys of raw_entries.
    assert "日本語 ü.jpg" in doc["entries"]
    assert base64.b64encode(b"caf\xe9.jpg").decode() in doc["raw_entries"]
    assert "target_b64" in doc["entries"]["link-raw"]
    parsed, problems = parse_manifest(body, "d1")
    assert problems == []
    assert parsed.entries == entries
    assert serialise_manifest(parsed) == body  # deterministic


def test_manifest_without_raw_entries_has_no_such_key():
    body = serialise_manifest(Manifest("root", {b"a": f()}))
    assert "raw_entries" not in json.loads(body)


def _doc(entries: dict, raw: dict | None = None, dir_id: str = "d1", **extra) -> bytes:
    doc = {"imgrepo_manifest": 1, "dir_id": dir_id, "entries": entries, **extra}
    if raw is not None:
        doc["raw_entries"] = raw
    return json.dumps(doc).encode()


def _b64(name: bytes) -> str:
    return base64.b64encode(name).decode()


def test_hostile_entries_are_refused_one_by_one_and_the_rest_kept():
    good = {"type": "file", "sha256": SHA_A, "size": 3, "mtime_ns": T, "mode": 0o644}
    bad_entries = {
        ".": good,
        "..": good,
        "a/b": good,
        "../../etc/passwd": good,
        "nul\u0000byte": good,
        "": good,
        "n" * (MAX_NAME + 1): good,
        "lone\udcffsurrogate": good,
        "not-an-object": ["file"],
        "no-type": {"sha256": SHA_A, "size": 1},
        "unknown-type": {"type": "device", "major": 8},
        "bad-sha": {**good, "sha256": "A" * 64},
        "short-sha": {**good, "sha256": "ab"},
        "negative-size": {**good, "size": -1},
        "huge-size": {**good, "size": 1 << 60},
        "bool-size": {**good, "size": True},
        "float-mtime": {**good, "mtime_ns": 1.5},
        "bad-mode": {**good, "mode": 0o17777},
        "dir-root": {"type": "dir", "id": "root", "mtime_ns": T},
        "dir-escape": {"type": "dir", "id": "../../x", "mtime_ns": T},
        "dir-slash": {"type": "dir", "id": "a/b", "mtime_ns": T},
        "dir-no-id": {"type": "dir", "mtime_ns": T},
        "link-empty": {"type": "symlink", "target": "", "mtime_ns": T},
        "link-nul": {"type": "symlink", "target": "a\u0000b", "mtime_ns": T},
        "link-long": {"type": "symlink", "target": "x" * 5000, "mtime_ns": T},
        "link-bad-b64": {"type": "symlink", "target_b64": "!!!", "mtime_ns": T},
        "link-none": {"type": "symlink", "mtime_ns": T},
        "dup": good,
    }
    bad_raw = {
        _b64(b"../evil"): good,
        _b64(b".."): good,
        _b64(b"a\x00b"): good,
        "%%% not base64": good,
        _b64(b"dup"): good,  # the same name as a UTF-8 key: a duplicate
    }
    good_entries = {
        "keep.txt": good,
        "keep-dir": {"type": "dir", "id": "child_1", "mtime_ns": T},
        "keep-link": {"type": "symlink", "target": "../../anywhere", "mtime_ns": T},
    }
    body = _doc({**good_entries, **bad_entries}, {**bad_raw, _b64(b"raw\xff"): good})
    manifest, problems = parse_manifest(body, "d1")
    assert set(manifest.entries) == {b"keep.txt", b"keep-dir", b"keep-link", b"raw\xff", b"dup"}
    # every bad entry is reported once, on one line, naming the directory
    assert len(problems) == len(bad_entries) - 1 + len(bad_raw)
    assert all(p.startswith("directory d1: refused entry") and "\n" not in p for p in problems)
    assert manifest.entries[b"keep-link"] == SymlinkEntry(b"../../anywhere", T)


@pytest.mark.parametrize("body", [
    b"",
    b"not json",
    b"\xff\xfe{}",
    b"[]",
    b'"a string"',
    json.dumps({"dir_id": "d1", "entries": {}}).encode(),  # no format version
    _doc({}, imgrepo_manifest=2),  # unknown (newer) format
    _doc({}, imgrepo_manifest="1"),
    _doc({}, dir_id="other"),  # a manifest stored under the wrong name
    _doc([]),  # type: ignore[arg-type]
    _doc({}, raw=[]),  # type: ignore[arg-type]
    b'{"imgrepo_manifest": 1, "dir_id": "d1", "entries": {' + b'"a": ' * 1 + b"[" * 100000
    + b"]" * 100000 + b"}}",
])
def test_unusable_manifests_raise_manifest_error(body: bytes):
    with pytest.raises(ManifestError) as exc:
        parse_manifest(body, "d1")
    assert isinstance(exc.value, ImgrepoError)  # the CLI shows it as one line
    assert "\n" not in str(exc.value) and "d1" in str(exc.value)


def test_check_name():
    for name in (b"a", b"\xff", b"x" * 255, b"...", b". ", b"-"):
        check_name(name)
    for name in (b"", b".", b"..", b"a/b", b"/", b"a\0", b"x" * 256):
        with pytest.raises(ValueError):
            check_name(name)


# -- merge ---------------------------------------------------------------------------------
def test_op_on_an_unchanged_name_applies_as_is():
    entries = {b"x": f(SHA_A)}
    assert apply_op(entries, Op(b"x", f(SHA_B), f(SHA_A)), "h", 0) is None
    assert entries == {b"x": f(SHA_B)}
    assert apply_op(entries, Op(b"x", None, f(SHA_B)), "h", 0) is None
    assert entries == {}
    assert apply_op(entries, Op(b"new", f(SHA_C), None), "h", 0) is None
    assert entries == {b"new": f(SHA_C)}


def test_op_already_applied_is_a_no_op():
    entries = {b"x": f(SHA_B)}
    assert apply_ops(entries, [Op(b"x", f(SHA_B), f(SHA_A))], "h") == {}
    assert entries == {b"x": f(SHA_B)}
    entries = {}
    assert apply_ops(entries, [Op(b"gone", None, f(SHA_A))], "h") == {}
    assert entries == {}


def test_removal_meeting_a_changed_entry_keeps_theirs():
    entries = {b"x": f(SHA_C)}  # they changed it from A to C
    assert apply_ops(entries, [Op(b"x", None, f(SHA_A))], "h") == {}
    assert entries == {b"x": f(SHA_C)}


def test_write_meeting_a_removed_entry_recreates_it():
    entries: dict = {}  # they removed it
    assert apply_ops(entries, [Op(b"x", f(SHA_B), f(SHA_A))], "h") == {}
    assert entries == {b"x": f(SHA_B)}


def test_write_meeting_a_different_version_keeps_both():
    entries = {b"photo.jpg": f(SHA_C)}  # theirs
    diverted = apply_ops(entries, [Op(b"photo.jpg", f(SHA_B), f(SHA_A))], "laptop", 0)
    assert list(diverted) == [b"photo.jpg"]
    where = diverted[b"photo.jpg"]
    assert where.startswith(b"photo (conflict laptop 1970-01-01 000000") and \
        where.endswith(b").jpg")
    assert entries == {b"photo.jpg": f(SHA_C), where: f(SHA_B)}


def test_two_creates_of_one_name_keep_both_unless_the_content_is_the_same():
    entries = {b"n": f(SHA_A, mtime=1)}
    assert apply_ops(entries, [Op(b"n", f(SHA_A, mtime=2), None)], "h") == {}
    assert entries == {b"n": f(SHA_A, mtime=2)}  # same bytes: no conflict copy
    diverted = apply_ops(entries, [Op(b"n", f(SHA_B), None)], "h")
    assert set(entries) == {b"n", diverted[b"n"]}


def test_attribute_change_meeting_a_content_change_is_not_a_conflict():
    # we chmod'ed A; they kept the same content (touch): same content counts as the base
    entries = {b"x": f(SHA_A, mtime=99)}
    assert apply_ops(entries, [Op(b"x", f(SHA_A, mode=0o600), f(SHA_A))], "h") == {}
    assert entries == {b"x": f(SHA_A, mode=0o600)}


def test_directories_merge_by_id():
    mine, theirs = DirEntry("mine", T), DirEntry("theirs", T)
    entries = {b"d": theirs}
    diverted = apply_ops(entries, [Op(b"d", mine, None)], "h")
    assert entries[b"d"] == theirs and entries[diverted[b"d"]] == mine
    # same id, other mtime: the same directory
    entries = {b"d": DirEntry("x", 1)}
    assert apply_ops(entries, [Op(b"d", DirEntry("x", 2), None)], "h") == {}


def test_coalesce_folds_ops_per_name_first_base_last_entry():
    ops = [Op(b"a", f(SHA_A), None), Op(b"b", f(SHA_B), None),
           Op(b"a", f(SHA_C), f(SHA_A)), Op(b"a", None, f(SHA_C))]
    folded = [(op.name, op.entry, op.base) for op in coalesce(ops)]
    assert folded == [(b"b", f(SHA_B), None), (b"a", None, None)]
    assert coalesce([]) == []


def test_create_then_delete_leaves_a_concurrent_create_alone():
    entries = {b"tmp": f(SHA_C)}  # someone else created "tmp" meanwhile
    ops = [Op(b"tmp", f(SHA_A), None), Op(b"tmp", None, f(SHA_A))]
    assert apply_ops(entries, ops, "h") == {}
    assert entries == {b"tmp": f(SHA_C)}
    entries = {}
    apply_ops(entries, ops, "h")
    assert entries == {}


def test_rename_within_a_directory_merges_with_their_changes():
    # we renamed a -> b; they added c and changed nothing else
    entries = {b"a": f(SHA_A), b"c": f(SHA_C)}
    apply_ops(entries, [Op(b"b", f(SHA_A), None), Op(b"a", None, f(SHA_A))], "h")
    assert entries == {b"b": f(SHA_A), b"c": f(SHA_C)}


def test_conflict_name_keeps_the_extension_and_is_unique():
    taken: set[bytes] = {b"a.txt"}
    names = []
    for _ in range(5):
        name = conflict_name(b"a.txt", "host", 86400.0, taken)
        assert name not in taken and name.endswith(b".txt")
        taken.add(name)
        names.append(name)
    assert names[0] == b"a (conflict host 1970-01-02 000000).txt"
    assert names[1] == b"a (conflict host 1970-01-02 000000 2).txt"
    assert len(set(names)) == 5


@pytest.mark.parametrize("name", [
    b"x" * 255,
    b"y" * 250 + b".jpeg",
    "ä".encode() * 125 + b".png",  # 250 bytes of two-byte characters
    "日".encode() * 84 + b".x",  # 254 bytes of three-byte characters
    b"\xff" * 255,
    b".hidden",
    b"no-extension",
    b"archive." + b"z" * 30,  # an "extension" this long is part of the name
])
def test_conflict_name_is_a_valid_name_of_at_most_255_bytes(name: bytes):
    got = conflict_name(name, "h" * 300, 0.0, {name})
    check_name(got)
    assert len(got) <= MAX_NAME
    assert b"(conflict " in got
    dot = name.rfind(b".")
    if 0 < dot and len(name) - dot <= 16:
        assert got.endswith(name[dot:])
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return
    got.decode("utf-8")  # a UTF-8 name is never cut inside a character


def test_conflict_name_of_a_non_utf8_host():
    got = conflict_name(b"f", "h\udcffst", 0.0, set())
    check_name(got)


# -- settings ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("1000000", 1000000), (512, 512), ("10G", 10 * 1024**3), ("512MiB", 512 * 1024**2),
    ("1.5k", 1536), (" 2 gb ", 2 * 1024**3), ("3T", 3 * 1024**4), ("7b", 7), ("0", 0),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "10X", "-5", "1e3", "G", "5 M B", "1,5G"])
def test_parse_size_refuses(text):
    with pytest.raises(ConfigError):
        parse_size(text)


@pytest.mark.parametrize("url,normal", [
    ("file:///a/b/../c/", "file:///a/c"),
    ("file:////a//b", "file:///a/b"),
    ("/abs/path/", "file:///abs/path"),
    ("//abs//path", "file:///abs/path"),
    (" s3://bucket/prefix/ ", "s3://bucket/prefix"),
    ("s3://bucket", "s3://bucket"),
    ("s3://bucket/", "s3://bucket"),
])
def test_storage_urls_normalise(url, normal):
    assert normalise_storage_url(url) == normal
    # equivalent spellings share one local state directory
    assert Settings(storage=url).state_dir() == Settings(storage=normal).state_dir()


@pytest.mark.parametrize("url", ["file://relative/x", "s3://", "s3:///", "http://x/y", "x",
                                 "~/repo"])
def test_bad_storage_urls(url):
    with pytest.raises(ConfigError):
        normalise_storage_url(url)


ENV_VARS = ("IMGREPO_STORAGE", "IMGREPO_CACHE_DIR", "IMGREPO_CACHE_SIZE", "IMGREPO_REFRESH",
            "IMGREPO_CONFIG", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "IMGREPO_ISSUER",
            "IMGREPO_CLIENT_ID", "IMGREPO_ROLE_ARN")


@pytest.fixture
def clean_env(monkeypatch, tmp_path: Path):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    return monkeypatch


def test_settings_precedence_flags_env_file_defaults(clean_env, tmp_path: Path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[imgrepo]\nstorage = "s3://from-file/p"\ncache-size = "1G"\n'
                   'refresh = 3\ncache-dir = "/from/file"\nendpoint-url = "http://file:1"\n')
    s = load_settings({}, cfg)
    assert (s.storage, s.cache_size, s.refresh) == ("s3://from-file/p", 1024**3, 3.0)
    assert s.cache_root == Path("/from/file") and s.endpoint_url == "http://file:1"
    assert s.config_file == cfg

    clean_env.setenv("IMGREPO_STORAGE", "s3://from-env/p")
    clean_env.setenv("IMGREPO_REFRESH", "7")
    clean_env.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    clean_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:1")
    s = load_settings({}, cfg)
    assert (s.storage, s.refresh, s.cache_size) == ("s3://from-env/p", 7.0, 1024**3)
    assert s.endpoint_url == "http://s3-specific:1"

    s = load_settings({"storage": "/from/flag", "refresh": 1.5, "cache_size": None,
                       "endpoint_url": "http://flag:1"}, cfg)
    assert (s.storage, s.refresh, s.cache_size) == ("file:///from/flag", 1.5, 1024**3)
    assert s.endpoint_url == "http://flag:1"

    clean_env.setenv("IMGREPO_CONFIG", str(cfg))
    assert load_settings({}).storage == "s3://from-env/p"


def test_settings_defaults_without_config_file(clean_env, tmp_path: Path):
    s = load_settings({}, tmp_path / "missing.toml")
    assert s.storage.startswith("file:///") and s.cache_size == 10 * 1024**3
    assert s.refresh > 0


@pytest.mark.parametrize("text", [
    "storage = [unclosed",
    'unknown-key = 1',
    'cache-size = "lots"',
    "refresh = 0",
    "refresh = -1",
    'refresh = "soon"',
    'uploads = "many"',
    'storage = "ftp://x"',
    '[imgrepo]\nstorage = "file://relative"',
    "imgrepo = 5",
    "uploads = 0",
    "cache-size = -5",
    "cache-size = true",
])
def test_bad_config_file_is_a_config_error(clean_env, tmp_path: Path, text: str):
    cfg = tmp_path / "config.toml"
    cfg.write_text(text + "\n")
    with pytest.raises(ConfigError) as exc:
        load_settings({}, cfg)
    assert "\n" not in str(exc.value)


def test_unreadable_config_file_is_a_config_error(clean_env, tmp_path: Path):
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError):
        load_settings({}, tmp_path / "dir.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe = 1")
    with pytest.raises(ConfigError):
        load_settings({}, tmp_path / "bin.toml")


def test_bad_env_value_is_a_config_error(clean_env, tmp_path: Path):
    clean_env.setenv("IMGREPO_CACHE_SIZE", "huge")
    with pytest.raises(ConfigError):
        load_settings({}, tmp_path / "none.toml")


# -- the repository descriptor (both backends) ----------------------------------------------
async def _snapshot(store) -> dict[str, bytes]:
    out = {}
    async for info in store.list(""):
        out[info.key] = (await store.get(info.key)).data
    return out


def test_descriptor_created_on_an_empty_location_and_reused(store):
    async def main():
        first = await open_repository(store, create=True)
        snap = await _snapshot(store)
        assert list(snap) == [DESCRIPTOR_KEY]
        doc = json.loads(snap[DESCRIPTOR_KEY])
        assert doc["format"] == "imgrepo" and doc["version"] == FORMAT_VERSION
        assert doc["hash"] == "sha256"
        assert doc["repo_id"] == first.repo_id
        again = await open_repository(store, create=False)
        assert again == first
        assert await _snapshot(store) == snap
    trio.run(main)


def test_no_repository_without_create(store):
    async def main():
        with pytest.raises(RepositoryFormatError):
            await open_repository(store, create=False)
        assert await _snapshot(store) == {}
    trio.run(main)


@pytest.mark.parametrize("key,body,says", [
    ("photos/cat.jpg", b"meow", "already holds data"),
    (DESCRIPTOR_KEY, b"{not json", "not valid JSON"),
    (DESCRIPTOR_KEY, b"\xff\xfe", "not valid JSON"),
    (DESCRIPTOR_KEY, b"[1]", "does not describe"),
    (DESCRIPTOR_KEY, json.dumps({"format": "restic", "version": 1}).encode(),
     "does not describe"),
    (DESCRIPTOR_KEY, json.dumps({"format": "imgrepo", "version": FORMAT_VERSION + 1,
                                 "hash": "sha256", "repo_id": "x"}).encode(), "newer imgrepo"),
    (DESCRIPTOR_KEY, json.dumps({"format": "imgrepo", "version": "1", "hash": "sha256",
                                 "repo_id": "x"}).encode(), "version"),
    (DESCRIPTOR_KEY, json.dumps({"format": "imgrepo", "version": 0, "hash": "sha256",
                                 "repo_id": "x"}).encode(), "version"),
    (DESCRIPTOR_KEY, json.dumps({"format": "imgrepo", "version": 1, "hash": "md5",
                                 "repo_id": "x"}).encode(), "incomplete"),
    (DESCRIPTOR_KEY, json.dumps({"format": "imgrepo", "version": 1,
                                 "hash": "sha256"}).encode(), "incomplete"),
])
def test_unusable_locations_are_refused_and_left_untouched(store, key, body, says):
    async def main():
        await store.put(key, body)
        before = await _snapshot(store)
        with pytest.raises(RepositoryFormatError) as exc:
            await open_repository(store, create=True)
        assert says in str(exc.value) and "\n" not in str(exc.value)
        assert await _snapshot(store) == before
    trio.run(main)


# -- folder merge and removal records (issue 15) -----------------------------------------------
def test_a_new_directory_meeting_theirs_merges_into_it_in_either_order():
    mine, theirs = DirEntry("mine", T), DirEntry("theirs", T)
    # theirs landed first: the name keeps theirs, ours is noted as merged into it
    entries = {b"d": theirs}
    merged: dict[str, str] = {}
    assert apply_ops(entries, [Op(b"d", mine, None)], "h", merged=merged) == {}
    assert entries == {b"d": theirs} and merged == {"mine": "theirs"}
    # ours landed first: their create (seen from their side) merges into ours
    entries, merged = {b"d": mine}, {}
    assert apply_ops(entries, [Op(b"d", theirs, None)], "h", merged=merged) == {}
    assert entries == {b"d": mine} and merged == {"theirs": "mine"}
    # nobody else: ours applies
    entries, merged = {}, {}
    apply_ops(entries, [Op(b"d", mine, None)], "h", merged=merged)
    assert entries == {b"d": mine} and merged == {}


def test_only_new_directories_merge():
    mine, theirs = DirEntry("mine", T), DirEntry("theirs", T)
    # a directory renamed onto the name exists elsewhere: kept beside theirs
    entries, merged = {b"d": theirs}, {}
    diverted = apply_ops(entries, [Op(b"d", mine, None)], "h", merged=merged, moved={"mine"})
    assert merged == {} and entries[diverted[b"d"]] == mine
    # a file meeting their directory, or a directory meeting their file: kept beside
    entries, merged = {b"d": theirs}, {}
    assert apply_ops(entries, [Op(b"d", f(), None)], "h", merged=merged) and merged == {}
    entries, merged = {b"d": f()}, {}
    assert apply_ops(entries, [Op(b"d", mine, None)], "h", merged=merged) and merged == {}
    # a directory replacing one we saw, meeting another: not new either
    other = DirEntry("other", T)
    entries, merged = {b"d": other}, {}
    assert apply_ops(entries, [Op(b"d", mine, theirs)], "h", merged=merged) and merged == {}


def test_moved_dirs_are_the_directories_removed_from_a_name():
    d1, d2 = DirEntry("d1", T), DirEntry("d2", T)
    assert moved_dirs([Op(b"a", None, d1), Op(b"b", d2, None), Op(b"c", None, f())]) == {"d1"}


def test_removal_records_round_trip_and_bad_ones_are_refused_alone():
    m = Manifest("d1", {b"a": f()}, {"x1": ("q1", b"new name"), "x2": ("q2", b"\xff")})
    parsed, problems = parse_manifest(serialise_manifest(m), "d1")
    assert problems == [] and parsed == m
    assert "moved" not in json.loads(serialise_manifest(Manifest("d1", {b"a": f()})))
    doc = json.loads(serialise_manifest(m))
    doc["moved"]["bad/id"] = {"to": "q", "name_b64": "eA=="}
    doc["moved"]["x3"] = {"to": "q", "name_b64": base64.b64encode(b"a/b").decode()}
    doc["moved"]["x4"] = "nonsense"
    parsed, problems = parse_manifest(json.dumps(doc).encode(), "d1")
    assert parsed.moved == m.moved and len(problems) == 3
    parsed, problems = parse_manifest(_doc({}, moved=[1]), "d1")
    assert parsed.moved == {} and len(problems) == 1
