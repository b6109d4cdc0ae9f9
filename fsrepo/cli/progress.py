"""Following a long request to a running mount (--unmount's and --status --wait's wait,
--sync) and showing its progress on stderr: one line redrawn in place on a terminal, a
line every 2 seconds otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from ..errors import ImgrepoError
from ..units import human

LINE_EVERY = 2.0  # seconds between lines when stderr is not a terminal
BAR_WIDTH = 30


class ProgressLine:
    """The one progress line; leaving the `with` block erases it from the terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._last_line = 0.0
        self._shown = False

    def show(self, text: str) -> None:
        if not text:
            return
        if self._tty:
            self._stream.write("\r\033[K" + text)
            self._stream.flush()
            self._shown = True
            return
        now = time.monotonic()
        if now - self._last_line >= LINE_EVERY:
            print(text, file=self._stream, flush=True)
            self._last_line = now

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._shown = False

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.clear()


def follow(mountpoint: Path, cmd: dict[str, Any], label: str,
           give_up_offline: float | None = None,
           on_reply: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Send a request; render its progress until the final reply, which is returned (its
    "error" raised). `on_reply` sees every progress reply first. With `give_up_offline`,
    stop once the storage has been unreachable that long and return the last progress
    with "gave_up"."""
    from .. import control
    final: dict[str, Any] = {}
    offline_since: float | None = None
    with ProgressLine() as line:
        for reply in control.request(mountpoint, cmd):
            if reply.get("done"):
                final = reply
                break
            if give_up_offline is not None and "progress" in reply:
                if reply.get("online") is False:
                    offline_since = offline_since or time.monotonic()
                    if time.monotonic() - offline_since >= give_up_offline:
                        final = {**reply, "gave_up": True}
                        break
                else:
                    offline_since = None
            if on_reply is not None:
                on_reply(reply)
            line.show(progress_text(label, reply))
    if final.get("error"):
        raise ImgrepoError(final["error"])
    return final


def progress_text(label: str, reply: dict[str, Any]) -> str:
    """One progress reply as a line: pending uploads, or a sync's start and progress."""
    if "progress" in reply:
        p = reply["progress"]
        text = f"{label}: {p['blobs']} files ({human(p['bytes'])}) and {p['ops']} changes pending"
        if reply.get("online") is False:
            text += " - the storage is unreachable; waiting for it"
        elif reply.get("last_error"):
            text += f" - last error: {reply['last_error']}"
        return text
    if reply.get("phase") == "start":
        return (f"{label}: {reply['to_fetch']} of {reply['files']} files to fetch "
                f"({human(reply['bytes'])})")
    if reply.get("phase") == "progress":
        done, total = reply["done_bytes"], max(1, reply["bytes"])
        rate = done / max(reply["elapsed"], 1e-3)
        left = (total - done) / rate if rate > 0 else 0
        filled = int(BAR_WIDTH * done / total)
        return (f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                f"{reply['done_files']}/{reply['to_fetch']} files, {human(done)}/"
                f"{human(total)}, {human(rate)}/s, {left:.0f}s left")
    return ""
