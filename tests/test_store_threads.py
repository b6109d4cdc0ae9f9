"""fsrepo.store.threads.run_stoppable, the thread every download runs in: its result or
its own error comes back, a cancelled caller stops it within a step and waits for it (no
thread keeps writing into the caller's file afterwards), and a limiter bounds how many run."""

from __future__ import annotations

import threading

import pytest
import trio

from fsrepo.store.threads import run_stoppable


def test_result_and_error_come_back_as_they_are() -> None:
    def fail(stop: threading.Event) -> None:
        raise ValueError("the body broke off")

    async def main() -> None:
        assert await run_stoppable(lambda stop: 42) == 42
        with pytest.raises(ValueError, match="broke off"):  # itself, not in a group
            await run_stoppable(fail)

    trio.run(main)


def test_a_cancelled_call_is_stopped_and_waited_for() -> None:
    started = threading.Event()
    steps: list[int] = []
    ended: list[bool] = []

    def stream(stop: threading.Event) -> str:
        started.set()
        while not stop.is_set():  # a download checks between chunks
            steps.append(1)
            stop.wait(0.001)
        ended.append(True)
        return "cut short"

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                async def cancel_once_started() -> None:
                    while not started.is_set():
                        await trio.sleep(0.001)
                    scope.cancel()

                nursery.start_soon(cancel_once_started)
                await run_stoppable(stream)
                raise AssertionError("a cancelled call must not return what fn returned")
        assert scope.cancelled_caught
        assert ended == [True]  # the thread had ended before the caller went on
        count = len(steps)
        await trio.sleep(0.02)
        assert len(steps) == count

    trio.run(main)


def test_a_limiter_bounds_the_calls_running_at_once() -> None:
    limiter = trio.CapacityLimiter(2)
    running: list[int] = []
    most: list[int] = [0]
    lock = threading.Lock()
    gate = threading.Event()

    def call(stop: threading.Event) -> None:
        with lock:
            running.append(1)
            most[0] = max(most[0], len(running))
        gate.wait(5)
        with lock:
            running.pop()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(run_stoppable, call, limiter)
            while limiter.borrowed_tokens < 2:
                await trio.sleep(0.001)
            await trio.sleep(0.02)
            assert limiter.borrowed_tokens == 2 and most[0] <= 2
            gate.set()
        assert limiter.borrowed_tokens == 0 and most[0] == 2

    trio.run(main)
