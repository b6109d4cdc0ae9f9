"""An engine in a thread of its own, with its own trio loop, for synchronous callers.

Hypothesis' stateful tests call their rules synchronously, one after another, while the
engine must keep running between them (its uploader, its write-behind): so the engine runs
in a background thread, and each rule submits one coroutine to it and waits for its result.

    with EngineThread(url, endpoint_url, cache) as eng:
        eng.call(eng.driver.mkdir, b"photos")      # raises what the coroutine raised
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from .coreutil import EngineDriver, running_engine

T = TypeVar("T")
CALL_TIMEOUT = 120.0  # seconds: a call that takes longer has hung; fail it


class EngineThread:
    """`running_engine(...)` kept open in a thread until `close()`."""

    def __init__(self, storage_url: str, endpoint_url: str | None, cache: Path,
                 **kw: Any) -> None:
        self._args = (storage_url, endpoint_url, cache)
        self._kw = kw
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.driver: EngineDriver | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine {cache.name}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(CALL_TIMEOUT):
            raise TimeoutError("the engine did not open in time")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        async with running_engine(*self._args, **self._kw) as engine:
            self.driver = EngineDriver(engine)
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` on the engine's loop; its result, or its exception."""
        if self._error is not None:
            raise RuntimeError("the engine stopped") from self._error

        async def guarded() -> T:
            with trio.fail_after(CALL_TIMEOUT):
                return await fn(*args)

        return trio.from_thread.run(guarded, trio_token=self._token)

    def close(self) -> None:
        """Stop the engine as a clean unmount would not: nothing is drained first."""
        if self._token is not None and self._thread.is_alive():
            assert self._stop is not None
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(CALL_TIMEOUT)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> EngineThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
