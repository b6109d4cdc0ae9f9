"""Directory manifests: parsing (strict, hostile-input safe) and serialising.

A manifest lists one directory's children. Names are bytes (FUSE hands us bytes and
non-UTF-8 names must round-trip): UTF-8 names are JSON keys of "entries", other names are
base64 keys of "raw_entries". Anything that could escape the tree or confuse the kernel
('/', NUL, '.', '..', empty or over-long names) is refused entry by entry, so a damaged
manifest loses only its bad entries. A manifest over the documented limits (MAX_MANIFEST_BYTES,
MAX_ENTRIES) is refused whole, before it can take the machine's memory: a large one is
parsed with a count of the objects built, stopped as soon as there are too many.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from dataclasses import dataclass, field

from .errors import ManifestError

FORMAT = 1
ROOT_ID = "root"
MAX_NAME = 255
MAX_SYMLINK = 4095
MAX_SIZE = 1 << 50  # 1 PiB: anything larger is a hostile or broken manifest
# One directory's limits (SEMANTICS.md): ~200 bytes an entry, so a full directory's
# manifest is ~40 MiB and ~100 MiB in memory once parsed.
MAX_ENTRIES = 200_000
MAX_MANIFEST_BYTES = 64 << 20
_COUNT_ABOVE = 1 << 20  # larger bodies with more "{" than allowed: objects counted as built
# Matched whole (fullmatch): `$` would also accept a trailing newline.
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")


MIN_CHUNK = 1 << 16  # chunk sizes a chunk list may declare (hostile-input bounds)
MAX_CHUNK = 1 << 30


@dataclass(frozen=True, slots=True)
class Chunks:
    """A large file's content as consecutive blobs of `size` bytes (the last one shorter),
    each named by its own SHA-256: every chunk is verified before a byte of it is served."""
    size: int
    shas: tuple[str, ...]

    def length(self, index: int, file_size: int) -> int:
        return min(self.size, file_size - index * self.size)


_PACKED = struct.Struct("<32sQqH")  # digest, size, mtime_ns, mode: 50 bytes
_unpack_size = struct.Struct("<Q").unpack_from
_unpack_mtime = struct.Struct("<q").unpack_from
_unpack_mode = struct.Struct("<H").unpack_from
_MTIME_MIN, _MTIME_MAX = -(1 << 62), 1 << 62  # what a manifest may say (others refuse more)


class FileEntry(bytes):
    """A file's entry, kept packed in one bytes object (digest, size, mtime_ns, mode): a
    mount that walked a million photos holds one per file, and this is ~88 bytes where a
    slotted object with a hex string and three ints took ~245. Immutable; fields are
    decoded when read. Equal entries have equal fields; the chunk list is not part of
    equality (it is how the content is stored, not what it is)."""

    __slots__ = ()
    chunks: Chunks | None = None  # a ChunkedFileEntry's own

    def __new__(cls, sha256: str, size: int, mtime_ns: int, mode: int = 0o644,
                chunks: Chunks | None = None) -> FileEntry:
        if len(sha256) != 64:
            raise ValueError(f"not a SHA-256 in hex: {sha256!r}")
        mtime_ns = min(max(mtime_ns, _MTIME_MIN), _MTIME_MAX)
        packed = _PACKED.pack(bytes.fromhex(sha256), size, mtime_ns, mode)
        if chunks is not None:
            entry = bytes.__new__(ChunkedFileEntry, packed)
            entry.__dict__["chunks"] = chunks
            return entry
        return bytes.__new__(FileEntry, packed)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"FileEntry is immutable (setting {name})")

    @property
    def sha256(self) -> str:  # of the whole content: dedup of whole files stays one lookup
        return self[:32].hex()

    @property
    def size(self) -> int:
        return _unpack_size(self, 32)[0]

    @property
    def mtime_ns(self) -> int:
        return _unpack_mtime(self, 40)[0]

    @property
    def mode(self) -> int:
        return _unpack_mode(self, 48)[0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FileEntry) and bytes.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = bytes.__hash__

    def __repr__(self) -> str:
        return (f"FileEntry(sha256={self.sha256!r}, size={self.size}, "
                f"mtime_ns={self.mtime_ns}, mode={self.mode:#o}"
                + ("" if self.chunks is None else f", chunks={self.chunks!r}") + ")")

    __str__ = __repr__

    def __reduce__(self) -> tuple:
        return FileEntry, (self.sha256, self.size, self.mtime_ns, self.mode, self.chunks)

    def with_attrs(self, mtime_ns: int | None = None, mode: int | None = None) -> FileEntry:
        """The same content (and chunks) with another time or mode."""
        return FileEntry(self.sha256, self.size,
                         self.mtime_ns if mtime_ns is None else mtime_ns,
                         self.mode if mode is None else mode, self.chunks)

    def blobs(self) -> list[tuple[str, int]]:
        """The blobs holding the content, with their sizes, in order."""
        if self.chunks is None:
            return [(self.sha256, self.size)]
        return [(sha, self.chunks.length(i, self.size))
                for i, sha in enumerate(self.chunks.shas)]


class ChunkedFileEntry(FileEntry):
    """A large file stored as chunks (repository format 4): the packed fields plus its chunk
    list (rare: a __dict__ of its own is fine here)."""


@dataclass(frozen=True, slots=True)
class DirEntry:
    id: str
    mtime_ns: int
    mode: int = 0o755
    # When its attributes were last set (chmod, utimens: its ctime then); None in entries
    # written before it was kept. A later change of the directory's names (its manifest's
    # `mtime_ns`) takes precedence over `mtime_ns` (`namespace.dir_times`).
    ctime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class SymlinkEntry:
    target: bytes
    mtime_ns: int


Entry = FileEntry | DirEntry | SymlinkEntry


MAX_MOVED = 256  # removal records a manifest keeps (the oldest go first)


@dataclass
class Manifest:
    dir_id: str
    entries: dict[bytes, Entry] = field(default_factory=dict)
    # Directories renamed out of this one into another folder: id -> (that folder's id,
    # the name there). A machine whose own rename of one of them finds its source gone
    # learns from it that another machine's rename landed first (docs/cross-machine.md).
    moved: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    # Set while a machine removes this (empty) directory: the folder and the name it is
    # removed from. A machine adding entries meanwhile puts it back there (the additions
    # keep the folder alive); the remover deletes the manifest if nobody did.
    removed: tuple[str, bytes] | None = None
    # When a name in it was last created, removed or renamed (the directory's mtime and
    # ctime); None in manifests written before it was kept. An additive key of format 1:
    # readers that do not know it ignore it.
    mtime_ns: int | None = None


def check_name(name: bytes) -> None:
    """Raise ValueError for a name that cannot be a directory entry."""
    if not name or name in (b".", b".."):
        raise ValueError("empty, '.' or '..'")
    if b"/" in name or b"\0" in name:
        raise ValueError("contains '/' or NUL")
    if len(name) > MAX_NAME:
        raise ValueError(f"longer than {MAX_NAME} bytes")


def is_valid_dir_id(value: object) -> bool:
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value))


def _int(raw: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = raw.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"bad {key}")
    return value


_bytes_new, _pack, _fromhex = bytes.__new__, _PACKED.pack, bytes.fromhex


def _plain_file(raw: dict) -> FileEntry | None:
    """The common entry (a file with every field well formed), checked in one pass: a
    remount parses every cached manifest a walk opens (a chunked file takes the full
    check). None: let the full check decide."""
    sha, size = raw.get("sha256"), raw.get("size")
    mtime, mode = raw.get("mtime_ns", 0), raw.get("mode", 0o644)
    if type(sha) is str and type(size) is int and type(mtime) is int and type(mode) is int \
            and 0 <= size <= MAX_SIZE and _MTIME_MIN <= mtime <= _MTIME_MAX \
            and 0 <= mode <= 0o7777 and "chunks" not in raw and _SHA_RE.fullmatch(sha):
        return _bytes_new(FileEntry, _pack(_fromhex(sha), size, mtime, mode))
    return None


def entry_from_json(raw: object) -> Entry:
    """One entry; ValueError if anything about it is wrong."""
    if type(raw) is dict and raw.get("type") == "file":
        plain = _plain_file(raw)
        if plain is not None:
            return plain
    if not isinstance(raw, dict):
        raise ValueError("entry is not an object")
    kind = raw.get("type")
    mtime = _int(raw, "mtime_ns", -(1 << 62), 1 << 62, 0)
    if kind == "file":
        sha = raw.get("sha256")
        if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
            raise ValueError("bad sha256")
        size = _int(raw, "size", 0, MAX_SIZE)
        chunks = _chunks_from_json(raw["chunks"], size) if "chunks" in raw else None
        return FileEntry(sha, size, mtime, _int(raw, "mode", 0, 0o7777, 0o644), chunks)
    if kind == "dir":
        if not is_valid_dir_id(raw.get("id")) or raw.get("id") == ROOT_ID:
            raise ValueError("bad directory id")
        ctime = _int(raw, "ctime_ns", -(1 << 62), 1 << 62) if "ctime_ns" in raw else None
        return DirEntry(raw["id"], mtime, _int(raw, "mode", 0, 0o7777, 0o755), ctime)
    if kind == "symlink":
        if isinstance(raw.get("target"), str):
            target = raw["target"].encode("utf-8", "surrogateescape")
        elif isinstance(raw.get("target_b64"), str):
            try:
                target = base64.b64decode(raw["target_b64"], validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("bad target_b64") from None
        else:
            raise ValueError("symlink without target")
        if not target or len(target) > MAX_SYMLINK or b"\0" in target:
            raise ValueError("bad symlink target")
        return SymlinkEntry(target, mtime)
    raise ValueError(f"unknown type {kind!r}")


def _chunks_from_json(raw: object, file_size: int) -> Chunks:
    """A chunk list: {"size": bytes per chunk, "sha256": [one digest per chunk]}."""
    if not isinstance(raw, dict):
        raise ValueError("bad chunks")
    size = _int(raw, "size", MIN_CHUNK, MAX_CHUNK)
    shas = raw.get("sha256")
    if not isinstance(shas, list) or len(shas) != -(-file_size // size) or not shas \
            or not all(isinstance(s, str) and _SHA_RE.match(s) for s in shas):
        raise ValueError("bad chunk list")
    return Chunks(size, tuple(shas))


def entry_to_json(entry: Entry) -> dict:
    if isinstance(entry, FileEntry):
        out = {"type": "file", "sha256": entry.sha256, "size": entry.size,
               "mtime_ns": entry.mtime_ns, "mode": entry.mode}
        if entry.chunks is not None:
            out["chunks"] = {"size": entry.chunks.size, "sha256": list(entry.chunks.shas)}
        return out
    if isinstance(entry, DirEntry):
        out = {"type": "dir", "id": entry.id, "mtime_ns": entry.mtime_ns, "mode": entry.mode}
        if entry.ctime_ns is not None:
            out["ctime_ns"] = entry.ctime_ns
        return out
    try:
        return {"type": "symlink", "target": entry.target.decode("utf-8"),
                "mtime_ns": entry.mtime_ns}
    except UnicodeDecodeError:
        return {"type": "symlink", "target_b64": base64.b64encode(entry.target).decode(),
                "mtime_ns": entry.mtime_ns}


class _TooManyObjects(Exception):
    """Raised from inside json.loads: the body holds more objects than any manifest can."""


def _too_many(dir_id: str) -> ManifestError:
    return ManifestError(f"manifest of directory {dir_id} has more than {MAX_ENTRIES} "
                         "entries (the limit of one directory): refused")


def _load_json(data: bytes, dir_id: str) -> object:
    """json.loads, bounded: a large body that may hold too many JSON objects (one per
    entry) is parsed with a count of the objects built, stopped as soon as it exceeds what a
    manifest within the limits holds."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of directory {dir_id} is {len(data) >> 20} MiB, over "
                            f"the limit of {MAX_MANIFEST_BYTES >> 20} MiB: refused")
    budget = MAX_ENTRIES + 2 * MAX_MOVED + 8  # entries, records, the document's own objects
    if len(data) <= _COUNT_ABOVE or data.count(b"{") <= budget:  # (an upper bound)
        return json.loads(data)

    def counted(pairs: list[tuple[str, object]]) -> dict[str, object]:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise _TooManyObjects
        return dict(pairs)

    try:
        return json.loads(data, object_pairs_hook=counted)
    except _TooManyObjects:
        raise _too_many(dir_id) from None


