"""One adapter per tool the benchmark compares: how to mount a bucket prefix (or a local
folder), what its process is, and how to tell when what was written is durable."""

from __future__ import annotations

import abc
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testservers.net import free_port, pid_alive, stop_process

from .host import REPO, BenchError, tail, unmount_path
from .server import Server


@dataclass(frozen=True)
class ToolSetup:
    """What every tool of one run shares: the server, the work folder, the commands."""

    server: Server | None
    work: Path
    imgrepo_cmd: Path
    rclone_args: list[str] = field(default_factory=list)
    s3fs_args: list[str] = field(default_factory=list)


class Tool(abc.ABC):
    """One way to mount a bucket prefix (or a local folder) and wait for durability."""

    name = "?"
    uses_s3 = True

    def __init__(self, setup: ToolSetup) -> None:
        self.setup = setup
        self.server = setup.server
        self.mnt: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.bucket = ""
        self.prefix = ""

    @abc.abstractmethod
    def mount(self, bucket: str, prefix: str, mnt: Path, cache: Path) -> None:
        """Mount the bucket prefix on mnt, with cache as the tool's cache folder."""

    @abc.abstractmethod
    def unmount(self) -> None:
        """Unmount and stop the tool's process."""

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @abc.abstractmethod
    def wait_durable(self, expected: dict[str, int], t0: float) -> float:
        """Return seconds from t0 until every expected path (relative to the mount, with
        its size) is stored in the bucket."""

    def check_stored(self, expected: dict[str, int]) -> bool:
        assert self.server is not None
        root = f"{self.prefix}/" if self.prefix else ""
        prefixes = {rel.split("/")[0] for rel in expected}
        have: dict[str, int] = {}
        for p in prefixes:
            have.update(self.server.listing(self.bucket, root + p))
        return all(have.get(root + rel) == size for rel, size in expected.items())

    def poll_stored(self, expected: dict[str, int], t0: float, timeout: float = 900) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.check_stored(expected):
                return time.perf_counter() - t0
            time.sleep(0.25)
        raise BenchError(f"{self.name}: files did not reach the bucket within {timeout:.0f} s")

    def _wait_mounted(self, mnt: Path, proc: subprocess.Popen, log: Path,
                      timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{self.name}: mount exited ({proc.returncode}): "
                                 f"{tail(log)}")
            if os.path.ismount(mnt):
                return
            time.sleep(0.05)
        raise BenchError(f"{self.name}: not mounted after {timeout:.0f} s: {tail(log)}")

    def _stop_fuse(self) -> None:
        if self.mnt is not None:
            unmount_path(self.mnt)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        self.proc = None
        self.mnt = None



