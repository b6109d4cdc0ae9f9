"""Giving freed memory back to the operating system.

A walk's views and inodes, once dropped, leave free memory inside the C heap, which keeps
the pages: the mount's RSS would stay at its peak. On jemalloc (the mount's allocator where
installed: `allocator.py`) its background thread returns free pages after a second anyway;
the idle release asks for all of them at once (`arena.<all>.purge`). On glibc,
`malloc_trim(0)` returns the free pages (what other long-running Python daemons call after a
large release). Elsewhere (musl, macOS) there is nothing to call and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

ARENAS_ALL = 4096  # jemalloc's MALLCTL_ARENAS_ALL: "every arena" in an arena.<i> name


def _jemalloc_purge() -> Callable[[], bool] | None:
    """jemalloc's purge of every arena, when this process runs on jemalloc."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                        ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    name = f"arena.{ARENAS_ALL}.purge".encode()

    def purge() -> bool:
        code = mallctl(name, None, None, None, 0)
        if code:
            log.debug("jemalloc's purge failed (error %d)", code)
        return code == 0
    return purge


def _glibc_trim() -> Callable[[], bool] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: bool(trim(0))


class Heap:
    """The process's C heap."""

    def __init__(self) -> None:
        self._give_back = _jemalloc_purge() or _glibc_trim()

    def give_back(self) -> bool:
        """Return the heap's free pages to the OS; whether anything was (False where the C
        library cannot)."""
        if self._give_back is None:
            return False
        return self._give_back()
