"""Snapshots: their format in the bucket, recording one, reading and deleting them.

    snapshots/<NAME>.json                 one snapshot: directory id -> manifest copy
    snapshot-dirs/<s[0:2]>/<s>.json       a manifest's bytes as they were, named by their
                                          SHA-256 (immutable, shared by every snapshot)

A snapshot copies no blob: blobs are immutable and content-addressed already, so keeping
the manifests that name them keeps the whole tree. Recording lists `dirs/` once and copies
only the manifests whose listing token (etag, or size and time) differs from the previous
snapshot's: unchanged directories reuse that snapshot's copies, so a snapshot after one
changed folder costs one PUT for it (a GET as well when this machine's cached manifest is
not that version), plus the listings and the snapshot object.

Snapshot objects and manifest copies never change once written, so this machine keeps them
in a folder of its own (`cache_dir`): a snapshot it has read reads again offline. When a
snapshot goes (deleted here or elsewhere, or expired), the local copies no snapshot kept
here names any more go too, so the folder follows the snapshots instead of growing for ever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .dir_listing import ManifestSource, listed_manifests, manifest_now
from .errors import ImgrepoError, ObjectNotFound, RepositoryFormatError
from .manifest import is_valid_dir_id
from .store.base import ObjectInfo, Store, StoredObject

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "snapshots/"
COPY_PREFIX = "snapshot-dirs/"
FORMAT = 1
COPY_PRUNE_GRACE = 600.0  # seconds: a copy this young may belong to a snapshot being recorded
RESERVED_NAME = b".snapshots"  # the root's name for them: refused as a real name there
_NAME_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._:+-]{0,99}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

# The manifest a directory held when the snapshot was taken (sha: its copy), and the
# listing token it had then (an unchanged token means an unchanged manifest).


def snapshot_key(name: str) -> str:
    return f"{SNAPSHOT_PREFIX}{name}.json"


def copy_key(sha256: str) -> str:
    return f"{COPY_PREFIX}{sha256[:2]}/{sha256}.json"


def default_name(now: float) -> str:
    """The UTC time, e.g. 2026-12-05T184000Z (sorts by time, no ':' for other tools)."""
    return time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime(now))


def is_snapshot_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and not name.endswith(".json")


def check_snapshot_name(name: str) -> str:
    """The name if it can name a snapshot (a file name in every system), else ImgrepoError."""
    if not is_snapshot_name(name):
        raise ImgrepoError(
            f"bad snapshot name {name[:120]!r}: use 1-100 letters, digits and . _ : + - "
            "(not starting with one of those four, not ending in .json)")
    return name


@dataclass(frozen=True)
class DirRecord:
    sha: str  # the manifest copy's SHA-256
    token: str  # dirs/<id>.json's listing token when it was copied


@dataclass
class Snapshot:
    name: str
    created: float  # seconds since the epoch
    machine: str
    period: str | None = None  # automatic snapshots: the period they stand for
    dirs: dict[str, DirRecord] = field(default_factory=dict)


def serialise_snapshot(snap: Snapshot) -> bytes:
    doc = {"imgrepo_snapshot": FORMAT, "name": snap.name, "created": snap.created,
           "machine": snap.machine, "period": snap.period,
           "dirs": {d: [r.sha, r.token] for d, r in sorted(snap.dirs.items())}}
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_snapshot(data: bytes, name: str) -> Snapshot:
    """Strict: a snapshot object that is not exactly ours is refused as a whole (it is what
    a restore would trust)."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("imgrepo_snapshot") != FORMAT:
            raise ValueError("not a snapshot of a known format")
        created, machine, period = raw.get("created"), raw.get("machine"), raw.get("period")
        if type(created) not in (int, float) or not isinstance(machine, str) \
                or not (period is None or isinstance(period, str)):
            raise ValueError("bad header")
        dirs: dict[str, DirRecord] = {}
        raw_dirs = raw.get("dirs")
        if not isinstance(raw_dirs, dict):
            raise ValueError("bad dirs")
        for dir_id, rec in raw_dirs.items():
            if not is_valid_dir_id(dir_id) or not isinstance(rec, list) or len(rec) != 2 \
                    or not isinstance(rec[0], str) or not _SHA_RE.match(rec[0]) \
                    or not isinstance(rec[1], str):
                raise ValueError(f"bad record for directory {dir_id[:80]!r}")
            dirs[dir_id] = DirRecord(rec[0], rec[1])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RepositoryFormatError(f"snapshot {name}: unreadable ({str(exc)[:200]})") \
            from None
    return Snapshot(name, float(created), machine, period, dirs)


