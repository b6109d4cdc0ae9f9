"""Whether a process on this machine is still running: one rule for the unmount's wait and
the writer lease's same-host check."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (also when it belongs to another user); a zombie counts as
    gone, since it will never do anything again."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False
