"""Checking a repository: `imgrepo-mount --verify [--data]`.

Walks the tree from the root manifest by directory id (one GET per directory, several
at once), lists `blobs/` once, and reports every problem precisely: a manifest that is
not valid, entries it refuses (bad names, wrong types, impossible sizes), directories
listed in two places or forming a cycle, files whose blob is missing or has the wrong
size. With `--data` every blob is downloaded and hashed (streamed through a temporary
file, a few at once). Unreachable manifests and unreferenced blobs are harmless
leftovers and only noted. Exit status 1 when anything is wrong.

Memory stays small at millions of files: each file found is held as its blob's digest,
size and directory (`FileRefs`), the bucket's blobs as a `BlobTable`; a level of the tree
is read BATCH manifests at a time, each dropped once checked; the few files with a
problem are named by reading their directories again.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..errors import ManifestError, ObjectNotFound
from ..hashing import hash_file
from ..manifest import ROOT_ID, DirEntry, FileEntry, SymlinkEntry, is_removal_mark, parse_manifest
from ..namespace import EMPTY_SHA
from ..repository import blob_key, manifest_key
from ..store.base import Store, StoredObject
from ..units import human
from .blobtable import BlobTable
from .filerefs import FileRefs
from .snapshot_check import check_snapshots
from .walk import PARALLEL, gather, list_blobs, list_manifests, path_in

DATA_PARALLEL = 4
BATCH = 256  # manifests fetched and checked at a time (each read once, then dropped)


@dataclass
class Verification:
    directories: int = 0
    files: int = 0
    symlinks: int = 0
    file_bytes: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    blobs_hashed: int = 0
    snapshots: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)

    def problem(self, kind: str, message: str, **extra: Any) -> None:
        self.problems.append({"kind": kind, "message": message, **extra})

    def as_json(self) -> dict[str, Any]:
        return {"ok": not self.problems, "directories": self.directories, "files": self.files,
                "symlinks": self.symlinks, "file_bytes": self.file_bytes,
                "blobs": self.blobs, "blob_bytes": self.blob_bytes,
                "blobs_hashed": self.blobs_hashed, "snapshots": self.snapshots,
                "problems": self.problems,
                "notes": self.notes}


async def verify(store: Store, data: bool = False, progress: Any = None) -> Verification:
    """Check the whole repository in `store` (see the module docstring)."""
    v = Verification()
    parents: dict[str, tuple[str, bytes] | None] = {ROOT_ID: None}
    refs = FileRefs()

    def path_of(dir_id: str, name: bytes | None = None) -> str:
        return path_in(parents, dir_id, name)

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
        next_level: list[str] = []
        async for dir_id, body in _bodies(store, level):
            v.directories += 1
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
                    for sha, size in entry.blobs():  # its chunks, for a chunked file
                        refs.add(dir_id, sha, size)
                elif isinstance(entry, SymlinkEntry):
                    v.symlinks += 1
        level = next_level

    blobs = await list_blobs(store, v.notes)
    v.blobs = len(blobs)
    v.blob_bytes = blobs.total_bytes()
    used = bytearray(len(blobs))  # 1: some file names the blob
    wrong: dict[str, set[tuple[str, int]]] = {}  # dir_id -> {(sha, size)} with a problem
    for dir_id, sha, size in refs:
        index = blobs.find(sha)
        if index >= 0:
            used[index] = 1
        if index < 0 or blobs.size(index) != size:
            wrong.setdefault(dir_id, set()).add((sha, size))
    found: list[tuple[str, str, int]] = []  # (sha, path, size)
    named = await _names_in(store, {d: {sha for sha, _ in pairs} for d, pairs in wrong.items()})
    for dir_id, pairs in wrong.items():
        for sha, size in pairs:
            names = named.get((dir_id, sha), {}).get(size) or [None]
            found += [(sha, path_of(dir_id, name) if name is not None else
                       path_of(dir_id) + "/(a file changed since)", size) for name in names]
    for sha, where, size in sorted(found):
        index = blobs.find(sha)
        if index < 0:
            v.problem("missing-blob", f"{where}: its content (blob {sha}) is missing from "
                      "the bucket", path=where, sha256=sha)
        else:
            v.problem("size-mismatch", f"{where}: the manifest says {size} bytes but blob "
                      f"{sha} has {blobs.size(index)}", path=where, sha256=sha)

    v.snapshots = await check_snapshots(store, blobs, used, v)
    unreferenced = size = 0
    for index in range(len(blobs)):
        if not used[index] and blobs.sha(index) != EMPTY_SHA:
            unreferenced += 1
            size += blobs.size(index)
    if unreferenced:
        v.notes.append({"kind": "unreferenced-blobs", "count": unreferenced,
                        "bytes": size,
                        "message": f"{unreferenced} blobs ({human(size)}) are not "
                                   "referenced by any directory (--gc frees them)"})
    unreachable = [d for d in await list_manifests(store, v.notes) if d not in parents
                   and not await _removal_mark(store, d)]
    if unreachable:
        v.notes.append({"kind": "unreachable-manifests", "count": len(unreachable),
                        "dir_ids": sorted(unreachable)[:100],
                        "message": f"{len(unreachable)} directory manifests are not reachable "
                                   "from the root (left over from removed directories)"})

    if data and blobs:
        await _verify_data(store, blobs, refs, v, path_of, progress)
    return v


async def _bodies(store: Store, level: list[str]) -> AsyncIterator[tuple[str, bytes | None]]:
    """A level's manifests in its order (None: no manifest), fetched BATCH at a time, many
    in flight: a level of 10,000 photo folders holds ~150 MB of manifests, never all at
    once."""
    for start in range(0, len(level), BATCH):
        batch = level[start:start + BATCH]
        bodies: dict[str, bytes | None] = {}

        async def fetch(dir_id: str, bodies: dict[str, bytes | None] = bodies) -> None:
            try:
                got = await store.get(manifest_key(dir_id))
            except ObjectNotFound:
                bodies[dir_id] = None  # an empty directory has no manifest yet
                return
            assert isinstance(got, StoredObject)
            bodies[dir_id] = got.data

        await gather(batch, fetch, PARALLEL)
        for dir_id in batch:
            yield dir_id, bodies.pop(dir_id)


async def _removal_mark(store: Store, dir_id: str) -> bool:
    """A removed, never-filled directory's mark (docs/cross-machine.md): not a leftover."""
    try:
        obj = await store.get(manifest_key(dir_id))
    except ObjectNotFound:
        return True  # deleted meanwhile
    return isinstance(obj, StoredObject) and is_removal_mark(obj.data, dir_id)


