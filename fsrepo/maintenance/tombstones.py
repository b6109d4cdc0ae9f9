"""Deleting the removal marks of folders removed long ago: part of `imgrepo-mount --gc`.

A removed folder's manifest is left in the bucket holding only its removal mark (a
tombstone, docs/cross-machine.md): a machine that adds files to the folder later finds
the mark, writes over it and puts the folder back. The remover never deletes it itself:
S3 has no conditional delete, so an addition landing between its last look and the
delete would be lost. `--gc` deletes tombstones older than its grace period instead: by
then any machine that still had the folder in view has long written to it or seen it
go, and one coming back after longer still finds the manifest gone, which it also takes
for a removal (it puts the folder back with its additions).

Only small objects are read (a mark is a few hundred bytes), and each is read just before
it is deleted: one that gained entries meanwhile is no mark any more and stays.
"""

from __future__ import annotations

import logging

from ..errors import ObjectNotFound
from ..manifest import is_removal_mark
from ..repository import manifest_key
from ..store.base import Store, StoredObject
from .walk import PARALLEL, gather

log = logging.getLogger(__name__)

MARK_SIZE = 4096  # bytes: a removal mark (with its move records) is smaller than this


async def collect_tombstones(store: Store, grace_seconds: float, now: float,
                             dry_run: bool) -> int:
    """Delete (or, with `dry_run`, count) the removal marks written more than
    `grace_seconds` before `now`; returns how many."""
    old: list[str] = []
    async for info in store.list("dirs/"):
        if info.key.endswith(".json") and info.size <= MARK_SIZE \
                and info.mtime + grace_seconds <= now:
            old.append(info.key[len("dirs/"):-len(".json")])
    deleted: list[str] = []

    async def one(dir_id: str) -> None:
        try:
            obj = await store.get(manifest_key(dir_id))
        except ObjectNotFound:
            return
        if not isinstance(obj, StoredObject) or not is_removal_mark(obj.data, dir_id):
            return
        if not dry_run:
            await store.delete(manifest_key(dir_id))
            log.info("gc: deleted the removal mark of directory %s", dir_id)
        deleted.append(dir_id)

    await gather(old, one, PARALLEL)
    return len(deleted)