class ImgrepoTool(Tool):
    name = "imgrepo"

    def mount(self, bucket: str, prefix: str, mnt: Path, cache: Path) -> None:
        assert self.server is not None
        self.bucket, self.prefix = bucket, prefix
        mnt.mkdir(parents=True, exist_ok=True)
        cmd = [str(self.setup.imgrepo_cmd), str(mnt), "--storage", f"s3://{bucket}/{prefix}",
               "--endpoint-url", self.server.relay_url, "--cache-dir", str(cache)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise BenchError(f"imgrepo: mount failed: {res.stderr.strip()[-300:]}")
        self.mnt = mnt
        self._pid = int(self._status()["pid"])

    def _status(self) -> dict[str, Any]:
        from fsrepo import control
        final: dict[str, Any] = {}
        for reply in control.request(self.mnt, {"cmd": "status"}):
            final = reply
        if final.get("error"):
            raise BenchError(f"imgrepo: status: {final['error']}")
        return final

    def pid(self) -> int | None:
        return self._pid if self.mnt is not None else None

    def wait_durable(self, expected: dict[str, int], t0: float) -> float:
        # What `imgrepo-mount --status --wait` sends, without a new interpreter's start-up.
        from fsrepo import control
        final: dict[str, Any] = {}
        for reply in control.request(self.mnt, {"cmd": "wait"}):
            final = reply
        elapsed = time.perf_counter() - t0
        if final.get("error"):
            raise BenchError(f"imgrepo: wait: {final['error']}")
        status = self._status()
        if status.get("pending_files") or status.get("pending_ops"):
            raise BenchError(f"imgrepo: wait returned with work pending: {status}")
        return elapsed

    def unmount(self) -> None:
        if self.mnt is None:
            return
        res = subprocess.run([str(self.setup.imgrepo_cmd), "--unmount", str(self.mnt)],
                             capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            unmount_path(self.mnt)
            raise BenchError(f"imgrepo: unmount failed: {res.stderr.strip()[-300:]}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and pid_alive(self._pid):
            time.sleep(0.05)
        self.mnt = None



class RcloneTool(Tool):
    def __init__(self, setup: ToolSetup, mode: str) -> None:
        super().__init__(setup)
        self.mode = mode
        self.name = f"rclone-{mode}"
        self.rc_port = 0

    def mount(self, bucket: str, prefix: str, mnt: Path, cache: Path) -> None:
        assert self.server is not None
        self.bucket, self.prefix = bucket, prefix
        mnt.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        self.rc_port = free_port()
        env = {**os.environ,
               "RCLONE_CONFIG": str(self.setup.work / "rclone.conf"),
               "RCLONE_CONFIG_BENCH_TYPE": "s3",
               "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
               "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": "testing",
               "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": "testing",
               "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
               "RCLONE_CONFIG_BENCH_ENDPOINT": self.server.relay_url,
               "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true"}
        # aws-sdk-go in rclone refuses its own HTTP transport when a CA bundle is set
        # ("LoadCustomCABundleError ... unsupported transport"); the endpoint is plain HTTP.
        env.pop("AWS_CA_BUNDLE", None)
        log = cache.parent / f"{cache.name}.rclone.log"
        cmd = ["rclone", "mount", f"bench:{bucket}/{prefix}", str(mnt),
               "--vfs-cache-mode", self.mode, "--cache-dir", str(cache),
               "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}", "--rc-no-auth",
               "--log-file", str(log), *self.setup.rclone_args]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_mounted(mnt, self.proc, log)
        self.mnt = mnt

    def _queue(self) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{self.rc_port}/vfs/stats", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            stats = json.loads(resp.read())
        disk = stats.get("diskCache") or {}
        return int(disk.get("uploadsInProgress", 0)) + int(disk.get("uploadsQueued", 0))

    def wait_durable(self, expected: dict[str, int], t0: float) -> float:
        deadline = time.monotonic() + 900
        while self._queue():
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: uploads still queued after 900 s")
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        if self.check_stored(expected):
            return elapsed
        return self.poll_stored(expected, t0)

    def unmount(self) -> None:
        self._stop_fuse()


class S3fsTool(Tool):
    name = "s3fs"

    def mount(self, bucket: str, prefix: str, mnt: Path, cache: Path) -> None:
        assert self.server is not None
        self.bucket, self.prefix = bucket, prefix
        mnt.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        passwd = self.setup.work / "s3fs.passwd"
        if not passwd.exists():
            passwd.write_text("testing:testing\n")
            passwd.chmod(0o600)
        log = cache.parent / f"{cache.name}.s3fs.log"
        cmd = ["s3fs", f"{bucket}:/{prefix}", str(mnt), "-f",
               "-o", f"url={self.server.relay_url}", "-o", "use_path_request_style",
               "-o", f"passwd_file={passwd}", "-o", "endpoint=us-east-1",
               "-o", "dbglevel=warn", *self.setup.s3fs_args]
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh)
        self._wait_mounted(mnt, self.proc, log)
        self.mnt = mnt

    def wait_durable(self, expected: dict[str, int], t0: float) -> float:
        elapsed = time.perf_counter() - t0  # close() has uploaded: check, don't wait
        if self.check_stored(expected):
            return elapsed
        return self.poll_stored(expected, t0)

    def unmount(self) -> None:
        self._stop_fuse()


class FusePassTool(Tool):
    """scripts/fusepass.py: a pyfuse3 passthrough to a local folder with no hashing, journal,
    fsync or server - the ceiling of any pyfuse3 filesystem here, measured in the same run.
    Its 'durable' is an os.sync() of the folder, as for the local folder."""

    name = "fusepass"
    uses_s3 = False

    def __init__(self, setup: ToolSetup) -> None:
        super().__init__(setup)
        # The folder behind the mount; by default the round's own (the cache folder's
        # parent), which the write phase and the read phase's fresh mount share.
        self.backing: Path | None = None

    def mount(self, bucket: str, prefix: str, mnt: Path, cache: Path) -> None:
        backing = self.backing or cache.parent / "backing"
        backing.mkdir(parents=True, exist_ok=True)
        mnt.mkdir(parents=True, exist_ok=True)
        log = cache.parent / f"fusepass-{cache.name}.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "scripts" / "fusepass.py"), str(backing),
                 str(mnt)], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self._wait_mounted(mnt, self.proc, log)
        self.mnt = mnt

    def wait_durable(self, expected: dict[str, int], t0: float) -> float:
        os.sync()
        return time.perf_counter() - t0

    def unmount(self) -> None:
        self._stop_fuse()


class LocalTool(Tool):
    """A plain local folder on the same disk: the physical limit."""

    name = "local"
    uses_s3 = False

    def mount(self, bucket: str, prefix: str, mnt: Path, cache: Path) -> None:
        mnt.mkdir(parents=True, exist_ok=True)
        self.mnt = mnt

    def pid(self) -> int | None:
        return None

    def wait_durable(self, expected: dict[str, int], t0: float) -> float:
        os.sync()
        return time.perf_counter() - t0

    def unmount(self) -> None:
        self.mnt = None



def new_tool(name: str, setup: ToolSetup) -> Tool:
    """The adapter for one of metrics.TOOLS."""
    if name == "imgrepo":
        return ImgrepoTool(setup)
    if name.startswith("rclone-"):
        return RcloneTool(setup, name.split("-", 1)[1])
    if name == "s3fs":
        return S3fsTool(setup)
    if name == "fusepass":
        return FusePassTool(setup)
    return LocalTool(setup)
