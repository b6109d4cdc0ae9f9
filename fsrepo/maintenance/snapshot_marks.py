"""What snapshots keep alive, for --gc: the manifest copies snapshots name, the blobs those
copies name, and the copies no snapshot names any more (deleted or expired snapshots).

As for manifests, marking is blunt: every 64-hex string in a snapshot object names a copy
and every one in a copy names a blob, so a damaged or newer-format one loses nothing. A
copy that no snapshot names is kept (and its blobs with it) until it was both written and
first found unnamed (by any gc run: the time lives in gc/state.json, as the blobs' do)
longer ago than the grace period. That covers a machine recording a snapshot meanwhile: it
writes new copies before the snapshot object that names them (their time is new), and the
copies it reuses from the previous snapshot are named by that one, or were found unnamed
only now if that snapshot was deleted meanwhile.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from ..errors import ObjectNotFound
from ..snapshots import COPY_PREFIX, SNAPSHOT_PREFIX, copy_key
from ..store.base import Store, StoredObject
from .blobtable import BlobTable
from .walk import PARALLEL, gather

log = logging.getLogger(__name__)

COPY_MARK = "copy:"  # the prefix of a copy's first-seen time in gc/state.json
_HEX64 = re.compile(rb"[0-9a-f]{64}")
_COPY_KEY = re.compile(r"^snapshot-dirs/([0-9a-f]{2})/([0-9a-f]{64})\.json$")


@dataclass
class SnapshotMarks:
    """The copies in the bucket (sha -> time written), those snapshots name, those read."""

    copies: dict[str, float] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)


class CopyGrace:
    """Whether an unnamed copy is still within its grace period (see the docstring)."""

    def __init__(self, gc_state: dict[str, float], now: float, grace: float) -> None:
        self.gc_state, self.now, self.grace = gc_state, now, grace

    def first_seen(self, sha: str) -> float:
        return min(self.gc_state.get(COPY_MARK + sha, self.now), self.now)

    def keeps(self, sha: str, written: float) -> bool:
        return max(written, self.first_seen(sha)) + self.grace > self.now


async def list_copies(store: Store) -> dict[str, float]:
    out: dict[str, float] = {}
    async for info in store.list(COPY_PREFIX):
        m = _COPY_KEY.match(info.key)
        if m is not None and m.group(1) == m.group(2)[:2]:
            out[m.group(2)] = info.mtime
    return out


async def named_copies(store: Store) -> set[str]:
    """Every copy a snapshot object names (one listing and one GET per snapshot)."""
    keys = [info.key async for info in store.list(SNAPSHOT_PREFIX)]
    named: set[str] = set()

    async def one(key: str) -> None:
        try:
            got = await store.get(key)
        except ObjectNotFound:
            return  # deleted meanwhile
        assert isinstance(got, StoredObject)
        named.update(m.decode() for m in _HEX64.findall(got.data))

    await gather(keys, one, PARALLEL)
    return named


async def mark_from_copies(store: Store, shas: set[str], blobs: BlobTable,
                           marks: bytearray) -> None:
    """Set the mark of every listed blob the given copies name."""
    async def one(sha: str) -> None:
        try:
            got = await store.get(copy_key(sha))
        except ObjectNotFound:
            return
        assert isinstance(got, StoredObject)
        for found in _HEX64.findall(got.data):
            index = blobs.find(found.decode())
            if index >= 0:
                marks[index] = 1

    await gather(sorted(shas), one, PARALLEL)


async def mark_snapshots(store: Store, blobs: BlobTable, marks: bytearray, grace: CopyGrace,
                         state: SnapshotMarks | None = None) -> SnapshotMarks:
    """Mark the blobs that snapshots keep (and the young copies no snapshot names yet).
    Called again with its `state` just before deleting: only copies not read yet are read,
    so a snapshot taken meanwhile keeps what it names."""
    if state is None:
        state = SnapshotMarks(copies=await list_copies(store))
    state.named |= await named_copies(store)
    kept = state.named | {s for s, t in state.copies.items() if grace.keeps(s, t)}
    await mark_from_copies(store, kept - state.read, blobs, marks)
    state.read |= kept
    return state


async def sweep_copies(store: Store, grace: CopyGrace, dry_run: bool
                       ) -> tuple[int, dict[str, float]]:
    """Delete the copies no snapshot names whose grace period is over (listed and matched
    against the snapshots again here: one named or rewritten meanwhile stays). Returns how
    many (would) go and the first-seen times of the unnamed ones kept, for gc/state.json."""
    named = await named_copies(store)
    kept: dict[str, float] = {}
    deleted = 0
    for sha, written in sorted((await list_copies(store)).items()):
        if sha in named:
            continue
        if grace.keeps(sha, written):
            kept[COPY_MARK + sha] = grace.first_seen(sha)
            continue
        if not dry_run:
            await store.delete(copy_key(sha))
            log.info("gc: deleted manifest copy %s (no snapshot names it)", sha)
        deleted += 1
    return deleted, kept