def _document(data: bytes, dir_id: str) -> tuple[dict, dict, dict]:
    """A manifest's JSON document, checked as a whole: (document, entries, raw_entries).
    Raises ManifestError when it is unusable (or over the limits)."""
    try:
        raw = _load_json(data, dir_id)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: absurdly deep nesting, which only a hostile writer produces
        raise ManifestError(f"manifest of directory {dir_id} is not valid JSON: "
                            f"{str(exc)[:200]}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest of directory {dir_id} is not a JSON object")
    version = raw.get("imgrepo_manifest")
    if version != FORMAT:
        raise ManifestError(f"manifest of directory {dir_id} has unsupported format {version!r}")
    if raw.get("dir_id") != dir_id:
        raise ManifestError(f"manifest of directory {dir_id} claims to be {raw.get('dir_id')!r}")
    plain, encoded = raw.get("entries", {}), raw.get("raw_entries", {})
    if not isinstance(plain, dict) or not isinstance(encoded, dict):
        raise ManifestError(f"manifest of directory {dir_id}: entries are not objects")
    if len(plain) + len(encoded) > MAX_ENTRIES:
        raise _too_many(dir_id)
    return raw, plain, encoded


def manifest_subdirs(data: bytes, dir_id: str) -> list[str]:
    """The ids of the subdirectories a manifest names, without building its file entries
    (what fetching ahead needs to know next: a fraction of a full parse's time). Raises
    ManifestError as `parse_manifest` does; an entry it would refuse may be named."""
    _, plain, encoded = _document(data, dir_id)
    return [v["id"] for entries in (plain, encoded) for v in entries.values()
            if type(v) is dict and v.get("type") == "dir" and is_valid_dir_id(v.get("id"))
            and v["id"] != ROOT_ID]


