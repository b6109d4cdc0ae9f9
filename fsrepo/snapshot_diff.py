"""How far a snapshot is from the bucket's current tree: the files and bytes that differ.

Directories are compared by id: one whose manifest has the listing token the snapshot
recorded is unchanged without reading anything; any other is compared entry by entry
(a file differs when it is only on one side or its content differs; its bytes are the
snapshot's version's, else the current one's). A directory renamed elsewhere keeps its id
and so counts as unchanged: the files in it did not change.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .errors import ManifestError, ObjectNotFound
from .manifest import Entry, FileEntry, parse_manifest
from .snapshots import Snapshot, Snapshots, listing_token
from .store.base import Store, StoredObject

_DIR_KEY = re.compile(r"^dirs/([0-9A-Za-z_-]{1,64})\.json$")

CurrentManifest = Callable[[str, str | None], Awaitable[bytes | None]]


@dataclass
class Difference:
    files: int = 0
    bytes: int = 0


@dataclass
class CurrentTree:
    """One listing of `dirs/` (token and etag per directory), shared by the comparisons
    of every snapshot in a request; manifests read are kept for the next one."""

    tokens: dict[str, str]
    etags: dict[str, str | None]
    bodies: dict[str, dict[bytes, Entry]]


async def current_tree(store: Store) -> CurrentTree:
    tokens: dict[str, str] = {}
    etags: dict[str, str | None] = {}
    async for info in store.list("dirs/"):
        match = _DIR_KEY.match(info.key)
        if match is not None:
            tokens[match.group(1)] = listing_token(info)
            etags[match.group(1)] = info.etag
    return CurrentTree(tokens, etags, {})


def _files(entries: dict[bytes, Entry]) -> dict[bytes, FileEntry]:
    return {n: e for n, e in entries.items() if isinstance(e, FileEntry)}


async def difference(snap: Snapshot, snapshots: Snapshots, store: Store, now: CurrentTree,
                     cached: CurrentManifest) -> Difference:
    """Files and bytes of `snap` that differ from the current tree (`cached` as in
    Snapshots.record: this machine's copy of a manifest at the listed version)."""
    out = Difference()
    for dir_id in set(snap.dirs) | set(now.tokens):
        record = snap.dirs.get(dir_id)
        if record is not None and now.tokens.get(dir_id) == record.token:
            continue
        old: dict[bytes, FileEntry] = {}
        if record is not None:
            try:
                old = _files(parse_manifest(await snapshots.manifest(record), dir_id)[0].entries)
            except ManifestError:
                old = {}
        new = _files(await _current(dir_id, store, now, cached)) if dir_id in now.tokens \
            else {}
        for name in set(old) | set(new):
            before, after = old.get(name), new.get(name)
            if before is None or after is None or before.sha256 != after.sha256:
                out.files += 1
                out.bytes += (before or after).size  # type: ignore[union-attr]
    return out


async def _current(dir_id: str, store: Store, now: CurrentTree,
                   cached: CurrentManifest) -> dict[bytes, Entry]:
    entries = now.bodies.get(dir_id)
    if entries is not None:
        return entries
    data = await cached(dir_id, now.etags.get(dir_id))
    if data is None:
        try:
            got = await store.get(f"dirs/{dir_id}.json")
        except ObjectNotFound:
            return {}
        assert isinstance(got, StoredObject)
        data = got.data
    try:
        entries = parse_manifest(data, dir_id)[0].entries
    except ManifestError:
        entries = {}
    now.bodies[dir_id] = entries
    return entries
