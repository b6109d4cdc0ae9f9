"""`imgrepo-mount --status [MOUNTPOINT] [--pending] [--wait] [--json]`: what a running mount
is doing (and which files it has not uploaded yet), or with no mountpoint every imgrepo mount
on this machine; and who is logged in. Needs neither trio nor an HTTP client: it only talks
to the control sockets and reads the token store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import control
from ..auth.status import run_status
from ..config import Settings
from ..errors import ImgrepoError
from .mounts import imgrepo_mounts, is_imgrepo_mount, mount_summary
from .progress import follow
from .statusview import format_mounts, format_status


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    out: dict[str, Any] = {}
    if args.mountpoint:
        mountpoint = Path(args.mountpoint).expanduser().absolute()
        if not control.is_running(mountpoint) and is_imgrepo_mount(mountpoint):
            raise ImgrepoError(f"the mount at {mountpoint} does not answer (its process is "
                               f"gone): clean it up with imgrepo-mount --unmount {mountpoint}; "
                               "what it had not uploaded goes at the next mount")
        if args.wait:
            follow(mountpoint, {"cmd": "wait"}, "uploading")
        ask = {"cmd": "status", "repository": True, "pending": bool(args.pending)}
        for reply in control.request(mountpoint, ask):
            out = reply
        out.pop("done", None)
        if out.get("error"):
            raise ImgrepoError(out["error"])
    elif args.pending or args.wait:
        raise ImgrepoError("--pending and --wait need a mountpoint: imgrepo-mount --status "
                           "--pending MOUNTPOINT")
    else:
        out["mounts"] = [mount_summary(mp) for mp in imgrepo_mounts()]
    out["login"] = run_status(settings)
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    if "mounts" in out:
        print(format_mounts(out["mounts"]))
    text = format_status(out)
    if text:
        print(text)
    return 0
