"""fsrepo.workers: results and errors come back to the caller, one thread keeps the order
of its calls, several threads run calls at the same time, and close() stops them."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from fsrepo.workers import Workers


def test_results_errors_and_order() -> None:
    workers = Workers("test")
    seen: list[int] = []

    def record(i: int) -> int:
        seen.append(i)
        return i * 10

    def fail() -> None:
        raise OSError(28, "No space left on device")

    async def main() -> None:
        assert await workers.run(record, 1) == 10
        with pytest.raises(OSError) as exc:
            await workers.run(fail)
        assert exc.value.errno == 28
        async with trio.open_nursery() as nursery:  # queued together, run in queue order
            for i in range(2, 30):
                nursery.start_soon(workers.run, record, i)
                await trio.sleep(0)

    trio.run(main)
    assert seen == list(range(1, 30))
    names = {t.name for t in threading.enumerate()}
    assert "test-0" in names
    workers.close()
    assert "test-0" not in {t.name for t in threading.enumerate()}


def test_calls_are_not_abandoned_when_the_caller_is_cancelled() -> None:
    workers = Workers("test-cancel")
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.3)
        finished.set()

    async def main() -> None:
        with trio.move_on_after(0.05) as scope:
            await workers.run(slow)
        # the cancellation waited for the call: what was started has ended
        assert finished.is_set() and not scope.cancelled_caught

    trio.run(main)
    workers.close()


def test_several_threads_run_calls_at_once() -> None:
    workers = Workers("test-pool", size=3)
    inside = 0
    most = 0
    lock = threading.Lock()

    def busy() -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.1)
        with lock:
            inside -= 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(workers.run, busy)

    trio.run(main)
    workers.close()
    assert most == 3
