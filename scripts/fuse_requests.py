"""Counts the FUSE requests a pyfuse3 filesystem answers, and the time its handlers take,
without touching the filesystem's code: for finding what a workload costs per operation.

    python -m scripts.fuse_requests OUT.json MODULE [ARGS...]

runs MODULE as `python -m MODULE ARGS...` would (e.g. `fsrepo.cli MNT --storage ...
--foreground`, or `scripts.fusepass BACKING MNT`), with every handler of the Operations
given to `pyfuse3.init` wrapped: each call is counted, with the wall time from the handler's
start to its return (the trio loop's time for the request, not the kernel's). SIGUSR1 writes
the counts so far to OUT.json and starts again from zero, so a driver can take the counts of
one phase: signal, run the phase, signal, read.
"""

from __future__ import annotations

import functools
import inspect
import json
import runpy
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3

HANDLERS = ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink",
            "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush", "release",
            "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "getxattr",
            "setxattr", "listxattr", "removexattr", "access", "create")


class RequestCounts:
    """Calls and handler seconds per request type, since the last `dump`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, name: str, took: float) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.seconds[name] = self.seconds.get(name, 0.0) + took

    def dump(self, *_: Any) -> None:
        data = {name: {"calls": n, "seconds": round(self.seconds[name], 6)}
                for name, n in sorted(self.calls.items())}
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.out)
        self.calls, self.seconds = {}, {}

    def wrap(self, name: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(handler):
            @functools.wraps(handler)
            async def counted_async(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await handler(*args, **kwargs)
                finally:
                    self.add(name, time.perf_counter() - t0)
            return counted_async

        @functools.wraps(handler)
        def counted(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return handler(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)
        return counted


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m scripts.fuse_requests OUT.json MODULE [ARGS...]")
    counts = RequestCounts(Path(argv[0]))
    real_init = pyfuse3.init

    def counting_init(ops: pyfuse3.Operations, *args: Any, **kwargs: Any) -> Any:
        for name in HANDLERS:
            setattr(ops, name, counts.wrap(name, getattr(ops, name)))
        return real_init(ops, *args, **kwargs)

    pyfuse3.init = counting_init
    signal.signal(signal.SIGUSR1, counts.dump)
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
