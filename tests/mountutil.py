"""Running the real `imgrepo-mount` in a subprocess, for tests that use a real FUSE mount.

Every mount started here is unmounted and its process killed at teardown, whatever the
test did (see the `mounter` fixture in conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "fsrepo.cli"]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120,
            check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"imgrepo-mount {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def is_mounted(path: Path) -> bool:
    """Whether anything is mounted at `path`, even a killed FUSE daemon's mount (where
    os.path.ismount answers False: its lstat fails with ENOTCONN)."""
    target = os.path.abspath(path).encode()
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace(b"\\040", b" ") == target:
                return True
    return False


def force_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


@dataclass
class MountProcess:
    path: Path
    storage: str
    cache_dir: Path
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def cli_args(self) -> list[str]:
        return [str(self.path), "--storage", self.storage, "--cache-dir", str(self.cache_dir),
                *self.args]

    def start(self, timeout: float = 30) -> MountProcess:
        """Start in the foreground as a child, and wait until the mount answers."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.log = self.cache_dir.parent / f"{self.path.name}-{int(time.time()*1000)}.stderr"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([*CLI, *self.cli_args(), "--foreground"],
                                         env=self.env, stdout=err, stderr=err, cwd=REPO_ROOT,
                                         start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text()}")
            if os.path.ismount(self.path) and self._ping():
                return self
            time.sleep(0.05)
        raise AssertionError(f"mount did not become ready:\n{self.log.read_text()}")

    def _ping(self) -> bool:
        res = run_cli(["--status", str(self.path), "--json"], self.env, check=False, timeout=30)
        return res.returncode == 0

    def status(self) -> dict[str, Any]:
        res = run_cli(["--status", str(self.path), "--json"], self.env)
        return json.loads(res.stdout)

    def wait_idle(self, timeout: float = 120) -> dict[str, Any]:
        res = run_cli(["--status", str(self.path), "--json", "--wait"], self.env,
                      timeout=timeout)
        return json.loads(res.stdout)

    def unmount(self, timeout: float = 120) -> None:
        """The user's way: wait for uploads, then unmount; the process must exit."""
        run_cli(["--unmount", str(self.path)], self.env, timeout=timeout)
        assert self.proc is not None
        self.proc.wait(timeout=30)
        assert not os.path.ismount(self.path)

    def kill(self) -> None:
        """SIGKILL the mount process (a crash), then clear the dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        force_unmount(self.path)

    def stop(self) -> None:
        """Teardown: whatever state the mount is in, leave nothing behind."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=15)
        force_unmount(self.path)

    def logtext(self) -> str:
        parts = []
        if self.log and self.log.exists():
            parts.append(self.log.read_text(errors="replace"))
        return "\n".join(parts)

    def unexpected_log_lines(self, *allowed: str) -> list[str]:
        """The mount's WARNING/ERROR lines that match none of the `allowed` regexes (opt-in,
        the subprocess counterpart of conftest's check: `assert not m.unexpected_log_lines()`)."""
        return [line for line in self.logtext().splitlines()
                if re.search(r" (WARNING|ERROR|CRITICAL) ", line)
                and not any(re.search(p, line) for p in allowed)]


class Mounter:
    """Creates mounts for one test and cleans all of them up."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.mounts: list[MountProcess] = []
        self._n = 0

    def __call__(self, storage: str, *args: str, cache_dir: Path | None = None,
                 name: str | None = None, endpoint_url: str | None = None,
                 start: bool = True) -> MountProcess:
        self._n += 1
        name = name or f"mnt{self._n}"
        extra = list(args)
        if endpoint_url:
            extra += ["--endpoint-url", endpoint_url]
        m = MountProcess(self.tmp / name, storage, cache_dir or self.tmp / f"cache-{name}",
                         self.env, extra)
        self.mounts.append(m)
        return m.start() if start else m

    def cleanup(self) -> None:
        for m in self.mounts:
            m.stop()


def make_env(home: Path) -> dict[str, str]:
    """An environment where the mount's defaults point into the test's own folders."""
    env = dict(os.environ)
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    env["XDG_DATA_HOME"] = str(home / ".local/share")
    env["XDG_RUNTIME_DIR"] = str(home / "run")
    (home / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def poll(condition: Any, timeout: float = 60.0, what: str = "condition",
         interval: float = 0.05) -> Any:
    """Wait until condition() is truthy and return its value (tests poll, never sleep
    blindly)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def file_tree(root: Path) -> dict[str, bytes]:
    """Every file under root -> its bytes (relative paths)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out
