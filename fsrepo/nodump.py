"""No core dumps of a process that holds credentials.

A crashing mount (or a login, a --verify) would otherwise leave its memory - AWS keys,
session tokens, refresh tokens - in a core file, or hand it to a system crash collector.
RLIMIT_CORE 0 stops core files; PR_SET_DUMPABLE 0 also stops piped collectors and keeps
other processes of the same user from reading this one's memory (ptrace, /proc/PID/mem).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def disable_core_dumps() -> None:
    """Turn core dumps off for this process (and, through the limit, its children)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        log.debug("cannot set RLIMIT_CORE to 0: %s", exc)
    libc = _libc()
    if libc is not None and libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_DUMPABLE, 0) failed (errno %d)", ctypes.get_errno())


def dumpable() -> bool:
    """Whether this process may still dump core (what disable_core_dumps turns off)."""
    libc = _libc()
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)) if libc is not None else True


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6", use_errno=True)
    except OSError:
        return None
