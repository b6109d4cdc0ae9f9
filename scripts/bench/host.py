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


def thread_cpu_seconds(pid: int) -> dict[int, tuple[float, float]]:
    """Of each live thread of a process, by thread id: seconds on a CPU, and seconds
    runnable but waiting for one (schedstat: what the others on its core cost it)."""
    out: dict[int, tuple[float, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ran, waited, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue  # (ended meanwhile)
        out[int(task.name)] = (int(ran) / 1e9, int(waited) / 1e9)
    return out


def cores_busy_seconds(cores: set[int]) -> dict[int, float]:
    """CPU seconds each core spent busy (anything but idle and iowait), from /proc/stat:
    how much of the mounts' core a phase found taken, by anyone."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    with open("/proc/stat") as fh:
        for line in fh:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                ticks = [int(f) for f in fields]
                out[int(name[3:])] = (sum(ticks[:8]) - ticks[3] - ticks[4]) / tick
    return out


def all_threads_cpu() -> dict[tuple[int, int], tuple[str, float]]:
    """CPU seconds of every thread on the machine by (pid, tid), with its command name:
    who else took the mounts' core during a phase."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for task in Path("/proc").glob("[0-9]*/task/[0-9]*"):
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        comm, rest = raw.split("(", 1)[1].rsplit(")", 1)
        fields = rest.split()
        out[(int(task.parent.parent.name), int(task.name))] = (
            comm, (int(fields[11]) + int(fields[12])) / tick)
    return out


def python_thread_names(pid: int) -> dict[int, str]:
    """The Python names of a process's threads by thread id (py-spy; Python 3.11 does not
    name the OS threads), empty where py-spy cannot tell."""
    try:
        dump = subprocess.run([str(REPO / ".venv" / "bin" / "py-spy"), "dump", "--pid",
                               str(pid), "--nonblocking"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names: dict[int, str] = {}
    for line in dump.splitlines():
        if line.startswith("Thread ") and '"' in line:
            tid, name = line.split()[1], line.split('"')[1]
            if tid.isdigit():
                names[int(tid)] = name
    return names


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
