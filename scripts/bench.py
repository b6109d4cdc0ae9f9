#!/usr/bin/env python3
"""imgrepo's own benchmark: imgrepo side by side with rclone mount, s3fs and a local folder.

One run starts one S3 server (scripts/s3lite.py, or moto's server mode) on 127.0.0.1, puts a
byte-counting TCP relay in front of it, and mounts every selected tool against it in turn,
round after round (tools interleaved, so machine noise hits them alike). Two references need
no server: the local folder (the disk's limit) and `fusepass` (scripts/fusepass.py, a
pyfuse3 passthrough to a local folder that does nothing else: the limit of any pyfuse3
filesystem on the machine). Workloads, for every tool:

  W1  cp -r of N small random files: files/s until cp returns, and until durable
  W2  one big file written with dd bs=1M: MB/s until close, and until durable
  W3  cold reads (fresh mount, empty cache, dropped page cache) of the big file and the
      small files;  W4  the same again, warm
  W5  ls -l of a directory of 10,000 entries, cold and warm (made beforehand in the
      bucket, in each tool's own format)
  W6  the same small files copied again under another name: time until durable, and
      bytes sent to the server (counted at the relay)
  W7  peak RSS (VmHWM) of the mount process during W2, and its CPU seconds

It prints a table of medians, one of ratios imgrepo/peer and the targets, and writes all
of it (with every round's figures) as JSON. `scripts/bench.sh` installs what it needs and
runs this with the project's venv; see README.md, section "Benchmark".

"Durable" means in the bucket: for imgrepo the mount's own wait request (what
`imgrepo-mount --status --wait` sends); for rclone its `vfs/stats` upload queue (then the
objects are checked in the bucket); for s3fs close() already uploads (checked the same way);
for the local folder and fusepass `sync`.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import json
import mmap
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROG = "bench"
TOOLS = ["imgrepo", "rclone-writes", "rclone-full", "s3fs", "fusepass", "local"]
PEERS = ["rclone-writes", "rclone-full", "s3fs"]
SERVERLESS = ("local", "fusepass")  # references that need no S3 server
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MiB = 1 << 20

# (key, workload, label, unit, higher_is_better)
METRICS: list[tuple[str, str, str, str, bool]] = [
    ("w1_cp_files_s", "W1", "W1 cp -r small files, until cp returns", "files/s", True),
    ("w1_durable_files_s", "W1", "W1 cp -r small files, until durable", "files/s", True),
    ("w2_close_mb_s", "W2", "W2 dd big file, until close", "MB/s", True),
    ("w2_durable_mb_s", "W2", "W2 dd big file, until durable", "MB/s", True),
    ("w3_cold_big_mb_s", "W3", "W3 cold read, big file", "MB/s", True),
    ("w3_cold_small_files_s", "W3", "W3 cold read, small files", "files/s", True),
    ("w4_warm_big_mb_s", "W4", "W4 warm read, big file", "MB/s", True),
    ("w4_warm_small_files_s", "W4", "W4 warm read, small files", "files/s", True),
    ("w5_ls_cold_s", "W5", "W5 ls -l big directory, cold", "s", False),
    ("w5_ls_warm_s", "W5", "W5 ls -l big directory, warm", "s", False),
    ("w6_durable_s", "W6", "W6 duplicate cp -r, until durable", "s", False),
    ("w6_sent_mib", "W6", "W6 duplicate cp -r, sent to server", "MiB", False),
    ("w1_sent_mib", "W1", "W1 cp -r small files, sent to server", "MiB", False),
    ("w7_peak_rss_mib", "W7", "W7 peak RSS of the mount during W2", "MiB", False),
    ("w7_cpu_s", "W7", "W7 CPU of the mount during W2", "s", False),
    ("w1_cpu_s", "W7", "CPU of the mount during W1", "s", False),
]
METRIC_INFO = {m[0]: m for m in METRICS}
WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]


class BenchError(Exception):
    """An expected failure: reported as one line, never a traceback."""


def say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


# -- the byte-counting relay (runs as its own process, pinned with the server) --------------
def relay_main(listen_port: int, upstream_port: int, counter_path: str, core: int) -> None:
    """Forward every TCP connection to the upstream port; count the bytes each way in a
    16-byte file (client->server, server->client) that the benchmark reads through mmap."""
    if core >= 0:
        os.sched_setaffinity(0, {core})
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    fd = os.open(counter_path, os.O_RDWR)
    counters = mmap.mmap(fd, 16)
    totals = [0, 0]
    lock = threading.Lock()

    def add(direction: int, n: int) -> None:
        with lock:
            totals[direction] += n
            struct.pack_into("<Q", counters, direction * 8, totals[direction])

    def pump(src: socket.socket, dst: socket.socket, direction: int) -> None:
        r, w = os.pipe()
        try:
            try:
                import fcntl
                fcntl.fcntl(w, 1031, MiB)  # F_SETPIPE_SZ
            except OSError:
                pass
            while True:
                n = os.splice(src.fileno(), w, MiB)
                if n == 0:
                    break
                add(direction, n)
                while n:
                    n -= os.splice(r, dst.fileno(), n)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            os.close(r)
            os.close(w)

    def handle(client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", upstream_port))
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=pump, args=(upstream, client, 1), daemon=True)
        back.start()
        pump(client, upstream, 0)
        back.join()
        client.close()
        upstream.close()

    server = socket.create_server(("127.0.0.1", listen_port), backlog=256)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# -- helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited at start (code {proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not start listening on 127.0.0.1:{port}")


def stop_process(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


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


_DROP_OK: bool | None = None


def drop_caches() -> bool:
    """sync; echo 3 > /proc/sys/vm/drop_caches (root). False (once warned) if not allowed."""
    global _DROP_OK
    os.sync()
    if _DROP_OK is False:
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        _DROP_OK = True
    except OSError as exc:
        if _DROP_OK is None:
            say(f"cannot drop the page cache ({exc.strerror}); 'cold' means fresh mount only")
        _DROP_OK = False
    return bool(_DROP_OK)


def unmount_path(path: Path) -> None:
    if os.path.ismount(path):
        res = subprocess.run(["umount", str(path)], capture_output=True)
        if res.returncode != 0 and os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


# -- the S3 server ---------------------------------------------------------------------------
def server_main(port: int) -> None:
    """moto's S3 server (as `moto_server` runs it), with two fixes that make it behave like
    S3 where the tools here notice:

    - moto answers CompleteMultipartUpload on an unversioned bucket with
      `x-amz-version-id: null` and then refuses `HEAD ...?versionId=null` with 400 (S3
      accepts the "null" version). rclone asks exactly that after every multipart upload
      and retries the upload for ever. The query parameter is dropped here.
    - every GET copied the whole object before slicing out the requested range, so a 1 GiB
      file read in ranges cost a 1 GiB copy per request. Objects are kept in memory, and
      their bytes are now handed out without a copy.
    """
    import io
    import logging

    # keep every object in memory: moto otherwise spools objects over ~5 MiB to temporary
    # files, which costs it ~40% of its time on big uploads
    os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(1 << 34)
    import moto.s3.models as s3models
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    original = s3models.FakeKey.value

    def value(self: Any) -> bytes:
        inner = getattr(self._value_buffer, "_file", None)
        if isinstance(inner, io.BytesIO):
            with self.lock:
                return inner.getvalue()  # shares the buffer's bytes, no copy
        return original.fget(self)

    s3models.FakeKey.value = property(value, original.fset)
    app = DomainDispatcherApplication(create_backend_app)

    def fixed(environ: dict, start_response: Any) -> Any:
        query = environ.get("QUERY_STRING", "")
        if "versionId=null" in query:
            environ["QUERY_STRING"] = "&".join(
                part for part in query.split("&") if part != "versionId=null")
        return app(environ, start_response)

    os.environ.setdefault("MOTO_PORT", str(port))
    run_simple("127.0.0.1", port, fixed, threaded=True, request_handler=MotoRequestHandler)


class Server:
    """The S3 server (s3lite or moto), pinned to its core, behind the byte-counting relay."""

    def __init__(self, work: Path, core: int, kind: str = "s3lite", warm_mib: int = 0) -> None:
        self.kind = kind
        self.warm_mib = warm_mib  # s3lite: heap touched before the first client (fairness)
        self.work = work
        self.core = core
        self.port = free_port()
        self.relay_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.relay: subprocess.Popen | None = None
        self.counter_path = work / "relay-counters"
        self._mm: mmap.mmap | None = None
        self.client: Any = None

    @property
    def url(self) -> str:  # direct: the benchmark's own setup and checks
        return f"http://127.0.0.1:{self.port}"

    @property
    def relay_url(self) -> str:  # what the tools are given
        return f"http://127.0.0.1:{self.relay_port}"

    def _pin(self) -> None:
        if self.core >= 0:
            os.sched_setaffinity(0, {self.core})

    def start(self) -> None:
        env = {**os.environ, **AWS_ENV}
        log = open(self.work / "server.log", "wb")
        if self.kind == "moto":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--server-child",
                   str(self.port)]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve().parent / "s3lite.py"),
                   "--port", str(self.port), "--warm-mib", str(self.warm_mib)]
        self.proc = subprocess.Popen(cmd,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=env, preexec_fn=self._pin)
        wait_port(self.port, self.proc, f"the {self.kind} server")
        self.counter_path.write_bytes(b"\0" * 16)
        self.relay = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--relay-child",
             str(self.relay_port), str(self.port), str(self.counter_path), str(self.core)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_port(self.relay_port, self.relay, "the counting relay")
        fd = os.open(self.counter_path, os.O_RDONLY)
        self._mm = mmap.mmap(fd, 16, prot=mmap.PROT_READ)
        os.close(fd)
        import boto3
        from botocore.config import Config
        self.client = boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=32,
                          retries={"max_attempts": 5, "mode": "standard"}))

    def sent(self) -> int:
        """Bytes the tools have sent to the server so far (client -> server)."""
        assert self._mm is not None
        return struct.unpack_from("<Q", self._mm, 0)[0]

    def stop(self) -> None:
        stop_process(self.relay)
        stop_process(self.proc)

    # bucket helpers (direct to the server, not counted)
    def create_bucket(self, name: str) -> None:
        self.client.create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents") or ()]
                if keys:
                    self.client.delete_objects(Bucket=name,
                                               Delete={"Objects": keys, "Quiet": True})
            for up in self.client.list_multipart_uploads(Bucket=name).get("Uploads") or ():
                self.client.abort_multipart_upload(Bucket=name, Key=up["Key"],
                                                   UploadId=up["UploadId"])
            self.client.delete_bucket(Bucket=name)
        except Exception as exc:  # noqa: BLE001 - cleanup: report, go on
            say(f"could not delete bucket {name}: {exc}")

    def listing(self, bucket: str, prefix: str) -> dict[str, int]:
        out: dict[str, int] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents") or ():
                out[obj["Key"]] = int(obj["Size"])
        return out

    def put_many(self, bucket: str, keys: list[str], body: bytes = b"",
                 threads: int = 16) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def put(key: str) -> None:
            self.client.put_object(Bucket=bucket, Key=key, Body=body)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, keys))


# -- data ---------------------------------------------------------------------------------
@dataclass
class Sizes:
    files: int
    file_kib: int
    big_mib: int
    ls_entries: int
    rounds: int


@dataclass
class Data:
    src: Path  # directory of small files
    names: dict[str, int]  # name -> size
    big: Path
    big_size: int

    def warm(self) -> None:
        """Read the sources into the page cache (a cold phase may have dropped them)."""
        for name in self.names:
            with open(self.src / name, "rb") as fh:
                while fh.read(MiB):
                    pass
        with open(self.big, "rb") as fh:
            while fh.read(16 * MiB):
                pass


def make_data(work: Path, sizes: Sizes) -> Data:
    import random
    rng = random.Random(20240917)
    src = work / "src" / "photos"
    src.mkdir(parents=True)
    names: dict[str, int] = {}
    mean = sizes.file_kib * 1024
    for i in range(sizes.files):
        size = rng.randint(mean * 3 // 4, mean * 5 // 4)
        name = f"IMG_{i:05d}.jpg"
        (src / name).write_bytes(os.urandom(size))
        names[name] = size
    big = work / "src" / "big.bin"
    with open(big, "wb") as fh:
        chunk = 64 * MiB
        left = sizes.big_mib * MiB
        while left:
            n = min(chunk, left)
            fh.write(os.urandom(n))
            left -= n
    return Data(src, names, big, sizes.big_mib * MiB)


# -- tools ---------------------------------------------------------------------------------
class Tool(abc.ABC):
    """One way to mount a bucket prefix (or a local folder) and wait for durability."""

    name = "?"
    uses_s3 = True

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.server = bench.server
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


def tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) if text else "(empty log)"


class ImgrepoTool(Tool):
    name = "imgrepo"

    def mount(self, bucket: str, prefix: str, mnt: Path, cache: Path) -> None:
        assert self.server is not None
        self.bucket, self.prefix = bucket, prefix
        mnt.mkdir(parents=True, exist_ok=True)
        cmd = [str(self.bench.imgrepo_cmd), str(mnt), "--storage", f"s3://{bucket}/{prefix}",
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
        res = subprocess.run([str(self.bench.imgrepo_cmd), "--unmount", str(self.mnt)],
                             capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            unmount_path(self.mnt)
            raise BenchError(f"imgrepo: unmount failed: {res.stderr.strip()[-300:]}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _alive(self._pid):
            time.sleep(0.05)
        self.mnt = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, OSError):
        return False


class RcloneTool(Tool):
    def __init__(self, bench: Bench, mode: str) -> None:
        super().__init__(bench)
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
               "RCLONE_CONFIG": str(self.bench.work / "rclone.conf"),
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
               "--log-file", str(log), *self.bench.args.rclone_args]
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
        passwd = self.bench.work / "s3fs.passwd"
        if not passwd.exists():
            passwd.write_text("testing:testing\n")
            passwd.chmod(0o600)
        log = cache.parent / f"{cache.name}.s3fs.log"
        cmd = ["s3fs", f"{bucket}:/{prefix}", str(mnt), "-f",
               "-o", f"url={self.server.relay_url}", "-o", "use_path_request_style",
               "-o", f"passwd_file={passwd}", "-o", "endpoint=us-east-1",
               "-o", "dbglevel=warn", *self.bench.args.s3fs_args]
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

    def __init__(self, bench: Bench) -> None:
        super().__init__(bench)
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


# -- the benchmark ---------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    sizes: Sizes
    tools: list[str]
    work: Path
    server: Server | None = None
    data: Data | None = None
    imgrepo_cmd: Path = REPO / ".venv" / "bin" / "imgrepo-mount"
    results: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    live: list[Tool] = field(default_factory=list)
    ls_made: dict[str, tuple[str, str, Path | None]] = field(default_factory=dict)

    @contextlib.contextmanager
    def profiled(self, tool: Tool, label: str) -> Iterator[None]:
        """With --profile DIR: py-spy samples imgrepo's mount process during the phase."""
        pid = tool.pid()
        if not self.args.profile or tool.name != "imgrepo" or not pid:
            yield
            return
        self.args.profile.mkdir(parents=True, exist_ok=True)
        out = self.args.profile / f"{label}.txt"
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

    def record(self, tool: str, key: str, value: float | None) -> None:
        self.results.setdefault(tool, {}).setdefault(key, []).append(value)

    def new_tool(self, name: str) -> Tool:
        tool: Tool
        if name == "imgrepo":
            tool = ImgrepoTool(self)
        elif name.startswith("rclone-"):
            tool = RcloneTool(self, name.split("-", 1)[1])
        elif name == "s3fs":
            tool = S3fsTool(self)
        elif name == "fusepass":
            tool = FusePassTool(self)
        else:
            tool = LocalTool(self)
        self.live.append(tool)
        return tool

    def release(self, tool: Tool) -> None:
        try:
            tool.unmount()
        finally:
            if tool in self.live:
                self.live.remove(tool)

    # ---- W5 fixtures: a directory of many entries, in each tool's own format ----
    def make_ls_fixtures(self) -> None:
        n = self.sizes.ls_entries
        names = [f"IMG_{i:05d}.jpg" for i in range(n)]
        if "local" in self.tools or "fusepass" in self.tools:
            d = self.work / "ls-local" / "big"
            d.mkdir(parents=True)
            for name in names:
                (d / name).touch()
            self.ls_made["local"] = self.ls_made["fusepass"] = ("", "", d.parent)
        if all(t in SERVERLESS for t in self.tools):
            return
        assert self.server is not None
        bucket = "bench-ls"
        self.server.create_bucket(bucket)
        if any(t in PEERS for t in self.tools):
            t0 = time.perf_counter()
            # plain objects: what rclone and s3fs show (directory markers as s3fs makes them)
            self.server.put_many(bucket, ["plain/", "plain/big/"] +
                                 [f"plain/big/{name}" for name in names])
            say(f"  {n} objects for rclone/s3fs's W5 in {time.perf_counter() - t0:.1f} s")
            for peer in PEERS:
                self.ls_made[peer] = (bucket, "plain", None)
        if "imgrepo" in self.tools:
            self._make_imgrepo_dir(bucket, "imgrepo", names)
            self.ls_made["imgrepo"] = (bucket, "imgrepo", None)

    def _make_imgrepo_dir(self, bucket: str, prefix: str, names: list[str]) -> None:
        """imgrepo's format: descriptor, root manifest, one manifest of n entries."""
        import hashlib

        from fsrepo.manifest import (
            ROOT_ID,
            DirEntry,
            FileEntry,
            Manifest,
            serialise_manifest,
        )
        from fsrepo.repository import (
            DESCRIPTOR_KEY,
            FORMAT_NAME,
            FORMAT_VERSION,
            blob_key,
            manifest_key,
        )
        assert self.server is not None
        now = time.time_ns()
        empty = hashlib.sha256(b"").hexdigest()
        dir_id = uuid.uuid4().hex
        descriptor = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "hash": "sha256",
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "repo_id": uuid.uuid4().hex}
        root = Manifest(ROOT_ID, {b"big": DirEntry(dir_id, now)})
        big = Manifest(dir_id, {n.encode(): FileEntry(empty, 0, now) for n in names})
        c = self.server.client
        c.put_object(Bucket=bucket, Key=f"{prefix}/{DESCRIPTOR_KEY}",
                     Body=json.dumps(descriptor).encode())
        c.put_object(Bucket=bucket, Key=f"{prefix}/{blob_key(empty)}", Body=b"")
        c.put_object(Bucket=bucket, Key=f"{prefix}/{manifest_key(ROOT_ID)}",
                     Body=serialise_manifest(root))
        c.put_object(Bucket=bucket, Key=f"{prefix}/{manifest_key(dir_id)}",
                     Body=serialise_manifest(big))

    # ---- one round of one tool ----
    def run_round(self, name: str, rnd: int) -> None:
        assert self.data is not None
        data = self.data
        tag = f"{name}-r{rnd}"
        bucket = f"bench-{name}-r{rnd}".replace("_", "-")
        prefix = "data"
        base = self.work / "rounds" / tag
        base.mkdir(parents=True)
        tool = self.new_tool(name)
        if tool.uses_s3:
            assert self.server is not None
            self.server.create_bucket(bucket)
            if name == "s3fs":
                self.server.client.put_object(Bucket=bucket, Key=f"{prefix}/", Body=b"")
        mnt = base / "local" if isinstance(tool, LocalTool) else base / "mnt"
        try:
            data.warm()
            tool.mount(bucket, prefix, mnt, base / "cache-write")
            self._write_phase(tool, mnt)
            self.release(tool)
            # ---- cold and warm reads on a fresh mount with an empty cache ----
            tool = self.new_tool(name)
            drop_caches()
            tool.mount(bucket, prefix, mnt, base / "cache-read")
            drop_caches()
            self._read_phase(tool, mnt)
            self.release(tool)
            self._ls_phase(name, base)
        finally:
            for t in list(self.live):
                try:
                    self.release(t)
                except Exception as exc:  # noqa: BLE001 - cleanup: report, go on
                    say(f"{t.name}: unmount: {exc}")
            if tool.uses_s3 and self.server is not None:
                self.server.delete_bucket(bucket)
            if not self.args.keep:
                shutil.rmtree(base, ignore_errors=True)

    def _write_phase(self, tool: Tool, mnt: Path) -> None:
        data = self.data
        assert data is not None
        name = tool.name
        nfiles = len(data.names)
        pid = tool.pid()
        sent = self.server.sent if self.server is not None else (lambda: 0)

        # W1: cp -r of the small files
        cpu0 = proc_cpu_seconds(pid) if pid else None
        bytes0 = sent()
        t0 = time.perf_counter()
        with self.profiled(tool, "w1-cp"):
            t_cp = run(["cp", "-r", str(data.src), str(mnt / "w1")])
        expected = {f"w1/{n}": s for n, s in data.names.items()}
        with self.profiled(tool, "w1-durable"):
            t_dur = tool.wait_durable(expected, t0)
        self.record(name, "w1_cp_files_s", nfiles / t_cp)
        self.record(name, "w1_durable_files_s", nfiles / t_dur)
        self.record(name, "w1_sent_mib", (sent() - bytes0) / MiB if tool.uses_s3 else None)
        self.record(name, "w1_cpu_s", proc_cpu_seconds(pid) - cpu0 if pid else None)
        say(f"  {name}: W1 cp {t_cp:.2f} s, durable {t_dur:.2f} s")

        # W6: the same files again under another name
        bytes0 = sent()
        t0 = time.perf_counter()
        with self.profiled(tool, "w6"):
            run(["cp", "-r", str(data.src), str(mnt / "w6")])
            t6 = tool.wait_durable({f"w6/{n}": s for n, s in data.names.items()}, t0)
        self.record(name, "w6_durable_s", t6)
        self.record(name, "w6_sent_mib", (sent() - bytes0) / MiB if tool.uses_s3 else None)
        say(f"  {name}: W6 durable {t6:.2f} s, sent {(sent() - bytes0) / MiB:.1f} MiB")

        # W2 (+W7): one big file with dd bs=1M
        if pid:
            reset_peak_rss(pid)
            cpu0 = proc_cpu_seconds(pid)
        t0 = time.perf_counter()
        with self.profiled(tool, "w2-close"):
            t_close = run(["dd", f"if={data.big}", f"of={mnt / 'big.bin'}", "bs=1M",
                           "status=none"])
        with self.profiled(tool, "w2-durable"):
            t_dur = tool.wait_durable({"big.bin": data.big_size}, t0)
        mb = data.big_size / 1e6
        self.record(name, "w2_close_mb_s", mb / t_close)
        self.record(name, "w2_durable_mb_s", mb / t_dur)
        self.record(name, "w7_peak_rss_mib", peak_rss_mib(pid) if pid else None)
        self.record(name, "w7_cpu_s", proc_cpu_seconds(pid) - cpu0 if pid else None)
        say(f"  {name}: W2 close {t_close:.2f} s, durable {t_dur:.2f} s")

    def _read_phase(self, tool: Tool, mnt: Path) -> None:
        assert self.data is not None
        name = tool.name
        nfiles = len(self.data.names)
        mb = self.data.big_size / 1e6
        read_big = ["dd", f"if={mnt / 'big.bin'}", "of=/dev/null", "bs=1M", "status=none"]
        read_small = ["sh", "-c", 'cat -- "$1"/* > /dev/null', "sh", str(mnt / "w1")]
        for label in ("w3_cold", "w4_warm"):
            with self.profiled(tool, f"{label[:2]}-big"):
                t_big = run(read_big)
            with self.profiled(tool, f"{label[:2]}-small"):
                t_small = run(read_small)
            self.record(name, f"{label}_big_mb_s", mb / t_big)
            self.record(name, f"{label}_small_files_s", nfiles / t_small)
            say(f"  {name}: {label[:2].upper()} big {t_big:.2f} s, small {t_small:.2f} s")

    def _ls_phase(self, name: str, base: Path) -> None:
        bucket, prefix, local_dir = self.ls_made[name]
        tool = self.new_tool(name)
        drop_caches()
        if isinstance(tool, FusePassTool):
            tool.backing = local_dir
            mnt = base / "mnt-ls"
            tool.mount("", "", mnt, base / "cache-ls")
        elif local_dir is not None:
            mnt = local_dir
            tool.mount("", "", mnt, base / "cache-ls")
        else:
            mnt = base / "mnt-ls"
            tool.mount(bucket, prefix, mnt, base / "cache-ls")
        drop_caches()
        cmd = ["ls", "-l", str(mnt / "big")]
        with self.profiled(tool, "w5-cold"):
            cold = run(cmd, shell_stdout_null=True)
        with self.profiled(tool, "w5-warm"):
            warm = run(cmd, shell_stdout_null=True)
        listed = subprocess.run(["ls", str(mnt / "big")], capture_output=True).stdout.count(b"\n")
        if listed != self.sizes.ls_entries:
            raise BenchError(f"{name}: ls shows {listed} entries, not {self.sizes.ls_entries}")
        self.record(name, "w5_ls_cold_s", cold)
        self.record(name, "w5_ls_warm_s", warm)
        say(f"  {name}: W5 ls -l cold {cold:.2f} s, warm {warm:.2f} s")
        self.release(tool)

    def cleanup(self) -> None:
        for tool in list(self.live):
            try:
                self.release(tool)
            except Exception:  # noqa: BLE001 - last-ditch cleanup
                if tool.mnt is not None:
                    unmount_path(tool.mnt)
                stop_process(tool.proc)
        if self.server is not None:
            self.server.stop()


