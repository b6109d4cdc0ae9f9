"""Checking and cleaning a repository: `imgrepo-mount --verify [--data]` and `--gc`.

Both work on the bucket alone (no mount needed, none disturbed).

verify
    Walks the tree from the root manifest by directory id (one GET per directory, several
    at once), lists `blobs/` once, and reports every problem precisely: a manifest that is
    not valid, entries it refuses (bad names, wrong types, impossible sizes), directories
    listed in two places or forming a cycle, files whose blob is missing or has the wrong
    size. With `--data` every blob is downloaded and hashed (streamed through a temporary
    file, a few at once). Unreachable manifests and unreferenced blobs are harmless
    leftovers and only noted. Exit status 1 when anything is wrong.

gc
    Deletes blobs that no manifest references. Why it is safe while other machines write:

    - every machine uploads a blob *before* any manifest that references it is written
      (the uploader commits an op only when its blob is in the bucket), and a rename puts
      the new name before it removes the old one, so a blob referenced by a committed
      manifest stays referenced until some manifest drops it for good;
    - the listing of `blobs/` is taken *before* the manifests are read: a blob uploaded
      later is not in the listing and cannot be deleted by this run, and a blob referenced
      by a manifest written before it was read is seen as referenced;
    - marking is deliberately blunt: every 64-hex-digit string in every object under
      `dirs/` (reachable or not, parseable or not) counts as a reference, so a damaged,
      orphaned or newer-format manifest never gets its blobs deleted;
    - the grace period covers what remains. A blob is deleted only if (a) it was uploaded
      more than GRACE hours ago (a machine may have uploaded it and not yet written the
      manifest naming it) and (b) an earlier gc run already found it unreferenced at least
      GRACE hours ago, and it has stayed unreferenced since. (b) matters because a machine
      that knows a blob exists re-uses it without uploading it again (dedup): a photo
      deleted everywhere and imported again an hour later makes its old blob referenced
      again, and the second gc run sees that. The first-seen times live in the bucket, in
      `gc/state.json`, so any machine's gc continues where another left off;
    - just before deleting, every manifest is read again (conditional GETs: unchanged ones
      cost almost nothing) and anything referenced by then is kept.

    - a mount re-uses a blob it knows (dedup) without a HEAD only if it saw that blob in the
      bucket within the last 10 minutes (`remote_index.TRUST_REMOTE`); anything it knows from
      longer ago, or from its persistent index, is checked again right before a manifest
      names it, and uploaded again if a gc deleted it. So a machine that comes back after
      days offline, or a photo deleted, collected and then imported again, is safe.

    A grace period shorter than those 10 minutes drops part of this protection, and
    `--grace 0` all of it: use them only when no mount is writing to the repository.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .config import Settings
from .errors import (
    ImgrepoError,
    ManifestError,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
)
from .hashing import hash_file
from .manifest import ROOT_ID, DirEntry, FileEntry, SymlinkEntry, parse_manifest
from .namespace import EMPTY_SHA
from .repository import blob_key, manifest_key, open_repository
from .store import open_store
from .store.base import NOT_MODIFIED, Store, StoredObject
from .units import human

log = logging.getLogger(__name__)

GC_STATE_KEY = "gc/state.json"
PARALLEL = 16
DATA_PARALLEL = 4
_HEX64 = re.compile(rb"[0-9a-f]{64}")
_BLOB_KEY = re.compile(r"^blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})$")
_DIR_KEY = re.compile(r"^dirs/([0-9A-Za-z_-]{1,64})\.json$")


# -- shared plumbing ------------------------------------------------------------------------
def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


async def _open(settings: Settings) -> Store:
    if settings.storage.startswith("s3://"):
        from .cli import apply_login_environment
        apply_login_environment(settings)
    store = open_store(settings.storage, settings.endpoint_url, settings.region)
    try:
        check = getattr(store, "check", None)
        if check is not None:
            await check()
        await open_repository(store, create=False)
    except BaseException:
        await store.aclose()
        raise
    return store


async def _gather(items: list[Any], fn: Any, parallel: int) -> None:
    """Run `await fn(item)` for every item, `parallel` at a time; the first error wins."""
    limit = trio.Semaphore(parallel)

    async def one(item: Any) -> None:
        async with limit:
            await fn(item)

    try:
        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(one, item)
    except BaseExceptionGroup as group:
        from .store.local import first_error
        first = first_error(group)
        if first is group:
            raise
        raise first from None


async def _list_blobs(store: Store, notes: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    """sha -> (size, mtime) of every blob in the bucket; odd keys are noted."""
    blobs: dict[str, tuple[int, float]] = {}
    async for info in store.list("blobs/"):
        m = _BLOB_KEY.match(info.key)
        if m is None or m.group(1) != m.group(2)[:2]:
            notes.append({"kind": "unexpected-object", "key": info.key,
                          "message": f"{info.key}: not a blob key (ignored)"})
            continue
        blobs[m.group(2)] = (info.size, info.mtime)
    return blobs


async def _list_manifests(store: Store, notes: list[dict[str, Any]] | None) -> list[str]:
    out = []
    async for info in store.list("dirs/"):
        m = _DIR_KEY.match(info.key)
        if m is None:
            if notes is not None:
                notes.append({"kind": "unexpected-object", "key": info.key,
                              "message": f"{info.key}: not a manifest key (ignored)"})
            continue
        out.append(m.group(1))
    return out


# -- verify ---------------------------------------------------------------------------------
@dataclass
class Verification:
    directories: int = 0
    files: int = 0
    symlinks: int = 0
    file_bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    blobs_hashed: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, kind: str, message: str, **extra: Any) -> None:
        self.problems.append({"kind": kind, "message": message, **extra})

    def as_json(self) -> dict[str, Any]:
        return {"ok": not self.problems, "directories": self.directories, "files": self.files,
                "symlinks": self.symlinks, "file_bytes": self.file_bytes,
                "blobs": self.blobs, "blob_bytes": self.blob_bytes,
                "blobs_hashed": self.blobs_hashed, "problems": self.problems,
                "notes": self.notes}


async def verify(store: Store, data: bool = False, progress: Any = None) -> Verification:
    """Check the whole repository in `store` (see the module docstring)."""
    v = Verification()
    parents: dict[str, tuple[str, bytes] | None] = {ROOT_ID: None}
    refs: dict[str, list[tuple[str, bytes, int]]] = {}  # sha -> [(dir_id, name, size)]

    def path_of(dir_id: str, name: bytes | None = None) -> str:
        parts: list[str] = [] if name is None else [_show(name)]
        seen: set[str] = set()
        current: str | None = dir_id
        while current is not None and current != ROOT_ID and current not in seen:
            seen.add(current)
            link = parents.get(current)
            if link is None:
                break
            parts.append(_show(link[1]))
            current = link[0]
        return "/" + "/".join(reversed(parts))

    def is_ancestor(candidate: str, dir_id: str) -> bool:
        current: str | None = dir_id
        seen: set[str] = set()
        while current is not None and current not in seen:
            if current == candidate:
                return True
            seen.add(current)
            link = parents.get(current)
            current = link[0] if link else None
        return False

    level = [ROOT_ID]
    while level:
        bodies: dict[str, bytes | None] = {}

        async def fetch(dir_id: str, bodies: dict[str, bytes | None] = bodies) -> None:
            try:
                got = await store.get(manifest_key(dir_id))
            except ObjectNotFound:
                bodies[dir_id] = None  # an empty directory has no manifest yet
                return
            assert isinstance(got, StoredObject)
            bodies[dir_id] = got.data

        await _gather(level, fetch, PARALLEL)
        next_level: list[str] = []
        for dir_id in level:
            v.directories += 1
            body = bodies[dir_id]
            if body is None:
                continue
            try:
                manifest, refused = parse_manifest(body, dir_id)
            except ManifestError as exc:
                v.problem("bad-manifest", f"{path_of(dir_id)} ({manifest_key(dir_id)}): {exc}",
                          key=manifest_key(dir_id), path=path_of(dir_id))
                continue
            for text in refused:
                v.problem("refused-entry", f"{path_of(dir_id)} ({manifest_key(dir_id)}): "
                          f"{text}", key=manifest_key(dir_id), path=path_of(dir_id))
            for name, entry in sorted(manifest.entries.items()):
                if isinstance(entry, DirEntry):
                    if entry.id in parents:
                        where = path_of(dir_id, name)
                        if is_ancestor(entry.id, dir_id):
                            v.problem("cycle", f"{where}: directory {entry.id} is its own "
                                      f"ancestor (a cycle); the mount refuses to enter it",
                                      path=where, dir_id=entry.id)
                        else:
                            v.problem("shared-directory",
                                      f"{where}: directory {entry.id} is also listed as "
                                      f"{path_of(entry.id)} (damage, or a move in progress "
                                      "on another machine: run --verify again later)",
                                      path=where, dir_id=entry.id)
                        continue
                    parents[entry.id] = (dir_id, name)
                    next_level.append(entry.id)
                elif isinstance(entry, FileEntry):
                    v.files += 1
                    v.file_bytes += entry.size
                    refs.setdefault(entry.sha256, []).append((dir_id, name, entry.size))
                elif isinstance(entry, SymlinkEntry):
                    v.symlinks += 1
        level = next_level

    blobs = await _list_blobs(store, v.notes)
    v.blobs = len(blobs)
    v.blob_bytes = sum(size for size, _ in blobs.values())
    for sha, users in sorted(refs.items()):
        have = blobs.get(sha)
        for dir_id, name, size in users:
            where = path_of(dir_id, name)
            if have is None:
                v.problem("missing-blob", f"{where}: its content (blob {sha}) is missing from "
                          "the bucket", path=where, sha256=sha)
            elif have[0] != size:
                v.problem("size-mismatch", f"{where}: the manifest says {size} bytes but blob "
                          f"{sha} has {have[0]}", path=where, sha256=sha)

    unreferenced = [sha for sha in blobs if sha not in refs and sha != EMPTY_SHA]
    if unreferenced:
        size = sum(blobs[s][0] for s in unreferenced)
        v.notes.append({"kind": "unreferenced-blobs", "count": len(unreferenced),
                        "bytes": size,
                        "message": f"{len(unreferenced)} blobs ({human(size)}) are not "
                                   "referenced by any directory (--gc frees them)"})
    unreachable = [d for d in await _list_manifests(store, v.notes) if d not in parents]
    if unreachable:
        v.notes.append({"kind": "unreachable-manifests", "count": len(unreachable),
                        "dir_ids": sorted(unreachable)[:100],
                        "message": f"{len(unreachable)} directory manifests are not reachable "
                                   "from the root (left over from removed directories)"})

    if data and blobs:
        await _verify_data(store, blobs, refs, v, path_of, progress)
    return v


async def _verify_data(store: Store, blobs: dict[str, tuple[int, float]],
                       refs: dict[str, list[tuple[str, bytes, int]]], v: Verification,
                       path_of: Any, progress: Any) -> None:
    todo = sorted(blobs)
    total = sum(blobs[s][0] for s in todo)
    done_bytes = 0
    with tempfile.TemporaryDirectory(prefix="imgrepo-verify-") as tmp:

        async def check(sha: str) -> None:
            nonlocal done_bytes
            dest = Path(tmp) / sha
            try:
                await store.download(blob_key(sha), dest)
                actual = await trio.to_thread.run_sync(hash_file, dest)
            except ObjectNotFound:
                return  # deleted meanwhile (a gc elsewhere): nothing to check
            finally:
                dest.unlink(missing_ok=True)
            v.blobs_hashed += 1
            done_bytes += blobs[sha][0]
            if actual != sha:
                users = refs.get(sha, [])
                paths = [path_of(d, n) for d, n, _ in users[:5]]
                shown = f" (used by {', '.join(paths)})" if paths else " (unreferenced)"
                v.problem("corrupt-blob", f"blob {sha}{shown}: its content hashes to {actual}",
                          sha256=sha, actual=actual, paths=paths)
            if progress is not None:
                progress(v.blobs_hashed, len(todo), done_bytes, total)

        await _gather(todo, check, DATA_PARALLEL)


def run_verify(settings: Settings, data: bool, as_json: bool) -> int:
    """`imgrepo-mount --verify [--data] [--json]`: exit 0 if the repository is sound."""
    last = [0.0]

    def progress(n: int, total: int, done: int, total_bytes: int) -> None:
        now = time.monotonic()
        if not as_json and (now - last[0] >= 2 or n == total):
            last[0] = now
            print(f"verify: hashed {n}/{total} blobs ({human(done)} of {human(total_bytes)})",
                  file=sys.stderr, flush=True)

    async def main() -> Verification:
        store = await _open(settings)
        try:
            return await verify(store, data, progress)
        finally:
            await store.aclose()

    v = trio.run(main)
    if as_json:
        print(json.dumps(v.as_json(), indent=1, sort_keys=True))
    else:
        for p in v.problems:
            print(f"problem: {p['message']}")
        for n in v.notes:
            print(f"note: {n['message']}")
        what = "checked" + (" and hashed" if data else "")
        print(f"{what} {v.directories} directories, {v.files} files ({human(v.file_bytes)}), "
              f"{v.symlinks} symlinks, {v.blobs} blobs ({human(v.blob_bytes)}) in "
              f"{settings.storage}: " +
              ("no problems found" if not v.problems else f"{len(v.problems)} problems found"))
    return 1 if v.problems else 0


# -- gc -------------------------------------------------------------------------------------
@dataclass
class Collection:
    blobs: int = 0
    blob_bytes: int = 0
    referenced: int = 0
    unreferenced: int = 0
    unreferenced_bytes: int = 0
    deleted: int = 0
    freed_bytes: int = 0
    kept_young: int = 0
    kept_young_bytes: int = 0
    rescued: int = 0  # referenced again between marking and sweeping
    next_eligible: float | None = None
    deleted_shas: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


async def _read_marks(store: Store, dir_ids: list[str],
                      etags: dict[str, str]) -> set[str]:
    """Every 64-hex string in the given manifests (reading only what changed since `etags`,
    which is updated); unchanged manifests contribute nothing new."""
    marks: set[str] = set()

    async def one(dir_id: str) -> None:
        try:
            got = await store.get(manifest_key(dir_id), if_none_match=etags.get(dir_id))
        except ObjectNotFound:
            return
        if got is NOT_MODIFIED:
            return
        assert isinstance(got, StoredObject)
        etags[dir_id] = got.etag
        marks.update(m.decode() for m in _HEX64.findall(got.data))

    await _gather(dir_ids, one, PARALLEL)
    return marks


async def _load_gc_state(store: Store) -> tuple[dict[str, float], str | None]:
    try:
        got = await store.get(GC_STATE_KEY)
    except ObjectNotFound:
        return {}, None
    assert isinstance(got, StoredObject)
    try:
        raw = json.loads(got.data)
        cands = raw["candidates"]
        out = {str(k): float(v) for k, v in cands.items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        log.warning("%s is unreadable; starting the grace periods afresh", GC_STATE_KEY)
        out = {}
    return out, got.etag


async def collect(store: Store, grace_hours: float, dry_run: bool,
                  now: float | None = None) -> Collection:
    """Mark and sweep (see the module docstring)."""
    grace = max(0.0, grace_hours) * 3600
    now = time.time() if now is None else now
    c = Collection()
    blobs = await _list_blobs(store, [])  # first: later uploads are never candidates
    c.blobs, c.blob_bytes = len(blobs), sum(s for s, _ in blobs.values())
    etags: dict[str, str] = {}
    marks = await _read_marks(store, await _list_manifests(store, None), etags)
    # The empty blob is referenced from every machine's index of known blobs (every new
    # file starts empty): it costs nothing to keep, so it is never collected.
    unreferenced = {sha for sha in blobs if sha not in marks and sha != EMPTY_SHA}
    c.referenced = c.blobs - len(unreferenced)
    c.unreferenced = len(unreferenced)
    c.unreferenced_bytes = sum(blobs[s][0] for s in unreferenced)

    state, state_etag = await _load_gc_state(store)
    first_seen = {sha: min(state.get(sha, now), now) for sha in unreferenced}
    deletable: list[str] = []
    for sha in sorted(unreferenced):
        size, mtime = blobs[sha]
        eligible = max(mtime, first_seen[sha]) + grace
        if eligible <= now:
            deletable.append(sha)
        else:
            c.kept_young += 1
            c.kept_young_bytes += size
            c.next_eligible = eligible if c.next_eligible is None else \
                min(c.next_eligible, eligible)

    if deletable and not dry_run:
        # Anything that became referenced meanwhile (dedup on another machine) is kept.
        again = await _read_marks(store, await _list_manifests(store, None), etags)
        rescued = [sha for sha in deletable if sha in again]
        c.rescued = len(rescued)
        deletable = [sha for sha in deletable if sha not in again]
        for sha in rescued:
            first_seen.pop(sha, None)

    if dry_run:
        c.deleted = len(deletable)
        c.freed_bytes = sum(blobs[s][0] for s in deletable)
        c.deleted_shas = deletable
        return c

    async def delete(sha: str) -> None:
        await store.delete(blob_key(sha))
        c.deleted += 1
        c.freed_bytes += blobs[sha][0]
        c.deleted_shas.append(sha)
        log.info("gc: deleted unreferenced blob %s (%d bytes)", sha, blobs[sha][0])

    await _gather(deletable, delete, PARALLEL)
    for sha in deletable:
        first_seen.pop(sha, None)
    await _save_gc_state(store, first_seen, state_etag)
    c.deleted_shas.sort()
    return c


async def _save_gc_state(store: Store, first_seen: dict[str, float],
                         etag: str | None) -> None:
    body = json.dumps({"format": 1, "candidates": first_seen}, sort_keys=True).encode()
    try:
        if etag is None:
            if first_seen:
                await store.put(GC_STATE_KEY, body, if_none_match=True)
        else:
            await store.put(GC_STATE_KEY, body, if_match=etag)
    except (PreconditionFailed, ObjectNotFound):
        # Another gc ran at the same time and recorded its own view: the first-seen times
        # of this run are lost, which only makes the grace period start again (safe).
        log.warning("another gc updated %s at the same time; keeping its version",
                    GC_STATE_KEY)


def run_gc(settings: Settings, dry_run: bool, grace_hours: float) -> int:
    """`imgrepo-mount --gc [--dry-run] [--grace HOURS]`."""
    if grace_hours < 0:
        raise ImgrepoError("--grace must be zero or more hours")
    if grace_hours < 1 / 6 and not dry_run:
        print(f"gc: note: a grace period of {grace_hours:g} h (under 10 minutes) is safe only "
              "while no mount is writing to this repository", file=sys.stderr)

    async def main() -> Collection:
        store = await _open(settings)
        try:
            return await collect(store, grace_hours, dry_run)
        finally:
            await store.aclose()

    try:
        c = trio.run(main)
    except StorageError as exc:
        raise ImgrepoError(f"gc stopped, nothing more deleted: {exc}") from None
    verb = "would delete" if dry_run else "deleted"
    lines = [
        f"{c.blobs} blobs ({human(c.blob_bytes)}) in {settings.storage}: {c.referenced} "
        f"referenced, {c.unreferenced} unreferenced ({human(c.unreferenced_bytes)})",
        f"{verb} {c.deleted} blobs, {'would free' if dry_run else 'freed'} "
        f"{human(c.freed_bytes)}",
    ]
    if c.kept_young:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.next_eligible or 0))
        lines.append(f"kept {c.kept_young} unreferenced blobs ({human(c.kept_young_bytes)}) "
                     f"within the grace period of {grace_hours:g} h; a gc run after {when} "
                     "deletes them if they are still unreferenced")
    if c.rescued:
        lines.append(f"kept {c.rescued} blobs that became referenced while gc ran")
    print("\n".join(("gc (dry run): " if dry_run else "gc: ") + line for line in lines))
    return 0
