"""`imgrepo-mount --sync [PATHS]`: ask the running mount to prefetch files into its cache,
show the progress, and sum up what was fetched."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .. import control
from ..errors import ImgrepoError
from ..units import human
from .mounts import relative_in
from .progress import follow


def cmd_sync(mountpoint: Path, paths: list[str]) -> int:
    if not control.is_running(mountpoint):
        raise ImgrepoError(f"{mountpoint} is not a running imgrepo mount; mount it first")
    rel = [relative_in(mountpoint, p) for p in paths]
    print(f"syncing {mountpoint}{' (' + ', '.join(rel) + ')' if rel else ''}",
          file=sys.stderr)
    start_seen: dict[str, Any] = {}

    def on_reply(reply: dict[str, Any]) -> None:
        if reply.get("phase") == "start":
            start_seen.update(reply)
            if not reply.get("fits"):
                print(f"warning: the files need {human(reply['bytes'])} but the cache has "
                      f"room for {human(reply['cache_room'])}; sync will stop at the limit",
                      file=sys.stderr)

    try:
        final = follow(mountpoint, {"cmd": "sync", "paths": rel}, "sync", on_reply=on_reply)
    except KeyboardInterrupt:
        # Closing the connection stops the sync in the mount; what it fetched stays cached.
        print("sync interrupted; what was fetched stays in the cache: run the same command "
              "again to continue", file=sys.stderr)
        return 130
    if start_seen and not start_seen.get("fits"):
        print(f"note: {human(start_seen['bytes'])} to fetch but only "
              f"{human(start_seen['cache_room'])} free in the cache limit; stopping at the "
              "limit (raise it with --cache-size)", file=sys.stderr)
    print(summary(final))
    return 1 if final.get("failed") or final.get("stopped_at_limit") or final.get("offline") \
        else 0


def summary(final: dict[str, Any]) -> str:
    """The sync's last line: what was fetched, and why it stopped short if it did."""
    msg = (f"fetched {final['done_files']} files ({human(final['done_bytes'])}) in "
           f"{final['elapsed']:.1f}s")
    if not final.get("remaining") and "files" in final:
        msg += f"; all {final['files']} files are in the local cache"
    if final.get("failed"):
        msg += f"; {final['failed']} failed (see the log)"
    if final.get("stopped_at_limit"):
        msg += "; stopped at the cache limit"
    if final.get("offline"):
        msg += (f"; stopped because the storage is unreachable ({final.get('remaining', 0)} "
                "files left): run it again when it is back")
    return msg
