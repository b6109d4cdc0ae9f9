"""Deleting unreferenced blobs: `imgrepo-mount --gc`.

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
- snapshots keep what they name: every blob named by a manifest copy a snapshot names
  (or by a copy still within its own grace period) counts as referenced, and copies no
  snapshot names go by the same two-sided grace rule (snapshot_marks.py);
- just before deleting, every manifest is read again (conditional GETs: unchanged ones
  cost almost nothing) and anything referenced by then is kept.

- a mount re-uses a blob it knows (dedup) without a HEAD only if it saw that blob in the
  bucket within the last 10 minutes (`remote_index.TRUST_REMOTE`); anything it knows from
  longer ago, or from its persistent index, is checked again right before a manifest
  names it, and uploaded again if a gc deleted it. So a machine that comes back after
  days offline, or a photo deleted, collected and then imported again, is safe.

A grace period shorter than those 10 minutes drops part of this protection, and
`--grace 0` all of it: use them only when no mount is writing to the repository.

Memory stays small at millions of blobs: the listing is a `BlobTable` and the marks one
byte per listed blob (a string found in a manifest that names no listed blob is moot).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ObjectNotFound, PreconditionFailed
from ..namespace import EMPTY_SHA
from ..repository import blob_key, manifest_key
from ..store.base import NOT_MODIFIED, Store, StoredObject
from .blobtable import BlobTable
from .snapshot_marks import CopyGrace, mark_snapshots, sweep_copies
from .tombstones import collect_tombstones
from .walk import PARALLEL, gather, list_blobs, list_manifests

log = logging.getLogger(__name__)

GC_STATE_KEY = "gc/state.json"
_HEX64 = re.compile(rb"[0-9a-f]{64}")


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
    tombstones: int = 0  # removal marks of folders removed before the grace period
    snapshot_copies_deleted: int = 0  # manifest copies only deleted snapshots named
    next_eligible: float | None = None
    deleted_shas: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


async def _read_marks(store: Store, dir_ids: list[str], etags: dict[str, str],
                      blobs: BlobTable) -> bytearray:
    """One byte per listed blob: 1 if a 64-hex string in the given manifests names it
    (reading only what changed since `etags`, which is updated); unchanged manifests
    contribute nothing new."""
    marks = bytearray(len(blobs))

    async def one(dir_id: str) -> None:
        try:
            got = await store.get(manifest_key(dir_id), if_none_match=etags.get(dir_id))
        except ObjectNotFound:
            return
        if got is NOT_MODIFIED:
            return
        assert isinstance(got, StoredObject)
        etags[dir_id] = got.etag
        for found in _HEX64.findall(got.data):
            index = blobs.find(found.decode())
            if index >= 0:
                marks[index] = 1

    await gather(dir_ids, one, PARALLEL)
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
    c.tombstones = await collect_tombstones(store, grace, now, dry_run)
    blobs = await list_blobs(store, [])  # first: later uploads are never candidates
    c.blobs, c.blob_bytes = len(blobs), blobs.total_bytes()
    etags: dict[str, str] = {}
    marks = await _read_marks(store, await list_manifests(store, None), etags, blobs)
    state, state_etag = await _load_gc_state(store)
    copy_grace = CopyGrace(state, now, grace)
    snaps = await mark_snapshots(store, blobs, marks, copy_grace)  # what snapshots keep
    # The empty blob is referenced from every machine's index of known blobs (every new
    # file starts empty): it costs nothing to keep, so it is never collected.
    unreferenced = [i for i in range(len(blobs)) if not marks[i]
                    and blobs.sha(i) != EMPTY_SHA]  # in digest order
    c.referenced = c.blobs - len(unreferenced)
    c.unreferenced = len(unreferenced)
    c.unreferenced_bytes = sum(blobs.size(i) for i in unreferenced)

    first_seen = {blobs.sha(i): min(state.get(blobs.sha(i), now), now) for i in unreferenced}
    deletable: list[str] = []
    for index in unreferenced:
        sha, size, mtime = blobs.sha(index), blobs.size(index), blobs.mtime(index)
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
        again = await _read_marks(store, await list_manifests(store, None), etags, blobs)
        await mark_snapshots(store, blobs, again, copy_grace, snaps)
        rescued = [sha for sha in deletable if again[blobs.find(sha)]]
        c.rescued = len(rescued)
        deletable = [sha for sha in deletable if not again[blobs.find(sha)]]
        for sha in rescued:
            first_seen.pop(sha, None)

    if dry_run:
        c.snapshot_copies_deleted = (await sweep_copies(store, copy_grace, True))[0]
        c.deleted = len(deletable)
        c.freed_bytes = sum(blobs.size(blobs.find(s)) for s in deletable)
        c.deleted_shas = deletable
        return c

    async def delete(sha: str) -> None:
        await store.delete(blob_key(sha))
        c.deleted += 1
        size = blobs.size(blobs.find(sha))
        c.freed_bytes += size
        c.deleted_shas.append(sha)
        log.info("gc: deleted unreferenced blob %s (%d bytes)", sha, size)

    await gather(deletable, delete, PARALLEL)
    for sha in deletable:
        first_seen.pop(sha, None)
    c.snapshot_copies_deleted, unnamed = await sweep_copies(store, copy_grace, False)
    first_seen.update(unnamed)
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