def parse_manifest(data: bytes, dir_id: str) -> tuple[Manifest, list[str]]:
    """Parse a manifest; returns it with a list of problems (refused entries).

    Raises ManifestError when the object as a whole is unusable (or over the limits)."""
    raw, plain, encoded = _document(data, dir_id)
    problems: list[str] = []
    manifest = Manifest(dir_id)
    items: list[tuple[bytes | None, str, object]] = []
    entries = manifest.entries
    for key, value in plain.items():
        try:
            name = key.encode("utf-8")
        except UnicodeEncodeError:
            items.append((None, key, value))
            continue
        if type(value) is dict and value.get("type") == "file" and 0 < len(name) <= MAX_NAME \
                and b"/" not in name and b"\0" not in name and name not in (b".", b".."):
            entry = _plain_file(value)  # the common case, in one pass
            if entry is not None:
                entries[name] = entry
                continue
        items.append((name, key, value))
    for key, value in encoded.items():
        try:
            raw_name = base64.b64decode(key, validate=True)
            items.append((raw_name, raw_name.decode("utf-8", "backslashreplace"), value))
        except (binascii.Error, ValueError):
            items.append((None, key, value))
    for name, shown, value in items:
        try:
            if name is None:
                raise ValueError("undecodable name")
            check_name(name)
            if name in manifest.entries:
                raise ValueError("duplicate name")
            manifest.entries[name] = entry_from_json(value)
        except ValueError as exc:
            problems.append(f"directory {dir_id}: refused entry {shown[:80]!r}: {exc}")
    manifest.moved = _moved_from_json(raw.get("moved", {}), dir_id, problems)
    if "removed" in raw:
        manifest.removed = _place_from_json(raw["removed"], "from", dir_id, problems)
    if "mtime_ns" in raw:
        try:
            manifest.mtime_ns = _int(raw, "mtime_ns", -(1 << 62), 1 << 62)
        except ValueError:
            problems.append(f"directory {dir_id}: refused its mtime_ns")
    return manifest, problems


