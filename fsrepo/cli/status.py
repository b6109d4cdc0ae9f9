"""`imgrepo-mount --status [MOUNTPOINT] [--wait] [--json]`: what a running mount is doing
and who is logged in. Needs neither trio nor an HTTP client: it only talks to the control
socket and reads the token store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import control
from ..auth.status import run_status
from ..config import Settings
from ..errors import ImgrepoError
from .progress import follow
from .statusview import format_status


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    out: dict[str, Any] = {}
    if args.mountpoint:
        mountpoint = Path(args.mountpoint).expanduser().absolute()
        if args.wait:
            follow(mountpoint, {"cmd": "wait"}, "uploading")
        for reply in control.request(mountpoint, {"cmd": "status", "repository": True}):
            out = reply
        out.pop("done", None)
        if out.get("error"):
            raise ImgrepoError(out["error"])
    out["login"] = run_status(settings)
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    print(format_status(out))
    return 0
