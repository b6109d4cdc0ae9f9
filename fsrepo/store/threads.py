"""Blocking storage work in trio worker threads: stoppable when its caller is cancelled,
and a nursery's failure as the plain error callers expect."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real failure in a nursery's exception group (callers expect plain errors);
    the group itself if it holds only cancellations."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = first_error(exc)
            if inner is not exc:
                return inner
        elif not isinstance(exc, trio.Cancelled):
            return exc
    return group


async def run_stoppable(
    fn: Callable[[threading.Event], T], limiter: trio.CapacityLimiter | None = None
) -> T:
    """Run `fn(stop)` in a worker thread. If this task is cancelled, `stop` is set (fn checks
    it between chunks and returns early) and the thread is waited for: a cancelled download
    stops within a chunk instead of running to the end of the object, and no abandoned thread
    keeps writing into the caller's file afterwards."""
    stop = threading.Event()
    result: list[T] = []

    async def watch() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stop.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            result.append(await trio.to_thread.run_sync(fn, stop, limiter=limiter))
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        first = first_error(group)
        if first is group:
            raise
        raise first from None
    return result[0]
