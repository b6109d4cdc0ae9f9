"""--verify of the snapshots: each snapshot object readable, each manifest copy it names
present and intact (its SHA-256 is its name), each file in those copies with its blob in
the bucket at the size the copy says. Every copy is read once, however many snapshots
share it; the blobs snapshots name count as used (not "unreferenced")."""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from ..errors import ManifestError, ObjectNotFound, RepositoryFormatError
from ..manifest import ROOT_ID, DirEntry, Entry, FileEntry, parse_manifest
from ..snapshots import SNAPSHOT_PREFIX, Snapshot, copy_key, is_snapshot_name, parse_snapshot
from ..store.base import Store, StoredObject
from .blobtable import BlobTable
from .walk import PARALLEL, gather, path_in


class Problems(Protocol):
    def problem(self, kind: str, message: str, **extra: Any) -> None: ...


async def _snapshots(store: Store, v: Problems) -> list[Snapshot]:
    keys = [info.key async for info in store.list(SNAPSHOT_PREFIX)]
    out: list[Snapshot] = []

    async def one(key: str) -> None:
        name = key[len(SNAPSHOT_PREFIX):].removesuffix(".json")
        if not key.endswith(".json") or not is_snapshot_name(name):
            v.problem("bad-snapshot", f"{key}: not a snapshot's key", key=key)
            return
        try:
            got = await store.get(key)
        except ObjectNotFound:
            return  # deleted meanwhile
        assert isinstance(got, StoredObject)
        try:
            out.append(parse_snapshot(got.data, name))
        except RepositoryFormatError as exc:
            v.problem("bad-snapshot", f"{key}: {exc}", key=key, snapshot=name)

    await gather(keys, one, PARALLEL)
    return sorted(out, key=lambda s: s.name)


async def check_snapshots(store: Store, blobs: BlobTable, used: bytearray, v: Problems) -> int:
    """Check every snapshot (see the module docstring); returns how many there are."""
    snaps = await _snapshots(store, v)
    wanted = {(dir_id, rec.sha) for s in snaps for dir_id, rec in s.dirs.items()}
    copies: dict[tuple[str, str], str | dict[bytes, Entry]] = {}  # -> what is wrong, or entries

    async def read(item: tuple[str, str]) -> None:
        dir_id, sha = item
        try:
            got = await store.get(copy_key(sha))
        except ObjectNotFound:
            copies[item] = f"is missing ({copy_key(sha)})"
            return
        assert isinstance(got, StoredObject)
        if hashlib.sha256(got.data).hexdigest() != sha:
            copies[item] = f"is corrupt ({copy_key(sha)})"
            return
        try:
            copies[item] = parse_manifest(got.data, dir_id)[0].entries
        except ManifestError as exc:
            copies[item] = f"cannot be read: {exc}"

    await gather(sorted(wanted), read, PARALLEL)
    for snap in snaps:
        parents: dict[str, tuple[str, bytes] | None] = {ROOT_ID: None}
        for dir_id, rec in snap.dirs.items():
            got = copies[(dir_id, rec.sha)]
            if isinstance(got, dict):
                parents.update({e.id: (dir_id, n) for n, e in got.items()
                                if isinstance(e, DirEntry)})
        for dir_id, rec in sorted(snap.dirs.items()):
            got = copies[(dir_id, rec.sha)]
            if isinstance(got, str):
                v.problem("snapshot-copy", f"snapshot {snap.name}: its copy of folder "
                          f"{path_in(parents, dir_id)} {got}", snapshot=snap.name,
                          dir_id=dir_id, path=path_in(parents, dir_id))
                continue
            for name, entry in sorted(got.items()):
                if not isinstance(entry, FileEntry):
                    continue
                for sha, size in entry.blobs():  # a chunked file: each of its chunks
                    index = blobs.find(sha)
                    if index >= 0:
                        used[index] = 1
                    if index < 0 or blobs.size(index) != size:
                        where = path_in(parents, dir_id, name)
                        what = "is missing from the bucket" if index < 0 else \
                            f"has {blobs.size(index)} bytes, the copy says {size}"
                        v.problem("snapshot-blob", f"snapshot {snap.name}: {where}: its content "
                                  f"(blob {sha}) {what}", snapshot=snap.name,
                                  dir_id=dir_id, path=where, sha256=sha)
    return len(snaps)
