"""Uploads wait for a burst of writes (uploader.BURST_HOLD): while files are being written
nothing is sent for the burst's first seconds, someone waiting (`--status --wait`) is not
held back, and once the writes pause everything goes without anyone asking."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from fsrepo.store.counting import CountingStore

from .coreutil import EngineDriver, running_engine
from .targets import StorageTarget


def test_a_burst_of_writes_holds_uploads_back_until_it_pauses(
        storage: StorageTarget, tmp_path: Path) -> None:
    counting: list[CountingStore] = []

    def wrap(inner):  # noqa: ANN001, ANN202 - the engine's store
        counting.append(CountingStore(inner))
        return counting[0]

    async def main() -> None:
        async with running_engine(storage.url, storage.endpoint_url, tmp_path / "cache",
                                  wrap_store=wrap) as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("photos")
            await eng.uploader.wait_idle()
            before = counting[0].snapshot()
            for i in range(20):
                await fs.create(f"photos/img{i:02d}.jpg", os.urandom(70_000))
            eng.files.last_activity = time.monotonic() + 3600  # the writes go on
            # More than the uploader's batching and quiet time (0.2 + 0.5 s): without the
            # hold these would be on their way (a slow machine can only make it pass).
            await trio.sleep(1.5)
            held = counting[0].since(before)
            assert held.uploads == 0 and held.manifest_writes == 0, held
            # Someone waits: nothing holds them back, though the writes go on.
            with trio.fail_after(120):
                await eng.uploader.wait_idle()
            sent = counting[0].since(before)
            assert sent.uploads == 20 and sent.manifest_writes >= 1, sent
            # The writes pause: what they wrote goes up by itself.
            after_wait = counting[0].snapshot()
            await fs.create("photos/last.jpg", os.urandom(70_000))
            eng.files.last_activity = 0.0
            with trio.fail_after(120):
                while counting[0].since(after_wait).manifest_writes == 0:
                    await trio.sleep(0.05)
            assert counting[0].since(after_wait).uploads == 1

    trio.run(main)
