"""`imgrepo-mount --unmount`: wait until every closed file is in the bucket (or give up
while the storage is unreachable), unmount, and wait for the mount process to exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import control
from ..errors import ImgrepoError
from ..processes import pid_alive
from ..units import human, plural
from .mounts import is_imgrepo_mount
from .progress import follow

GIVE_UP_OFFLINE = 10.0  # seconds of unreachable storage before unmounting with a queue
EXIT_WAIT = 60.0  # seconds to wait for the mount process after the kernel unmount


def cmd_unmount(mountpoint: Path) -> int:
    pid = None
    if control.is_running(mountpoint):
        final = follow(mountpoint, {"cmd": "wait"}, "uploading", give_up_offline=GIVE_UP_OFFLINE)
        pid = final.get("pid")
        if final.get("gave_up"):
            p = final["progress"]
            print(f"the storage is unreachable: {plural(p['blobs'], 'file')} "
                  f"({human(p['bytes'])}) and {plural(p['ops'], 'change')} stay queued "
                  "locally and upload at the next mount",
                  file=sys.stderr)
            pid = mount_pid(mountpoint)
    elif not os.path.ismount(mountpoint) and not is_imgrepo_mount(mountpoint):
        # (a mount whose process died fails ismount's stat: the kernel table still has it)
        raise ImgrepoError(f"{mountpoint} is not mounted")
    unmount_kernel(mountpoint)
    if pid:
        deadline = time.time() + EXIT_WAIT
        while time.time() < deadline and pid_alive(pid):
            time.sleep(0.05)
    print(f"unmounted {mountpoint}")
    return 0


def unmount_kernel(mountpoint: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and (os.path.ismount(mountpoint)
                                   or is_imgrepo_mount(mountpoint)):
        msg = (result.stderr or result.stdout).strip().splitlines()
        raise ImgrepoError(f"cannot unmount {mountpoint}: {msg[-1] if msg else 'busy'}")


def mount_pid(mountpoint: Path) -> int | None:
    """The running mount's process id (None if it does not answer)."""
    try:
        for reply in control.request(mountpoint, {"cmd": "ping"}, timeout=10):
            if reply.get("done"):
                return reply.get("pid")
    except (ImgrepoError, OSError, ValueError):
        pass
    return None

