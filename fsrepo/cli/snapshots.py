"""`imgrepo-mount --snapshot MOUNTPOINT [NAME]` and `--snapshots MOUNTPOINT`: asked of the
running mount (its store, its credentials), as --status is."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .. import control
from ..errors import ImgrepoError
from ..snapshots import check_snapshot_name
from ..units import human
from .progress import follow

GIVE_UP_OFFLINE = 10.0  # seconds of unreachable storage before giving up


def cmd_snapshot(mountpoint: Path, names: list[str]) -> int:
    if len(names) > 1:
        raise ImgrepoError(f"one snapshot name at most (got {' '.join(names)})")
    cmd: dict[str, Any] = {"cmd": "snapshot"}
    if names:
        cmd["name"] = check_snapshot_name(names[0])
    final = follow(mountpoint, cmd, "uploading first", give_up_offline=GIVE_UP_OFFLINE)
    if final.get("gave_up"):
        raise ImgrepoError("the storage is unreachable: no snapshot taken (it records what "
                           "the bucket holds; try again when it answers)")
    print(f"snapshot {final['name']} taken ({final['dirs']} folders); "
          f"read it under {mountpoint}/.snapshots/{final['name']}")
    return 0


def cmd_snapshots(mountpoint: Path, as_json: bool = False) -> int:
    final: dict[str, Any] = {}
    for reply in control.request(mountpoint, {"cmd": "snapshots"}, timeout=None):
        if reply.get("done"):
            final = reply
    if final.get("error"):
        raise ImgrepoError(final["error"])
    rows = final.get("snapshots", [])
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no snapshots yet (take one with imgrepo-mount --snapshot {mountpoint})")
        return 0
    print(f"{'NAME':<28} {'TAKEN (UTC)':<20} {'MACHINE':<16} {'DIFFERS FROM NOW':>20}")
    for row in rows:
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["created"]))
        differs = "?" if row["files"] is None else \
            f"{row['files']} files, {human(row['bytes'])}"
        print(f"{row['name']:<28} {taken:<20} {row['machine'][:16]:<16} {differs:>20}")
    return 0