# -- results -----------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def best(medians: dict[str, dict[str, float | None]], key: str, tools: list[str]
         ) -> tuple[str, float] | None:
    higher = METRIC_INFO[key][4]
    vals = [(t, medians[t][key]) for t in tools if t in medians and medians[t].get(key)
            is not None]
    if not vals:
        return None
    return (max if higher else min)(vals, key=lambda tv: tv[1])  # type: ignore[arg-type,return-value]


def evaluate_targets(med: dict[str, dict[str, float | None]], data_mib: float) -> list[dict]:
    """The issue's targets, each as imgrepo's figure against the peer's."""
    img = med.get("imgrepo", {})
    rclones = ["rclone-writes", "rclone-full"]
    out: list[dict] = []

    def target(label: str, key: str, peers: list[str], factor: float) -> None:
        got = img.get(key)
        ref = best(med, key, peers)
        if got is None or ref is None:
            return
        higher = METRIC_INFO[key][4]
        need = ref[1] * factor
        ok = got >= need if higher else got <= need
        out.append({"target": label, "metric": key, "imgrepo": got, "peer": ref[0],
                    "peer_value": ref[1], "needed": need, "ok": ok})

    target("W1 files/s until cp returns >= 2 x rclone", "w1_cp_files_s", rclones, 2)
    target("W1 files/s until durable >= 2 x rclone", "w1_durable_files_s", rclones, 2)
    target("W2 MB/s until close >= rclone", "w2_close_mb_s", rclones, 1)
    target("W2 MB/s until durable >= 2 x rclone", "w2_durable_mb_s", rclones, 2)
    target("W2 MB/s until durable >= s3fs", "w2_durable_mb_s", ["s3fs"], 1)
    target("W3 cold big read >= s3fs", "w3_cold_big_mb_s", ["s3fs"], 1)
    target("W4 warm big read >= 3 x s3fs", "w4_warm_big_mb_s", ["s3fs"], 3)
    target("W4 warm small files/s >= 2 x best peer", "w4_warm_small_files_s", PEERS, 2)
    target("W5 ls -l cold <= 1/4 of best peer", "w5_ls_cold_s", PEERS, 0.25)
    target("W5 ls -l warm <= 1/4 of best peer", "w5_ls_warm_s", PEERS, 0.25)
    target("W6 duplicate copy time <= 1/5 of best peer", "w6_durable_s", PEERS, 0.2)
    sent = img.get("w6_sent_mib")
    if sent is not None:
        limit = max(1.0, data_mib * 0.01)
        out.append({"target": "W6 duplicate copy uploads ~0 bytes (<= 1% of the data)",
                    "metric": "w6_sent_mib", "imgrepo": sent, "peer": None,
                    "peer_value": None, "needed": limit, "ok": sent <= limit})
    rss = img.get("w7_peak_rss_mib")
    if rss is not None:
        out.append({"target": "W7 peak RSS during W2 <= 150 MiB", "metric": "w7_peak_rss_mib",
                    "imgrepo": rss, "peer": None, "peer_value": None, "needed": 150.0,
                    "ok": rss <= 150})
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def report(bench: Bench, config: dict[str, Any], elapsed: float) -> dict[str, Any]:
    tools = [t for t in bench.tools if t in bench.results]
    med: dict[str, dict[str, float | None]] = {
        t: {k: median(bench.results[t].get(k, [])) for k, *_ in METRICS} for t in tools}
    rows = []
    for key, _w, label, unit, higher in METRICS:
        rows.append([f"{label} ({unit}, {'higher' if higher else 'lower'} is better)"] +
                    [fmt(med[t][key]) for t in tools])
    out_text = ["", f"Medians of {bench.sizes.rounds} round(s):", table(["metric", *tools], rows)]
    ratios: dict[str, dict[str, float | None]] = {}
    peers = [t for t in tools if t != "imgrepo"]
    if "imgrepo" in med and peers:
        rrows = []
        for key, _w, label, _unit, higher in METRICS:
            rrows.append([f"{label} ({'>1' if higher else '<1'} is better)"] +
                         [fmt(ratio(med["imgrepo"][key], med[p][key])) for p in peers])
            for p in peers:
                ratios.setdefault(p, {})[key] = ratio(med["imgrepo"][key], med[p][key])
        out_text += ["", "Ratios imgrepo / peer:", table(["metric", *peers], rrows)]
    data_mib = sum(bench.data.names.values()) / MiB if bench.data else 0.0
    targets = evaluate_targets(med, data_mib)
    if targets:
        trows = [[t["target"], fmt(t["imgrepo"]),
                  f"{t['peer']} {fmt(t['peer_value'])}" if t["peer"] else "-",
                  fmt(t["needed"]), "ok" if t["ok"] else "MISSED"] for t in targets]
        out_text += ["", "Targets:", table(["target", "imgrepo", "peer", "needed", ""], trows)]
    for tool, errs in bench.errors.items():
        for e in errs:
            out_text.append(f"error: {tool}: {e}")
    out_text.append(f"\n(total time {elapsed:.0f} s)")
    print("\n".join(out_text), flush=True)
    return {
        "config": config,
        "workloads": {w: [k for k, wl, *_ in METRICS if wl == w] for w in WORKLOADS},
        "metrics": {k: {"workload": w, "label": label, "unit": unit,
                        "higher_is_better": higher} for k, w, label, unit, higher in METRICS},
        "medians": med,
        "rounds": {t: bench.results[t] for t in tools},
        "ratios_imgrepo_over": ratios,
        "targets": targets,
        "errors": bench.errors,
        "elapsed_s": elapsed,
    }


