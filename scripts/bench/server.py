"""The S3 server (testservers/s3lite.py, or moto's server mode with fixes) pinned to its
core, behind the byte-counting relay; and the bucket helpers the benchmark uses directly."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from testservers.net import free_port, stop_process, wait_listening

from .host import AWS_ENV, REPO, BenchError, proc_cpu_seconds, say


def _wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    try:
        wait_listening(port, proc, what=what)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


class Server:
    """The S3 server (s3lite or moto), pinned to its core, behind the byte-counting relay."""

    def __init__(self, work: Path, core: int, kind: str = "s3lite", warm_mib: int = 0,
                 rtt_ms: float = 0.0) -> None:
        self.kind = kind
        self.rtt_ms = rtt_ms  # round-trip time the relay adds between the tools and it
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
            cmd = [sys.executable, "-m", "testservers.moto", str(self.port)]
        else:
            cmd = [sys.executable, "-m", "testservers.s3lite",
                   "--port", str(self.port), "--warm-mib", str(self.warm_mib)]
        self.proc = subprocess.Popen(cmd,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env=env, preexec_fn=self._pin, cwd=REPO)
        _wait_listening(self.port, self.proc, f"the {self.kind} server")
        self.counter_path.write_bytes(b"\0" * 16)
        self.relay = subprocess.Popen(
            [sys.executable, "-m", "scripts.bench.relay",
             str(self.relay_port), str(self.port), str(self.counter_path), str(self.core),
             str(self.rtt_ms)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO)
        _wait_listening(self.relay_port, self.relay, "the counting relay")
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

    def relay_cpu_seconds(self) -> float:
        """CPU the relay has used so far (it shares the server's core)."""
        assert self.relay is not None
        return proc_cpu_seconds(self.relay.pid)

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
