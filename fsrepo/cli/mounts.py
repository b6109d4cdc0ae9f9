"""The imgrepo mounts on this machine, as the kernel lists them (/proc/self/mountinfo), and
whether each one's process still answers: what `--status` without a mountpoint shows and
how `--unmount` recognises a mount whose process died."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import control
from ..config import Settings
from ..errors import ImgrepoError

MOUNTINFO = Path("/proc/self/mountinfo")
FSTYPE = "fuse.imgrepo"  # and "fuse.imgrepo-mount" (the mount(8) form)
ASK_TIMEOUT = 5.0  # seconds a mount gets to answer before it counts as not answering


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def imgrepo_mounts(mountinfo: Path = MOUNTINFO) -> list[Path]:
    """Mountpoints of every imgrepo FUSE mount the kernel knows, dead ones included."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        fstype = (right.split() or [""])[0]
        if sep and len(fields) >= 5 and fstype.startswith(FSTYPE):
            found.append(Path(_unescape(fields[4])))
    return found


def is_imgrepo_mount(mountpoint: Path) -> bool:
    return mountpoint in imgrepo_mounts()


def mount_summary(mountpoint: Path) -> dict[str, Any]:
    """The mount's status reply, or {"mountpoint", "answering": False} for a dead mount."""
    try:
        for reply in control.request(mountpoint, {"cmd": "status"}, timeout=ASK_TIMEOUT):
            if reply.get("done"):
                reply.pop("done", None)
                return {**reply, "answering": not reply.get("error")}
    except (ImgrepoError, OSError, ValueError):
        pass
    return {"mountpoint": str(mountpoint), "answering": False}


def settings_of_mount(settings: Settings, mountpoint: Path) -> Settings:
    """The settings with the running mount's storage (and endpoint): `--verify MNT` checks
    the repository mounted there, whatever the defaults name."""
    status = mount_summary(mountpoint)
    if not status.get("answering"):
        if is_imgrepo_mount(mountpoint):
            raise ImgrepoError(f"the mount at {mountpoint} does not answer; clean it up with "
                               f"imgrepo-mount --unmount {mountpoint}, or give --storage")
        raise ImgrepoError(f"{mountpoint} is not a running imgrepo mount (give a mountpoint "
                           "of a running mount, or --storage)")
    return replace(settings, storage=status["storage"],
                   endpoint_url=status.get("endpoint_url") or settings.endpoint_url,
                   region=status.get("region") or settings.region)
