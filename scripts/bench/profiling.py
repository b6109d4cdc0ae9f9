"""--profile DIR: py-spy samples imgrepo's mount process during each phase, as collapsed
stacks (it slows imgrepo: such runs are for finding where time goes, not for the figures)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from .host import REPO, say
from .tools import Tool


@contextlib.contextmanager
def profiled(profile_dir: Path | None, tool: Tool, label: str) -> Iterator[None]:
    """With a profile folder: py-spy samples imgrepo's mount process during the phase."""
    pid = tool.pid()
    if not profile_dir or tool.name != "imgrepo" or not pid:
        yield
        return
    profile_dir.mkdir(parents=True, exist_ok=True)
    out = profile_dir / f"{label}.txt"
    spy = subprocess.Popen([str(REPO / ".venv" / "bin" / "py-spy"), "record", "-p", str(pid),
                            "-o", str(out), "-f", "raw", "-r", "250", "--nonblocking",
                            "--threads", "--idle"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
        say(f"  profile of {label}: {out}")
