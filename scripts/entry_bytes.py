"""Bytes of Python heap per directory entry held by a mount: a parsed manifest's entries
in a directory view, the inode the kernel is handed for each, and each blob id the remote
index holds (one per file this mount uploaded or moved; tracemalloc).

    python -m scripts.entry_bytes [FILES]
"""

from __future__ import annotations

import hashlib
import sys
import tracemalloc

from fsrepo.inodes import InodeTable
from fsrepo.manifest import FileEntry, Manifest, parse_manifest, serialise_manifest
from fsrepo.remote_index import RemoteIndex


def manifest_body(files: int) -> bytes:
    """A photo folder's manifest: names like a camera's, distinct contents."""
    entries = {f"IMG_{i:05d}.JPG".encode(): FileEntry(
        hashlib.sha256(str(i).encode()).hexdigest(), 3_000_000 + i, 1_700_000_000_000_000_000 + i)
        for i in range(files)}
    return serialise_manifest(Manifest("d" * 32, entries))


def measure(files: int) -> tuple[float, float, float]:
    """(bytes per parsed entry, bytes per inode, bytes per blob id in the remote index once
    the manifest is gone) for one directory of `files` files, each its own blob."""
    body = manifest_body(files)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    manifest, _ = parse_manifest(body, "d" * 32)
    parsed = tracemalloc.get_traced_memory()[0]
    table = InodeTable()
    for name, entry in manifest.entries.items():
        table.node_for(2, name, entry)
    after = tracemalloc.get_traced_memory()[0]
    index = RemoteIndex()
    index.note_known({e.sha256 for e in manifest.entries.values() if isinstance(e, FileEntry)})
    del manifest, table
    gone = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (parsed - before) / files, (after - parsed) / files, (gone - before) / files


def main() -> None:
    files = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    per_entry, per_inode, per_blob = measure(files)
    print(f"{files} files: {per_entry:.0f} bytes per manifest entry, "
          f"{per_inode:.0f} bytes per inode, {per_blob:.0f} bytes per blob id in the "
          f"remote index")


if __name__ == "__main__":
    main()