def _place_from_json(raw: object, key: str, dir_id: str,
                     problems: list[str]) -> tuple[str, bytes] | None:
    """A (folder id, name) pair: {key: id, "name_b64": name}; None (and a problem) if bad."""
    try:
        if not isinstance(raw, dict) or not is_valid_dir_id(raw.get(key)) \
                or not isinstance(raw.get("name_b64"), str):
            raise ValueError("malformed")
        name = base64.b64decode(raw["name_b64"], validate=True)
        check_name(name)
        return raw[key], name
    except (ValueError, binascii.Error) as exc:
        problems.append(f"directory {dir_id}: refused a record: {exc}")
        return None


def _moved_from_json(raw: object, dir_id: str, problems: list[str]) -> dict[str, tuple[str, bytes]]:
    """The removal records; a bad one is refused alone (they are advice, not content)."""
    if not isinstance(raw, dict):
        problems.append(f"directory {dir_id}: refused its moved records: not an object")
        return {}
    out: dict[str, tuple[str, bytes]] = {}
    for key, value in list(raw.items())[-MAX_MOVED:]:
        if not is_valid_dir_id(key):
            problems.append(f"directory {dir_id}: refused a record: bad id")
            continue
        place = _place_from_json(value, "to", dir_id, problems)
        if place is not None:
            out[key] = place
    return out


