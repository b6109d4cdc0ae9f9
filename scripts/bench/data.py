"""The workloads' input: the small files and the big file (random bytes, fixed sizes), and
W5's directory of many entries made beforehand in each tool's own format."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .host import MiB, say
from .metrics import PEERS, SERVERLESS
from .server import Server

# W5's directory for each tool: (bucket, prefix, local folder or None)
LsFixture = tuple[str, str, Path | None]


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



def make_ls_fixtures(server: Server | None, work: Path, tools: list[str],
                     entries: int) -> dict[str, LsFixture]:
    """W5's directory of `entries` empty files, for every tool in `tools`."""
    made: dict[str, LsFixture] = {}
    names = [f"IMG_{i:05d}.jpg" for i in range(entries)]
    if "local" in tools or "fusepass" in tools:
        d = work / "ls-local" / "big"
        d.mkdir(parents=True)
        for name in names:
            (d / name).touch()
        made["local"] = made["fusepass"] = ("", "", d.parent)
    if all(t in SERVERLESS for t in tools):
        return made
    assert server is not None
    bucket = "bench-ls"
    server.create_bucket(bucket)
    if any(t in PEERS for t in tools):
        t0 = time.perf_counter()
        # plain objects: what rclone and s3fs show (directory markers as s3fs makes them)
        server.put_many(bucket, ["plain/", "plain/big/"] +
                        [f"plain/big/{name}" for name in names])
        say(f"  {entries} objects for rclone/s3fs's W5 in {time.perf_counter() - t0:.1f} s")
        for peer in PEERS:
            made[peer] = (bucket, "plain", None)
    if "imgrepo" in tools:
        _make_imgrepo_dir(server, bucket, "imgrepo", names)
        made["imgrepo"] = (bucket, "imgrepo", None)
    return made


def _make_imgrepo_dir(server: Server, bucket: str, prefix: str, names: list[str]) -> None:
    """imgrepo's format: descriptor, root manifest, one manifest of n entries."""
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
    now = time.time_ns()
    empty = hashlib.sha256(b"").hexdigest()
    dir_id = uuid.uuid4().hex
    descriptor = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "hash": "sha256",
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "repo_id": uuid.uuid4().hex}
    root = Manifest(ROOT_ID, {b"big": DirEntry(dir_id, now)})
    big = Manifest(dir_id, {n.encode(): FileEntry(empty, 0, now) for n in names})
    c = server.client
    c.put_object(Bucket=bucket, Key=f"{prefix}/{DESCRIPTOR_KEY}",
                 Body=json.dumps(descriptor).encode())
    c.put_object(Bucket=bucket, Key=f"{prefix}/{blob_key(empty)}", Body=b"")
    c.put_object(Bucket=bucket, Key=f"{prefix}/{manifest_key(ROOT_ID)}",
                 Body=serialise_manifest(root))
    c.put_object(Bucket=bucket, Key=f"{prefix}/{manifest_key(dir_id)}",
                 Body=serialise_manifest(big))