# -- main ----------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="imgrepo side by side with rclone mount, s3fs and a local folder, against "
                    "one local S3 server (see README.md, 'Benchmark').")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help=f"comma-separated, from {','.join(TOOLS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and one round: a smoke run in well under a minute")
    p.add_argument("--rounds", type=int, help="rounds per tool (default 3; medians are kept)")
    p.add_argument("--files", type=int, help="small files for W1/W3/W4/W6 (default 1000)")
    p.add_argument("--file-kib", type=int, help="mean size of a small file (default 200)")
    p.add_argument("--big-mib", type=int, help="size of the W2 file (default 1024)")
    p.add_argument("--ls-entries", type=int, help="entries of the W5 directory (default 10000)")
    p.add_argument("--json", dest="json_out", type=Path,
                   help="write the results here (default bench-results/bench-<time>.json)")
    p.add_argument("--workdir", type=Path,
                   help="where to put data, caches and mounts (default: a new folder in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="sample imgrepo's mount with py-spy during each phase, writing "
                        "collapsed stacks to DIR (slows imgrepo: not for the figures)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the server to one core and the rest to another")
    p.add_argument("--server", choices=["s3lite", "moto"], default="s3lite",
                   help="the S3 server: scripts/s3lite.py (default; ~10x less CPU per "
                        "request) or moto's server mode")
    p.add_argument("--rclone-arg", dest="rclone_args", action="append", default=[],
                   help="extra argument for rclone mount (repeatable)")
    p.add_argument("--s3fs-arg", dest="s3fs_args", action="append", default=[],
                   help="extra argument for s3fs (repeatable)")
    return p.parse_args(argv)