def is_removal_mark(data: bytes, dir_id: str) -> bool:
    """Whether a manifest is only the mark of a removed directory that never held
    anything (kept so that a machine adding to it learns of the removal; not a leftover)."""
    try:
        manifest = parse_manifest(data, dir_id)[0]
    except ManifestError:
        return False
    return manifest.removed is not None and not manifest.entries


def serialise_manifest(manifest: Manifest) -> bytes:
    plain: dict[str, dict] = {}
    encoded: dict[str, dict] = {}
    for name in sorted(manifest.entries):
        value = entry_to_json(manifest.entries[name])
        try:
            plain[name.decode("utf-8")] = value
        except UnicodeDecodeError:
            encoded[base64.b64encode(name).decode()] = value
    doc: dict = {"imgrepo_manifest": FORMAT, "dir_id": manifest.dir_id, "entries": plain}
    if encoded:
        doc["raw_entries"] = encoded
    doc.update(manifest_tail(manifest))
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_tail(manifest: Manifest) -> dict:
    """The keys a manifest's document has after its entries, in their order (the manifest
    cache writes the entries itself and must produce the same bytes)."""
    doc: dict = {}
    if manifest.moved:
        doc["moved"] = {dir_id: {"to": to, "name_b64": base64.b64encode(name).decode()}
                        for dir_id, (to, name) in list(manifest.moved.items())[-MAX_MOVED:]}
    if manifest.mtime_ns is not None:
        doc["mtime_ns"] = manifest.mtime_ns
    if manifest.removed is not None:
        doc["removed"] = {"from": manifest.removed[0],
                          "name_b64": base64.b64encode(manifest.removed[1]).decode()}
    return doc
