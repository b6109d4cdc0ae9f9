#!/usr/bin/env python3
"""What appending to a large file already in the bucket sends: counted at the proxy.

    python -m scripts.append_chunks                 # a 1 GiB file, 1 MiB appended
    python -m scripts.append_chunks --big-mib 64 --append-kib 256

It starts the in-memory S3 server (testservers/s3lite.py) with the counting proxy
(testservers/s3proxy.py) in front, mounts an empty repository through the proxy, writes the
big file with `dd bs=1M` and waits until it is in the bucket. Then, on a fresh mount with
the same cache (the file cached), and on one with an empty cache (the file only in the
bucket: the append first fetches and verifies its chunks), it appends to the file and
counts the blob PUTs and the bytes they carried until the change is in the bucket. The
issue's target: at most 2 chunks sent for the append. The file is read back through a
third mount with an empty cache and compared.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.scale_bench import BUCKET, BenchError, MiB, Mount, Servers, environment, say

TARGET_CHUNKS = 2


def make_big(path: Path, size: int) -> None:
    """A file of `size` bytes that differs in every MiB (so in every chunk)."""
    with open(path, "wb") as out:
        for n in range(0, size, MiB):
            block = hashlib.sha256(n.to_bytes(8, "big")).digest() * (MiB // 32)
            out.write(block[:min(MiB, size - n)])


def wait_durable(mnt: Path) -> None:
    from fsrepo import control
    for reply in control.request(mnt, {"cmd": "wait"}):
        if reply.get("error"):
            raise BenchError(f"waiting for the upload: {reply['error']}")


def blob_puts(servers: Servers) -> tuple[int, int]:
    """PUTs of blob objects the proxy saw since its last reset, and their body bytes."""
    puts = [s for s in servers.proxy.requests
            if s.method == "PUT" and "/blobs/" in s.path and s.status == 200]
    return len(puts), sum(s.body_size for s in puts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="append_chunks", description=__doc__.split("\n\n")[0])
    p.add_argument("--big-mib", type=int, default=1024, help="size of the file (MiB)")
    p.add_argument("--append-kib", type=int, default=1024, help="bytes appended (KiB)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="imgrepo-append-"))
    runtime = Path(tempfile.mkdtemp(prefix="iappend-"))
    env = environment(work, runtime)
    os.environ.update(env)  # the control client finds the mounts' sockets the same way
    servers = Servers(work)
    mounts: list[Mount] = []
    storage = f"s3://{BUCKET}/repo"

    def mount(name: str, cache: str) -> Mount:
        m = Mount(work / f"mnt-{name}", storage, servers.proxy.url, work / cache, 60, env,
                  work / f"mount-{name}.log")
        mounts.append(m)
        m.start()
        return m

    try:
        servers.start()
        source = work / "big.bin"
        size = args.big_mib * MiB
        make_big(source, size)
        tail = hashlib.sha256(b"appended").digest() * (args.append_kib * 1024 // 32)
        first = mount("write", "cache")
        subprocess.run(["dd", f"if={source}", f"of={first.mnt / 'big.bin'}", "bs=1M",
                        "status=none"], check=True)
        wait_durable(first.mnt)
        first.unmount()
        results = []
        for label, cache in (("cached", "cache"), ("not cached", "cache-empty")):
            m = mount(label.replace(" ", "-"), cache)
            servers.proxy.reset_counts()
            t0 = time.perf_counter()
            with open(m.mnt / "big.bin", "ab") as fh:
                fh.write(tail)
            wait_durable(m.mnt)
            elapsed = time.perf_counter() - t0
            puts, sent = blob_puts(servers)
            m.unmount()
            results.append((label, puts, sent, elapsed))
        check = mount("check", "cache-check")
        expected = hashlib.sha256()
        with open(source, "rb") as fh:
            while data := fh.read(MiB):
                expected.update(data)
        expected.update(tail * 2)  # appended once by each of the two mounts
        with open(check.mnt / "big.bin", "rb") as fh:
            got = hashlib.sha256()
            while data := fh.read(MiB):
                got.update(data)
        check.unmount()
        if got.hexdigest() != expected.hexdigest():
            raise BenchError("the file read back is not what was written")
        print(f"append of {args.append_kib} KiB to a {args.big_mib} MiB file in the bucket "
              "(read back whole through a fresh mount: ok)")
        for label, puts, sent, elapsed in results:
            verdict = "ok" if puts <= TARGET_CHUNKS else "MISSED"
            print(f"  file {label:10}: {puts} blob PUT(s), {sent / MiB:.2f} MiB sent, "
                  f"durable in {elapsed:.1f} s  (target <= {TARGET_CHUNKS} chunks: {verdict})")
        return 0 if all(r[1] <= TARGET_CHUNKS for r in results) else 1
    except (BenchError, subprocess.CalledProcessError, OSError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        for m in mounts:
            m.stop()
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