def check_environment(tools: list[str], imgrepo_cmd: Path) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (mounting, dropping the page cache)")
    if not os.path.exists("/dev/fuse"):
        raise BenchError("/dev/fuse is missing")
    need = {"rclone-writes": "rclone", "rclone-full": "rclone", "s3fs": "s3fs"}
    for tool in tools:
        binary = need.get(tool)
        if binary and not shutil.which(binary):
            raise BenchError(f"{binary} is not installed (scripts/bench.sh installs it)")
    if "imgrepo" in tools and not imgrepo_cmd.exists():
        raise BenchError(f"{imgrepo_cmd} is missing (scripts/bench.sh sets up .venv)")
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError as exc:
        raise BenchError(f"{exc.name} is not installed in this Python "
                         "(run scripts/bench.sh, which uses the project's .venv)") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--server-child"]:
        server_main(int(argv[1]))
        return 0
    if argv[:1] == ["--relay-child"]:
        relay_main(int(argv[1]), int(argv[2]), argv[3], int(argv[4]))
        return 0
    args = parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        say(f"error: unknown tool(s) {','.join(unknown) or '(none)'}; choose from "
            f"{','.join(TOOLS)}")
        return 2
    tools = [t for t in TOOLS if t in tools]
    q = args.quick
    sizes = Sizes(files=args.files or (40 if q else 1000),
                  file_kib=args.file_kib or (64 if q else 200),
                  big_mib=args.big_mib or (32 if q else 1024),
                  ls_entries=args.ls_entries or (300 if q else 10000),
                  rounds=args.rounds or (1 if q else 3))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="imgrepo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    # The mounts' control sockets live in XDG_RUNTIME_DIR: keep it short (AF_UNIX paths are
    # limited to 107 bytes, and a deep --workdir would exceed that).
    run_dir = Path(tempfile.mkdtemp(prefix="ibench-"))
    os.environ.update({**AWS_ENV, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                       "XDG_CACHE_HOME": str(home / ".cache"),
                       "XDG_DATA_HOME": str(home / ".local/share"),
                       "XDG_RUNTIME_DIR": str(run_dir)})
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)
    sys.path.insert(0, str(REPO))
    cores = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cores) >= 2
    server_core = cores[0] if pin else -1
    if pin:
        os.sched_setaffinity(0, set(cores[1:]))  # mounts and workloads inherit this
    bench = Bench(args, sizes, tools, work)
    started = time.perf_counter()
    interrupted = False
    try:
        check_environment(tools, bench.imgrepo_cmd)
        import moto
        config: dict[str, Any] = {
            "tools": tools,
            "sizes": vars(sizes),
            "quick": q,
            "server": ("scripts/s3lite.py (in memory)" if args.server == "s3lite" else
                       f"moto {moto.__version__} server mode (objects kept in memory, "
                       "range reads without copies, versionId=null accepted)"),
            "pinning": (f"server and relay on core {server_core}, mounts and workloads on "
                        f"cores {','.join(map(str, cores[1:]))}") if pin else "none",
            "machine": f"{platform.machine()}, {len(cores)} cores, {platform.release()}",
            "imgrepo": _imgrepo_version(),
            "rclone": tool_version(["rclone", "version"]) if any(
                t.startswith("rclone") for t in tools) else None,
            "s3fs": tool_version(["s3fs", "--version"]) if "s3fs" in tools else None,
            "rclone_args": args.rclone_args,
            "s3fs_args": args.s3fs_args,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        say(f"tools {','.join(tools)}; {sizes.files} files of ~{sizes.file_kib} KiB, "
            f"{sizes.big_mib} MiB file, {sizes.ls_entries} entries, {sizes.rounds} round(s); "
            f"work folder {work}")
        if not all(t in SERVERLESS for t in tools):
            # What one client's round keeps in the server at most: the big file and two
            # copies of the small ones; touched once so every client finds it ready.
            warm = sizes.big_mib + 2 * sizes.files * sizes.file_kib // 1024 + 64
            bench.server = Server(work, server_core, args.server, warm_mib=warm)
            bench.server.start()
        bench.data = make_data(work, sizes)
        bench.make_ls_fixtures()
        for rnd in range(1, sizes.rounds + 1):
            for name in tools:
                say(f"round {rnd}/{sizes.rounds}: {name} "
                    f"(at {time.perf_counter() - started:.0f} s)")
                try:
                    bench.run_round(name, rnd)
                except BenchError as exc:
                    say(f"  {name}: {exc}")
                    bench.errors.setdefault(name, []).append(f"round {rnd}: {exc}")
                except (subprocess.TimeoutExpired, OSError, RuntimeError) as exc:
                    say(f"  {name}: {type(exc).__name__}: {exc}")
                    bench.errors.setdefault(name, []).append(
                        f"round {rnd}: {type(exc).__name__}: {exc}")
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
        result = report(bench, config, time.perf_counter() - started)
        out = args.json_out or REPO / "bench-results" / time.strftime("bench-%Y%m%d-%H%M%S.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        say(f"results written to {out}")
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted")
    finally:
        bench.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if bench.errors else 0


def _imgrepo_version() -> str:
    try:
        from fsrepo import __version__
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        return f"{__version__} ({commit})" if commit else __version__
    except ImportError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
