"""Threads of our own for the blocking calls every close() waits for.

trio.to_thread hands each call to a pooled thread through a limiter and reports back with
a blocking round trip into the loop; a queue to threads that are always there costs much
less per call (figures: docs/perf-log.md). The journal (`StateDB`) uses it, since
every close() waits for its transaction, and so does the read-back hashing of a download
its store did not report as it landed (blobcache.py; the S3 and local stores report every
chunk, so their blobs are sealed on the loop with no hop at all). The staging file's fsync
showed no gain on this path, so it stays on trio.to_thread. Calls cannot be cancelled once queued (to_thread's
default too): a started transaction runs to its end and the caller learns how it went.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import outcome
import trio

T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], trio.lowlevel.TrioToken, trio.lowlevel.Task]


class Workers:
    """`size` threads, started on first use, that run calls in the order they are queued."""

    def __init__(self, name: str, size: int = 1) -> None:
        self.name = name
        self.size = size
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if len(self._threads) < self.size:
            self._start()
        task = trio.lowlevel.current_task()
        self._jobs.put((fn, args, trio.lowlevel.current_trio_token(), task))
        result = await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED)
        return cast(T, result)

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self.size:
                thread = threading.Thread(target=self._serve, daemon=True,
                                          name=f"{self.name}-{len(self._threads)}")
                thread.start()
                self._threads.append(thread)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, token, task = job
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass  # the loop that asked is gone; nobody waits for this any more

    def close(self) -> None:
        """Stop the threads once the calls queued so far have run."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()
