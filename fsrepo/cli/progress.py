"""Following a long request to a running mount (--unmount's and --status --wait's wait,
--sync) and showing its progress on stderr: one line redrawn in place on a terminal, a
line every 2 seconds otherwise."""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from ..errors import ImgrepoError
from ..units import human, plural

LINE_EVERY = 2.0  # seconds between lines when stderr is not a terminal
BAR_WIDTH = 30
BAR = re.compile(r"\[([#.]+)\] ")


class ProgressLine:
    """The one progress line; leaving the `with` block erases it from the terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._last_line = time.monotonic()  # a quick command prints no progress at all
        self._last_kind: str | None = None
        self._shown = False

    def show(self, text: str, kind: str | None = None) -> None:
        """Redraw the line (terminal), or print it (a log): at once when a new kind of
        step starts (except the first moments of a walk), else every LINE_EVERY seconds."""
        if not text:
            return
        if self._tty:
            self._stream.write("\r\033[K" + fit(text, terminal_width(self._stream)))
            self._stream.flush()
            self._shown = True
            return
        now = time.monotonic()
        new_step = kind is not None and kind != self._last_kind and kind != "walk"
        if new_step or now - self._last_line >= LINE_EVERY:
            print(text, file=self._stream, flush=True)
            self._last_line, self._last_kind = now, kind

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


def fit(text: str, width: int) -> str:
    """The line within the terminal's width: a longer one would wrap, and the next redraw
    would leave its first part behind on the line above. The bar shrinks (or goes) first,
    then the end is cut."""
    limit = max(10, width - 1)
    over = len(text) - limit
    bar = BAR.search(text)
    if over > 0 and bar:
        keep = len(bar.group(1)) - over
        new_bar = "" if keep < 5 else "[" + _squeeze(bar.group(1), keep) + "] "
        text = text[:bar.start()] + new_bar + text[bar.end():]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _squeeze(bar: str, width: int) -> str:
    filled = round(bar.count("#") * width / max(1, len(bar)))
    return "#" * filled + "." * (width - filled)


def terminal_width(stream: TextIO) -> int:
    """The width of the terminal the stream writes to (COLUMNS first, as usual)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return shutil.get_terminal_size().columns


class UploadRate:
    """How fast the pending bytes go down, from the first progress reply seen."""

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None
        self._peak = 0

    def text(self, pending_bytes: int, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if self._first is None:
            self._first = (now, pending_bytes)
        self._peak = max(self._peak, pending_bytes)
        started, first_bytes = self._first
        done = max(0, first_bytes - pending_bytes)
        if now - started < 1.0 or done <= 0:
            return ""
        rate = done / (now - started)
        return f", {human(rate)}/s, ~{eta(pending_bytes / rate)} left"


def eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


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
    rate = UploadRate()
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
            line.show(progress_text(label, reply, rate), reply.get("phase"))
    if final.get("error"):
        raise ImgrepoError(final["error"])
    return final


def progress_text(label: str, reply: dict[str, Any], rate: UploadRate | None = None) -> str:
    """One progress reply as a line: pending uploads, or a sync's walk, start and
    progress."""
    if "progress" in reply:
        p = reply["progress"]
        text = (f"{label}: {plural(p['blobs'], 'file')} ({human(p['bytes'])}) and "
                f"{plural(p['ops'], 'change')} pending")
        if reply.get("online") is False:
            text += " - the storage is unreachable; waiting for it"
        elif reply.get("last_error"):
            text += f" - last error: {reply['last_error']}"
        elif rate is not None:
            text += rate.text(p["bytes"])
        return text
    if reply.get("phase") == "walk":
        return (f"{label}: reading folders: {reply['folders']} read, {reply['files_found']} "
                f"files found ({reply['elapsed']:.0f}s)")
    if reply.get("phase") == "start":
        folders = f"{plural(reply['folders'], 'folder')} read; " if "folders" in reply else ""
        return (f"{label}: {folders}{reply['to_fetch']} of {reply['files']} files to fetch "
                f"({human(reply['bytes'])})")
    if reply.get("phase") == "progress":
        done, total = reply["done_bytes"], max(1, reply["bytes"])
        files_done, files_total = reply["done_files"], max(1, reply["to_fetch"])
        spent = reply.get("fetch_elapsed", reply["elapsed"])
        # Bytes and files both take time (a request per file, bandwidth per byte): the
        # share done is their mean, so neither many small files nor one big one misleads.
        share = (done / total + files_done / files_total) / 2
        left = f"~{eta(spent * (1 - share) / share)} left" if share > 0 else "estimating"
        filled = int(BAR_WIDTH * done / total)
        return (f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                f"{files_done}/{reply['to_fetch']} files, {human(done)}/"
                f"{human(total)}, {human(done / max(spent, 1e-3))}/s, {left}")
    return ""