async def _names_in(store: Store, wanted: dict[str, set[str]]
                    ) -> dict[tuple[str, str], dict[int, list[bytes]]]:
    """(dir_id, sha) -> size -> the names of the files naming that blob, for the few
    directories with a problem, read again (a directory gone meanwhile names nobody)."""
    out: dict[tuple[str, str], dict[int, list[bytes]]] = {}

    async def read(dir_id: str) -> None:
        try:
            got = await store.get(manifest_key(dir_id))
            assert isinstance(got, StoredObject)
            manifest, _ = parse_manifest(got.data, dir_id)
        except (ObjectNotFound, ManifestError):
            return
        shas = wanted[dir_id]
        for name, entry in sorted(manifest.entries.items()):
            if not isinstance(entry, FileEntry):
                continue
            for sha, size in entry.blobs():
                if sha in shas:
                    out.setdefault((dir_id, sha), {}).setdefault(size, []).append(name)

    await gather(list(wanted), read, PARALLEL)
    return out


async def _verify_data(store: Store, blobs: BlobTable, refs: FileRefs, v: Verification,
                       path_of: Any, progress: Any) -> None:
    total = blobs.total_bytes()
    done_bytes = 0
    with tempfile.TemporaryDirectory(prefix="imgrepo-verify-") as tmp:

        async def check(index: int) -> None:
            nonlocal done_bytes
            sha = blobs.sha(index)
            dest = Path(tmp) / sha
            try:
                await store.download(blob_key(sha), dest)
                actual = await trio.to_thread.run_sync(hash_file, dest)
            except ObjectNotFound:
                return  # deleted meanwhile (a gc elsewhere): nothing to check
            finally:
                dest.unlink(missing_ok=True)
            v.blobs_hashed += 1
            done_bytes += blobs.size(index)
            if actual != sha:
                dirs = refs.users(sha, 5)
                named = await _names_in(store, {d: {sha} for d in dirs})
                paths = [path_of(d, name) for d in dict.fromkeys(dirs)
                         for names in named.get((d, sha), {}).values() for name in names][:5]
                shown = f" (used by {', '.join(paths)})" if paths else " (unreferenced)"
                v.problem("corrupt-blob", f"blob {sha}{shown}: its content hashes to {actual}",
                          sha256=sha, actual=actual, paths=paths)
            if progress is not None:
                progress(v.blobs_hashed, len(blobs), done_bytes, total)

        await gather(range(len(blobs)), check, DATA_PARALLEL)
