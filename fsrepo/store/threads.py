"""Blocking storage work in trio worker threads: stoppable when its caller is cancelled,
and a nursery's failure as the plain error callers expect."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
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
    it between chunks and returns early), the thread is waited for, and the task gets
    Cancelled: a cancelled download stops within a chunk instead of running to the end of
    the object, and no abandoned thread keeps writing into the caller's file afterwards.

    One thread from trio's cache and one wake-up of this task when it ends, with no nursery,
    watcher task or thread naming around it: a small blob's download is mostly such
    overhead (docs/perf-log.md)."""
    if limiter is None:
        return await _in_thread(fn)
    async with limiter:
        return await _in_thread(fn)


async def _in_thread(fn: Callable[[threading.Event], T]) -> T:
    stop = threading.Event()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[T]) -> None:
        try:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)
        except trio.RunFinishedError:
            pass  # the loop that asked is gone

    def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
        stop.set()  # fn returns within a chunk; the task is rescheduled then
        return trio.lowlevel.Abort.FAILED

    await trio.lowlevel.checkpoint_if_cancelled()
    trio.lowlevel.start_thread_soon(lambda: fn(stop), deliver)
    result: T = await trio.lowlevel.wait_task_rescheduled(abort)
    if stop.is_set():
        await trio.lowlevel.checkpoint()  # cancelled: what fn returned was cut short
    return result
