"""Publishes this machine's change record (heads.py) after its manifest commits.

The directories to announce are recorded in the local state by the very transaction that
records a manifest commit (`LocalState.commit_dir`), so a crash between the manifest PUT and
the head PUT loses nothing: the next start finds them unpublished and writes the head. One
head write per uploader round that committed something, not one per manifest.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable

import trio

from .errors import ImgrepoError
from .heads import RING_SIZE, TOUCH_KEY, Head, head_key, serialise_head
from .retry import QUEUE
from .state import StateDB
from .store.base import Store

log = logging.getLogger(__name__)

ROUND_WAIT = 1.0  # at most this long for the commits in flight before the head goes


class HeadWriter:
    """Writes heads/<writer>.json (then heads-touched.json) when commits asked for it."""

    def __init__(self, store: Store, db: StateDB, *, host: str, keep: int = RING_SIZE) -> None:
        self.store = store
        self.db = db
        self.host = host
        self.keep = keep
        self.published = 0  # heads written by this run
        self._wanted = trio.Event()
        self._retry = trio.Event()
        self._writing = False

    @property
    def busy(self) -> bool:
        """Whether commits are still to be announced (someone waiting for the queue to
        drain waits for this too: other machines see changes through the head)."""
        return self._wanted.is_set() or self._writing

    def committed(self) -> None:
        """A manifest commit succeeded: its directory goes into the next head."""
        self._wanted.set()

    def retry_now(self) -> None:
        """The storage answers again: a failed head write goes at once."""
        self._retry.set()

    async def run(self, committing: Callable[[], bool]) -> None:
        """Write a head whenever commits asked for one, after the commits in flight
        (`committing()`) finished, so one head covers the whole round."""
        if await self.db.run(self.db.state.head_unpublished):
            log.info("announcing directories committed by the last run")
            self._wanted.set()
        failures = 0
        while True:
            await self._wanted.wait()
            with trio.move_on_after(ROUND_WAIT):
                while committing():
                    await trio.sleep(0.02)
            self._wanted = trio.Event()
            self._writing = True
            try:
                await self.publish()
                failures = 0
            except (ImgrepoError, OSError) as exc:
                failures += 1
                log.warning("writing this machine's change record failed (will retry): %s",
                            exc)
                self._wanted.set()
                self._retry = trio.Event()
                with trio.move_on_after(QUEUE.delay(failures)):
                    await self._retry.wait()
            finally:
                self._writing = False

    async def publish(self) -> None:
        """Number what was committed since the last head, and write the head."""
        state = self.db.state
        writer = await self.db.run(state.writer_id)
        seq, forgotten, ring = await self.db.run(state.number_head_changes, self.keep)
        head = Head(writer, self.host, seq, forgotten, tuple(ring))
        await self.store.put(head_key(writer), serialise_head(head))
        # New content every time, so every reader's conditional GET sees a change.
        touch = {"writer": writer, "seq": seq, "at": time.time(), "nonce": uuid.uuid4().hex}
        await self.store.put(TOUCH_KEY, json.dumps(touch).encode())
        await self.db.run(state.head_published, seq)
        self.published += 1
