"""A summary of the uploads in the log at a steady pace (files, bytes, dedup, queue), so
that a session's log says what it carried, not only "mounted" and "unmounted"."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from .units import human
from .uploader import UploadStatus

log = logging.getLogger(__name__)

EVERY = 60.0  # seconds between summaries (only when something changed)


def summary_line(status: UploadStatus, pending: dict[str, int]) -> str:
    return (f"uploads: {status.uploaded_blobs} files ({human(status.uploaded_bytes)}) sent, "
            f"{status.skipped_blobs} already in the bucket (dedup), {status.commits} folder "
            f"updates; queued: {pending['blobs']} files ({human(pending['bytes'])}), "
            f"{pending['ops']} changes")


async def log_uploads(status: UploadStatus, pending: Callable[[], dict[str, int]],
                      every: float = EVERY) -> None:
    """Forever: every `every` seconds, one INFO line if anything moved since the last."""
    last: tuple[int, ...] = (status.uploaded_blobs, status.skipped_blobs, status.commits)
    while True:
        await trio.sleep(every)
        now = (status.uploaded_blobs, status.skipped_blobs, status.commits)
        if now != last:
            log.info("%s", summary_line(status, pending()))
            last = now


def final_line(status: UploadStatus, pending: dict[str, int]) -> str | None:
    """The session's summary at unmount (None when it uploaded nothing)."""
    if not (status.uploaded_blobs or status.skipped_blobs or status.commits):
        return None
    return "this session's " + summary_line(status, pending)
