"""Peak Python heap of `--verify` and `--gc` over a synthetic repository held in memory
(tracemalloc; the repository's own bytes are not counted).

    python -m scripts.maintenance_memory [FILES] [FOLDERS]
"""

from __future__ import annotations

import hashlib
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator

import trio

from fsrepo.errors import ObjectNotFound
from fsrepo.maintenance.gc import collect
from fsrepo.maintenance.verify import verify
from fsrepo.manifest import ROOT_ID, DirEntry, FileEntry, Manifest, serialise_manifest
from fsrepo.repository import blob_key, manifest_key
from fsrepo.store.base import ObjectInfo, StoredObject


class MemoryRepository:
    """Just what verify and gc read: `get` and `list` over a dict of objects."""

    def __init__(self, files: int, folders: int) -> None:
        self.objects: dict[str, bytes] = {}
        self.blobs: list[tuple[str, int]] = []
        per_folder = files // folders
        root: dict[bytes, DirEntry | FileEntry] = {}
        n = 0
        for f in range(folders):
            dir_id = f"d{f:08d}"
            root[b"event-%d" % f] = DirEntry(dir_id, 0)
            entries: dict[bytes, DirEntry | FileEntry] = {}
            for i in range(per_folder):
                sha = hashlib.sha256(b"%d" % n).hexdigest()
                n += 1
                entries[b"IMG_%05d.JPG" % i] = FileEntry(sha, 3_000_000 + i, 0)
                self.blobs.append((sha, 3_000_000 + i))
            self.objects[manifest_key(dir_id)] = serialise_manifest(Manifest(dir_id, entries))
        self.objects[manifest_key(ROOT_ID)] = serialise_manifest(Manifest(ROOT_ID, root))
        self.blobs.sort()

    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject:
        data = self.objects.get(key)
        if data is None:
            raise ObjectNotFound(key)
        return StoredObject(data, "e")

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        if prefix == "blobs/":
            for sha, size in self.blobs:
                yield ObjectInfo(blob_key(sha), size, 0.0)
        else:
            for key in sorted(k for k in self.objects if k.startswith(prefix)):
                yield ObjectInfo(key, len(self.objects[key]), 0.0)


def peak(label: str, run: object) -> None:
    tracemalloc.start()
    started = time.monotonic()
    result = trio.run(run)  # type: ignore[arg-type]
    took = time.monotonic() - started
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{label}: peak {top / 2**20:.0f} MiB of Python heap, {took:.1f} s ({result})")


def main() -> None:
    files = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    folders = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    repo = MemoryRepository(files, folders)

    async def run_verify() -> str:
        v = await verify(repo)  # type: ignore[arg-type]
        return f"{v.files} files, {len(v.problems)} problems"

    async def run_gc() -> str:
        c = await collect(repo, 24, dry_run=True)  # type: ignore[arg-type]
        return f"{c.blobs} blobs, {c.referenced} referenced"

    peak("verify", run_verify)
    peak("gc --dry-run", run_gc)


if __name__ == "__main__":
    main()
