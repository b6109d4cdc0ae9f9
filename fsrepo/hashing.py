"""The SHA-256 of a file, read in chunks: how blobs are named and checked; and the thread
that hashes files while they are written (`HashThread`)."""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path
from typing import cast

import outcome
import trio

HASH_CHUNK = 1 << 20


def hash_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashThread:
    """Running SHA-256s fed from the trio thread and computed on a thread of their own:
    hashlib lets go of the GIL for large buffers, so another core hashes what the trio
    thread writes, and close() waits only for what is not hashed yet.

    Updates run strictly in the order they were queued (one thread), so each hash sees its
    bytes in file order. `backlog`: bytes queued and not hashed yet; a writer that is too
    far ahead waits (`drained`), which also bounds the memory the queue holds."""

    def __init__(self, name: str = "hash") -> None:
        self.name = name
        self._queued = 0  # bytes queued so far (trio thread)
        self._done = 0  # bytes hashed so far (hash thread)
        self._jobs: queue.SimpleQueue[_HashJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None  # of the run the thread serves
        self._waiter: tuple[int, trio.Event] | None = None  # (limit, event): a writer waits

    @property
    def backlog(self) -> int:
        return self._queued - self._done

    def update(self, hasher: hashlib._Hash, data: bytes) -> None:
        """Queue `hasher.update(data)` (not copied: the caller must not change the bytes)."""
        self._start()
        self._queued += len(data)
        self._jobs.put((hasher, data, None))

    async def hexdigest(self, hasher: hashlib._Hash) -> str:
        """The hash's value once every update queued before has run."""
        self._start()
        self._jobs.put((hasher, b"", trio.lowlevel.current_task()))
        result = await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED)
        return cast(str, result)

    async def drained(self, limit: int) -> None:
        """Until at most `limit` bytes are waiting to be hashed."""
        while self.backlog > limit:
            event = trio.Event()
            self._waiter = (limit, event)
            if self.backlog > limit:  # (the thread may have caught up meanwhile)
                await event.wait()
            self._waiter = None

    def _start(self) -> None:
        token = trio.lowlevel.current_trio_token()
        if token is self._token:
            return
        # A new trio run (tests run several with one engine): the thread of the last one
        # finishes what it was given first, so no hash sees its bytes out of order.
        self.close()
        self._jobs, self._token, self._queued, self._done = queue.SimpleQueue(), token, 0, 0
        self._thread = threading.Thread(target=self._serve, args=(self._jobs, token),
                                        daemon=True, name=self.name)
        self._thread.start()

    def _serve(self, jobs: queue.SimpleQueue[_HashJob | None],
               token: trio.lowlevel.TrioToken) -> None:
        while (job := jobs.get()) is not None:
            hasher, data, task = job
            try:
                if task is not None:
                    token.run_sync_soon(trio.lowlevel.reschedule, task,
                                        outcome.capture(hasher.hexdigest))
                    continue
                hasher.update(data)
                self._done += len(data)  # (only this thread writes it)
                waiter = self._waiter
                if waiter is not None and self.backlog <= waiter[0]:
                    token.run_sync_soon(waiter[1].set)
            except trio.RunFinishedError:
                pass  # nobody waits any more; the updates after it still run

    def close(self) -> None:
        """Stop the thread once what is queued has run."""
        thread, self._thread, self._token = self._thread, None, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()


_HashJob = tuple["hashlib._Hash", bytes, "trio.lowlevel.Task | None"]
