"""How many descriptors the mount may hold open, and how many closed copies that allows.

A file closed and not named yet keeps its staging copy's descriptor open until the group
commit names it (commit.py): a `cp -r` at 2,000 files/s holds ~2,000 of them for an
interval. The usual soft limit (1,024) would turn that into EMFILE for the user's next
open(); the hard limit (often 524,288) is what the process may ask for without privileges,
so the mount raises its soft limit to it at start, and past a quarter of the soft limit
close() names a file at once (no descriptor kept), as it did before closed copies existed.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

log = logging.getLogger(__name__)

NR_OPEN = Path("/proc/sys/fs/nr_open")  # the kernel's ceiling for an unlimited hard limit
MAX_UNNAMED_COPIES = 4096  # closed copies kept unnamed at most, whatever the limit
LIMIT_SHARE = 4  # of the soft limit, the share closed copies may hold (the rest: FUSE,
# the database, the cache's readers, the storage's connections)


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else _kernel_ceiling()
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        log.debug("open files limit not raised from %d: %s", soft, exc)
        return soft
    log.debug("open files limit raised from %d to %d", soft, want)
    return want


def unnamed_copies_cap(soft: int | None = None) -> int:
    """How many closed copies may keep their descriptor open (`soft`: the soft limit,
    this process's if None)."""
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_UNNAMED_COPIES
    return max(0, min(MAX_UNNAMED_COPIES, soft // LIMIT_SHARE))


def _kernel_ceiling() -> int:
    try:
        return int(NR_OPEN.read_text())
    except (OSError, ValueError):
        return 1 << 20  # (the kernel's default nr_open)
