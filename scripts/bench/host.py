"""The machine under test: running commands, measuring processes, mounts and the page
cache, and the benchmark's one-line messages and expected failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PROG = "bench"
MiB = 1 << 20
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class BenchError(Exception):
    """An expected failure: reported as one line, never a traceback."""


def say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)



def run(cmd: list[str], *, timeout: float = 900, check: bool = True,
        env: dict[str, str] | None = None, shell_stdout_null: bool = False) -> float:
    """Run a command; return its wall time in seconds."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL if shell_stdout_null else subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=timeout, env=env)
    elapsed = time.perf_counter() - t0
    if check and res.returncode != 0:
        err = (res.stderr or b"").decode(errors="replace").strip().splitlines()
        raise BenchError(f"{' '.join(cmd[:3])} ... failed ({res.returncode}): "
                         f"{err[-1] if err else ''}")
    return elapsed


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for pid {pid}")



class PageCache:
    """Drops the page cache between phases; warns once if this machine does not allow it."""

    def __init__(self) -> None:
        self.allowed: bool | None = None

    def drop(self) -> bool:
        """sync; echo 3 > /proc/sys/vm/drop_caches (root). False (once warned) if not
        allowed."""
        os.sync()
        if self.allowed is False:
            return False
        try:
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("3")
            self.allowed = True
        except OSError as exc:
            if self.allowed is None:
                say(f"cannot drop the page cache ({exc.strerror}); 'cold' means fresh "
                    "mount only")
            self.allowed = False
        return bool(self.allowed)


def unmount_path(path: Path) -> None:
    if os.path.ismount(path):
        res = subprocess.run(["umount", str(path)], capture_output=True)
        if res.returncode != 0 and os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)



def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"



def tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) if text else "(empty log)"
