"""Which C allocator the mount process runs on.

CPython's small-object allocator (pymalloc) takes memory in 1 MiB arenas and gives one back
only when every object in it is gone. A walk over a million files spreads its views and
inodes over a hundred and more arenas, and the few objects made meanwhile that outlive it (a
task's state, a poll's result, a lock) stay scattered across them: after the idle release
dropped the walk's views and inodes, a mount that started at 63 MiB still held 185-207
(jemalloc: 109-113 from 68-70). No order of freeing fixes that from Python. jemalloc keeps
small objects in slabs of a few pages and returns free pages itself (its background thread,
after `dirty_decay_ms`), so what outlives a walk pins pages, not megabytes. It is the allocator Redis and Firefox ship, and
a package on every distribution (Debian and Ubuntu: libjemalloc2).

So the mount process is started with CPython's allocator set to the C one
(`PYTHONMALLOC=malloc`) and jemalloc preloaded, when the system has it. Without it the
mount runs as any Python program does, with pymalloc and glibc's `malloc_trim`
(`heap.Heap`). `IMGREPO_ALLOCATOR=pymalloc` keeps pymalloc even where jemalloc is
installed. Only the mount process is affected: the commands that ask it something are
short-lived.
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Mapping

CHOICE_VAR = "IMGREPO_ALLOCATOR"  # "pymalloc": never preload jemalloc
# What this module added to LD_PRELOAD, so that the mount can take it out of the
# environment its own children inherit (they did not ask for it).
ADDED_VAR = "IMGREPO_PRELOADED"
# One arena is plenty for a process whose Python runs under one lock (jemalloc's default,
# four per core, holds more pages); dirty pages go back after a second, at once
# rather than lazily (MADV_FREE'd pages would still count in RSS until the kernel wants
# them), by a background thread so an idle mount needs no call to do it.
MALLOC_CONF = "background_thread:true,narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0"


def jemalloc_library() -> str | None:
    """The jemalloc shared library's name as the dynamic loader finds it, if installed."""
    return ctypes.util.find_library("jemalloc")


def mount_environment(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to start the mount process with so that it runs on jemalloc, or
    None when it should run as it is: jemalloc is not installed (`library` None), the user
    chose pymalloc, or this environment already preloads it. A user's own LD_PRELOAD and
    MALLOC_CONF are kept."""
    if library is None or environ.get(CHOICE_VAR, "").lower() == "pymalloc":
        return None
    preload = environ.get("LD_PRELOAD", "")
    if environ.get("PYTHONMALLOC") == "malloc" and any(
            os.path.basename(lib).startswith("libjemalloc") for lib in _split(preload)):
        return None
    env = dict(environ)
    added = [name for name in ("PYTHONMALLOC", "MALLOC_CONF") if name not in environ]
    env["LD_PRELOAD"] = f"{library} {preload}".strip()
    env["PYTHONMALLOC"] = "malloc"
    env.setdefault("MALLOC_CONF", MALLOC_CONF)
    env[ADDED_VAR] = " ".join([library, *added])
    return env


def forget_preload(environ: dict[str, str]) -> None:
    """In the mount process, once started: take out of the environment what
    `mount_environment` added, so that programs the mount runs do not inherit it."""
    added = _split(environ.pop(ADDED_VAR, ""))
    if not added:
        return
    library, names = added[0], added[1:]
    rest = [lib for lib in _split(environ.get("LD_PRELOAD", "")) if lib != library]
    if rest:
        environ["LD_PRELOAD"] = " ".join(rest)
    else:
        environ.pop("LD_PRELOAD", None)
    for name in names:
        environ.pop(name, None)


def _split(preload: str) -> list[str]:
    """LD_PRELOAD's libraries (separated by spaces or colons)."""
    return preload.replace(":", " ").split()
