"""moto's S3 server on 127.0.0.1, two ways: `MotoServer` runs `python -m moto.server` (with
conditional PUTs made atomic, as on S3: `testservers.moto_atomic`)
as a child process for the tests; `serve_like_s3` (`python -m testservers.moto PORT`) is the
benchmark's --server moto, with fixes that make it answer like S3 where the mounted tools
notice.

    with MotoServer() as moto:            # free port, waits until it answers
        client = moto.client()            # a boto3 S3 client pointed at it
        moto.create_bucket("b")
        moto.reset()                      # forget every bucket (POST /moto-api/reset)
        moto.stop(); moto.start()         # same port again -- but EVERYTHING IS LOST:

moto keeps all state in memory, so `stop()`/`start()`/`restart()` simulate an outage only
for tests that do not need the data afterwards. To cut the network while keeping the data,
put `testservers.s3proxy.S3Proxy` in front and `pause()`/`resume()` it instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .net import free_port

# What boto3 needs to talk to moto; tests must never reach real AWS.
TEST_AWS_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


class MotoServer:
    """moto's S3 server (`python -m moto.server`) on 127.0.0.1, as a child process."""

    def __init__(
        self,
        port: int | None = None,
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="moto-")) / "moto.log"
        self._env = {**os.environ, **TEST_AWS_ENV, **(env or {})}
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (no-op if running) and wait until it answers HTTP. A restarted server is
        empty: moto has no persistence."""
        if self.running:
            return
        for _attempt in range(3):
            if self._spawn():
                return
            if self._fixed_port:
                break
            self.port = free_port()  # lost a race for the port: try another one
        raise RuntimeError(f"moto server did not start on {self.url}; log:\n{self._log_tail()}")

    def _spawn(self) -> bool:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "testservers.moto_atomic", "-H", "127.0.0.1", "-p",
                 str(self.port)],
                cwd=Path(__file__).resolve().parent.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
            )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if _answers(self.url + "/moto-api/"):
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        """Terminate (then kill) the server. All buckets and objects are lost."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self) -> None:
        """stop() then start() on the same port -- with empty state (see module docstring)."""
        self.stop()
        self._fixed_port = True
        self.start()

    def _post(self, path: str, body: bytes = b"") -> None:
        # Not a form: moto reads the raw body, which Flask empties for form content types.
        request = urllib.request.Request(
            self.url + path,
            data=body,
            method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()

    def reset(self) -> None:
        """Forget all state (every bucket, object, IAM user) without restarting."""
        self._post("/moto-api/reset")

    def enable_auth(self, free_requests: int = 0) -> None:
        """Make moto check credentials and IAM policies after `free_requests` more requests.
        Affects every client of this server: use a private server for it."""
        self._post("/moto-api/reset-auth", str(free_requests).encode())

    def disable_auth(self) -> None:
        self._post("/moto-api/reset-auth", b"inf")

    def client(self, **kwargs: Any) -> Any:
        """A boto3 S3 client for this server, with the test credentials."""
        import boto3
        from botocore.config import Config

        params: dict[str, Any] = {
            "endpoint_url": self.url,
            "region_name": TEST_AWS_ENV["AWS_DEFAULT_REGION"],
            "aws_access_key_id": TEST_AWS_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": TEST_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        }
        params.update(kwargs)
        return boto3.client("s3", **params)

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it (frees moto's memory between tests)."""
        client = self.client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents") or ()]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
            uploads = client.list_multipart_uploads(Bucket=name).get("Uploads") or ()
            for upload in uploads:
                client.abort_multipart_upload(
                    Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
                )
            client.delete_bucket(Bucket=name)
        finally:
            client.close()

    def _log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_like_s3(port: int) -> None:
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


if __name__ == "__main__":
    serve_like_s3(int(sys.argv[1]))