def listing_token(info: ObjectInfo) -> str:
    """What tells one version of a manifest object from another in a listing."""
    if info.etag:
        return "e:" + info.etag.strip('"')
    return f"t:{info.size}:{int(info.mtime * 1e9)}"


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot as a listing shows it (the object's own header needs a GET)."""

    name: str
    written: float


class Snapshots:
    """Snapshot objects and manifest copies in the bucket, kept in a local folder too."""

    def __init__(self, store: Store, cache_dir: Path, machine: str) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.machine = machine
        self._checked: dict[str, Snapshot] = {}  # read (or revalidated) by this process

    # -- local copies ---------------------------------------------------------------------
    def _local(self, kind: str, name: str) -> Path:
        if kind == "dirs":  # many: sharded as in the bucket
            return self.cache_dir / kind / name[:2] / name
        return self.cache_dir / kind / name

    def _keep(self, kind: str, name: str, data: bytes) -> None:
        path = self._local(kind, name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot keep a local copy of snapshot data %s: %s", name, exc)

    def _read_local(self, kind: str, name: str) -> bytes | None:
        try:
            return self._local(kind, name).read_bytes()
        except OSError:
            return None

    def _forget_local(self, name: str) -> None:
        self._checked.pop(name, None)
        self._local("named", name).unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------
    async def names(self) -> list[SnapshotInfo]:
        """The snapshots in the bucket, oldest first (one listing); offline, the ones this
        machine knows."""
        if not self.store.online:
            return self.known_names()
        out: list[SnapshotInfo] = []
        async for info in self.store.list(SNAPSHOT_PREFIX):
            name = info.key[len(SNAPSHOT_PREFIX):-len(".json")] \
                if info.key.endswith(".json") else ""
            if is_snapshot_name(name):
                out.append(SnapshotInfo(name, info.mtime))
        present = {s.name for s in out}
        gone = [n for n in self._local_names() if n not in present]
        for name in gone:
            self._forget_local(name)  # deleted by another machine (or expired)
        if gone:
            await self.prune_local_copies()
        return sorted(out, key=lambda s: (s.written, s.name))

    def _local_names(self) -> list[str]:
        try:
            return [p.name for p in (self.cache_dir / "named").iterdir()
                    if not p.name.endswith(".tmp")]
        except OSError:
            return []

    def known_names(self) -> list[SnapshotInfo]:
        out = []
        for name in self._local_names():
            snap = self._parse_local(name)
            if snap is not None:
                out.append(SnapshotInfo(name, snap.created))
        return sorted(out, key=lambda s: (s.written, s.name))

    def _parse_local(self, name: str) -> Snapshot | None:
        data = self._read_local("named", name)
        if data is None:
            return None
        try:
            return parse_snapshot(data, name)
        except RepositoryFormatError:
            self._forget_local(name)
            return None

    async def load(self, name: str) -> Snapshot:
        """A snapshot by name: once per process from the bucket (a name deleted and taken
        again elsewhere is seen), then from memory; offline, from the local copy."""
        if not is_snapshot_name(name):
            raise ObjectNotFound(f"no snapshot named {name[:120]!r}")
        snap = self._checked.get(name)
        if snap is not None:
            return snap
        local = self._read_local("named", name)
        if not self.store.online:
            if local is None:
                raise ObjectNotFound(f"snapshot {name} is not known on this machine "
                                     "and the storage is unreachable")
            snap = parse_snapshot(local, name)
        else:
            try:
                got = await self.store.get(snapshot_key(name))
            except ObjectNotFound:
                self._forget_local(name)
                raise ObjectNotFound(f"no snapshot named {name}") from None
            assert isinstance(got, StoredObject)
            snap = parse_snapshot(got.data, name)
            if got.data != local:
                self._keep("named", name, got.data)
        self._checked[name] = snap
        return snap

    async def manifest(self, record: DirRecord) -> bytes:
        """A manifest copy's bytes, checked against its name."""
        data = self._read_local("dirs", record.sha)
        if data is not None and hashlib.sha256(data).hexdigest() == record.sha:
            return data
        got = await self.store.get(copy_key(record.sha))
        assert isinstance(got, StoredObject)
        if hashlib.sha256(got.data).hexdigest() != record.sha:
            raise RepositoryFormatError(f"manifest copy {record.sha} in the bucket is corrupt")
        self._keep("dirs", record.sha, got.data)
        return got.data

    # -- recording ------------------------------------------------------------------------
    async def record(self, name: str, cached: ManifestSource, period: str | None = None,
                     now: float | None = None, skip_unchanged: bool = False
                     ) -> Snapshot | None:
        """Record the repository as the bucket holds it now under `name` (see the module's
        docstring for the cost). `cached(dir_id, etag)`: this machine's copy of a manifest
        if it is that version (None: read it from the bucket). PreconditionFailed if the
        name is taken. `skip_unchanged`: None, and nothing written, when the newest
        snapshot already holds exactly this tree."""
        check_snapshot_name(name)
        previous = await self._latest()
        listed = await listed_manifests(self.store)
        reused = {r.sha for r in previous.dirs.values()} if previous else set()
        snap = Snapshot(name, time.time() if now is None else now, self.machine, period)
        for dir_id, info in listed.items():
            token = listing_token(info)
            old = previous.dirs.get(dir_id) if previous else None
            if old is not None and old.token == token:
                snap.dirs[dir_id] = old
                continue
            data = await manifest_now(self.store, dir_id, info.etag, cached)
            if data is None:
                continue  # removed between the listing and now
            sha = hashlib.sha256(data).hexdigest()
            if sha not in reused:
                # Unconditional: an old copy left by a deleted snapshot gets a new time, so
                # a gc running now keeps it for its grace period.
                await self.store.put(copy_key(sha), data)
                self._keep("dirs", sha, data)
                reused.add(sha)
            snap.dirs[dir_id] = DirRecord(sha, token)
        if skip_unchanged and previous is not None and snap.dirs == previous.dirs:
            return None
        body = serialise_snapshot(snap)
        await self.store.put(snapshot_key(name), body, if_none_match=True)
        self._keep("named", name, body)
        self._checked[name] = snap
        return snap

    async def _latest(self) -> Snapshot | None:
        """The newest snapshot in the bucket whose copies it reuses (None: none usable)."""
        for info in reversed(await self.names()):
            try:
                return await self.load(info.name)
            except (ObjectNotFound, RepositoryFormatError) as exc:
                log.info("snapshot %s not reused: %s", info.name, exc)
        return None

    async def delete(self, name: str) -> None:
        """Delete a snapshot object (its copies and blobs go at the next --gc, if no other
        snapshot names them). ObjectNotFound if there is none by that name."""
        if not is_snapshot_name(name):
            raise ObjectNotFound(f"no snapshot named {name[:120]!r}")
        if await self.store.head(snapshot_key(name)) is None:
            self._forget_local(name)
            raise ObjectNotFound(f"no snapshot named {name}")
        await self.store.delete(snapshot_key(name))
        self._forget_local(name)
        await self.prune_local_copies()

    async def prune_local_copies(self) -> int:
        """Remove the local manifest copies that no snapshot kept here names (a worker
        thread: every kept snapshot is parsed). A copy younger than COPY_PRUNE_GRACE stays:
        a snapshot being recorded names it only once written. Returns how many went."""
        removed = await trio.to_thread.run_sync(self._prune_copies, time.time())
        if removed:
            log.info("%d local copies of snapshot folders no snapshot names any more "
                     "were removed", removed)
        return removed

    def _prune_copies(self, now: float) -> int:
        named: set[str] = set()
        for name in self._local_names():
            try:  # not _parse_local: this is a worker thread, it forgets nothing
                snap = parse_snapshot(self._local("named", name).read_bytes(), name)
            except (OSError, RepositoryFormatError):
                continue
            named.update(r.sha for r in snap.dirs.values())
        removed = 0
        try:
            shards = list((self.cache_dir / "dirs").iterdir())
        except OSError:
            return 0
        for shard in shards:
            try:
                copies = list(shard.iterdir())
            except OSError:
                continue
            for copy in copies:
                if copy.name in named:
                    continue
                try:
                    if now - copy.stat().st_mtime < COPY_PRUNE_GRACE:
                        continue
                    copy.unlink()
                    removed += 1
                except OSError:
                    continue  # gone meanwhile, or not ours to remove: stays
        return removed

