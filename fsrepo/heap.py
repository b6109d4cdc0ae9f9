"""Giving freed memory back to the operating system.

CPython frees small objects into glibc's heap, which keeps the pages: after a walk's
views and inodes are dropped, the mount's RSS would stay at its peak. glibc's
`malloc_trim(0)` returns the free pages (what other long-running Python daemons call after
a large release). Elsewhere (musl, macOS) there is nothing to call and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _find_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class Heap:
    """The process's C heap."""

    def __init__(self) -> None:
        self._trim = _find_trim()

    def give_back(self) -> bool:
        """Return the heap's free pages to the OS; whether anything was (False where the C
        library cannot)."""
        if self._trim is None:
            return False
        return bool(self._trim(0))
