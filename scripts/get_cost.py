"""What a manifest GET costs the S3 store's client: CPU per request and wall time for a
batch, through boto3 or the direct path, at a given number in flight and round-trip time.

    python -m scripts.get_cost [--gets 2000] [--size 17000] [--rtt-ms 20]
                               [--in-flight 16,48] [--conditional]

It starts the in-memory S3 server (testservers/s3lite.py) on 127.0.0.1, with the
benchmark's delaying relay in front when --rtt-ms is set (both in processes of their own,
so this process's CPU time is the client's alone), puts --gets objects of --size bytes (a
manifest of ~100 files is ~17 kB), then GETs them all through `S3Store.get` with each
transport and each --in-flight (the store's limiter of small requests), printing the wall
time and the process's CPU time per GET. --conditional sends If-None-Match with the
current etag (the 304 of a revalidation). Figures of this machine, never asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
BUCKET = "getcost"


def start(argv: list[str], port: int, what: str, log: Path) -> subprocess.Popen:
    from testservers.net import wait_listening
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    wait_listening(port, proc, what=what)
    return proc


def measure(url: str, keys: list[str], etags: dict[str, str], transport: str,
            in_flight: int, conditional: bool) -> tuple[float, float]:
    """(wall seconds, CPU ms per GET) of one batch of GETs through a fresh store."""
    from fsrepo.store.s3 import S3Store
    from fsrepo.store.s3blobs import Boto3Blobs

    store = S3Store(BUCKET, "repo", endpoint_url=url, small_concurrency=in_flight)
    if transport == "boto3":
        store.blobs = Boto3Blobs(store._client, BUCKET, store._errors)

    async def batch() -> None:
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(store.get, key, etags[key] if conditional else None)

    trio.run(store.get, keys[0])  # connections, credentials, endpoint: not per request
    cpu, wall = time.process_time(), time.perf_counter()
    trio.run(batch)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    trio.run(store.aclose)
    return wall, cpu * 1000 / len(keys)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gets", type=int, default=2000)
    p.add_argument("--size", type=int, default=17000)
    p.add_argument("--rtt-ms", type=float, default=0.0)
    p.add_argument("--in-flight", default="16,48")
    p.add_argument("--conditional", action="store_true")
    args = p.parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    from testservers.net import free_port

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="get_cost-") as tmp:
        try:
            port = free_port()
            procs.append(start(["testservers.s3lite", "--port", str(port)], port, "s3lite",
                               Path(tmp) / "s3lite.log"))
            url = f"http://127.0.0.1:{port}"
            if args.rtt_ms > 0:
                relay = free_port()
                counters = Path(tmp) / "counters"
                counters.write_bytes(b"\0" * 16)
                procs.append(start(["scripts.bench.relay", str(relay), str(port),
                                    str(counters), "-1", f"{args.rtt_ms:g}"], relay,
                                   "the delaying relay", Path(tmp) / "relay.log"))
                url = f"http://127.0.0.1:{relay}"
            import boto3
            from botocore.config import Config
            client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                                  region_name="us-east-1",
                                  config=Config(s3={"addressing_style": "path"}))
            client.create_bucket(Bucket=BUCKET)
            body = os.urandom(args.size)
            keys = [f"dirs/{i:06d}.json" for i in range(args.gets)]
            etags = {key: client.put_object(Bucket=BUCKET, Key=f"repo/{key}", Body=body)["ETag"]
                     for key in keys}
            print(f"{args.gets} {'conditional (304) ' if args.conditional else ''}GETs of "
                  f"{args.size} bytes, RTT {args.rtt_ms:g} ms; load {os.getloadavg()[0]:.1f}")
            for in_flight in (int(n) for n in args.in_flight.split(",")):
                for transport in ("boto3", "direct"):
                    wall, cpu = measure(url, keys, etags, transport, in_flight,
                                        args.conditional)
                    print(f"  {transport:6} {in_flight:3} in flight: {wall:6.2f} s, "
                          f"{args.gets / wall:7.0f} GET/s, CPU {cpu:.2f} ms per GET")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
