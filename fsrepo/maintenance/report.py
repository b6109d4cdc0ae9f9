"""The --verify and --gc commands: run a check or a collection against the configured
storage and print its report (or JSON); the exit status says whether anything is wrong."""

from __future__ import annotations

import json
import sys
import time

import trio

from ..config import Settings
from ..errors import ImgrepoError, StorageError
from ..lease import refuse_while_leased
from ..units import human
from .gc import Collection, collect
from .verify import Verification, verify
from .walk import open_checked


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
        store = await open_checked(settings)
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
              f"{v.symlinks} symlinks, {v.blobs} blobs ({human(v.blob_bytes)}), "
              f"{v.snapshots} snapshots in "
              f"{settings.storage}: " +
              ("no problems found" if not v.problems else f"{len(v.problems)} problems found"))
    return 1 if v.problems else 0


def run_gc(settings: Settings, dry_run: bool, grace_hours: float) -> int:
    """`imgrepo-mount --gc [--dry-run] [--grace HOURS]`."""
    if grace_hours < 0:
        raise ImgrepoError("--grace must be zero or more hours")
    if grace_hours < 1 / 6 and not dry_run:
        print(f"gc: note: a grace period of {grace_hours:g} h (under 10 minutes) is safe only "
              "while no mount is writing to this repository", file=sys.stderr)

    async def main() -> Collection:
        store = await open_checked(settings)
        try:
            await refuse_while_leased(store)  # single-writer mode: another machine writes
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
    if c.tombstones:
        lines.append(f"{verb} the removal marks of {c.tombstones} folders removed more "
                     f"than {grace_hours:g} h ago")
    if c.snapshot_copies_deleted:
        lines.append(f"{verb} {c.snapshot_copies_deleted} folder copies that only deleted "
                     "snapshots named")
    print("\n".join(("gc (dry run): " if dry_run else "gc: ") + line for line in lines))
    return 0
