"""A cold `find` through the mount's core at a given round-trip time, without FUSE:
depth-first, each directory opened (readdirplus: every entry looked up, as the kernel
does), over a synthetic photo library (year/month/event) in a file:// repository whose
GETs are delayed by the RTT. Prints the time, the GETs, and the process's RSS after the
walk and after the kernel forgot every inode (the idle release: views trimmed, the heap
given back).

    python -m scripts.cold_walk [FOLDERS] [FILES_PER_FOLDER] [RTT_MS] [--no-prefetch]
                                [--trace]

--trace lists what the walk left in the Python heap once forgotten
(tracemalloc: slower, and its own bookkeeping counts in the RSS).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio

from fsrepo.config import Settings
from fsrepo.engine import Engine, StateLock
from fsrepo.inodes import ROOT_INO
from fsrepo.manifest import ROOT_ID, DirEntry, Entry, FileEntry, Manifest, serialise_manifest
from fsrepo.repository import manifest_key, open_repository
from fsrepo.store import open_store


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_library(root: Path, folders: int, per_folder: int) -> None:
    """year/month/event folders, `per_folder` photos in each event."""
    (root / "dirs").mkdir(parents=True, exist_ok=True)

    def put(dir_id: str, entries: dict[bytes, Entry]) -> None:
        (root / manifest_key(dir_id)).write_bytes(serialise_manifest(Manifest(dir_id, entries)))

    years: dict[bytes, Entry] = {}
    months: dict[str, dict[bytes, Entry]] = {}
    n = 0
    for f in range(folders):
        year, month = f"y{f % 10}", f"y{f % 10}m{(f // 10) % 12}"
        years[year.encode()] = DirEntry(year, 0)
        months.setdefault(year, {})[month.encode()] = DirEntry(month, 0)
        event = f"e{f:06d}"
        entries: dict[bytes, Entry] = {}
        for i in range(per_folder):
            sha = hashlib.sha256(b"%d" % n).hexdigest()
            n += 1
            entries[b"IMG_%05d.JPG" % i] = FileEntry(sha, 3_000_000 + i, 0)
        put(event, entries)
        months.setdefault(month, {})[event.encode()] = DirEntry(event, 0)
    put(ROOT_ID, years)
    for dir_id, entries in months.items():
        put(dir_id, entries)


async def walk(folders: int, per_folder: int, rtt: float, prefetch: bool, tmp: Path) -> None:
    settings = Settings(storage=f"file://{tmp / 'repo'}", cache_root=tmp / "cache")
    store = open_store(settings.storage, None, None)
    await open_repository(store, create=True)
    write_library(tmp / "repo", folders, per_folder)
    lock = StateLock(settings.state_dir())
    engine = Engine(settings, store)
    gets = 0
    real_get = store.get

    async def slow_get(key: str, *args: object, **kw: object) -> object:
        nonlocal gets
        gets += 1
        await trio.sleep(rtt)
        return await real_get(key, *args, **kw)

    store.get = slow_get  # type: ignore[method-assign]
    ns = engine.ns
    try:
        await engine.open()
        async with trio.open_nursery() as nursery:
            if prefetch:
                nursery.start_soon(ns.prefetcher.run)
            tracing = "--trace" in sys.argv
            if tracing:
                tracemalloc.start()
                before = tracemalloc.take_snapshot()
            start_rss, started = rss_mib(), time.monotonic()
            held: list[int] = []

            async def visit(ino: int) -> None:
                names = await ns.open_listing(ino)
                view, ancestors = await ns.loaded_view(ino)
                subdirs = []
                for name, _ in names:
                    node, entry = ns.lookup_loaded(ino, view, name, ancestors)
                    ns.looked_up(node)
                    held.append(node.ino)
                    if isinstance(entry, DirEntry):
                        subdirs.append(node.ino)
                ns.close_listing(ino)
                for sub in subdirs:
                    await visit(sub)

            await visit(ROOT_INO)
            took, walked_rss = time.monotonic() - started, rss_mib()
            walked_views, walked_entries = len(ns.views), ns.views.entries_held
            for ino in reversed(held):
                ns.forget(ino, 1)
            ns.views.trim(0)  # what the idle release does (Namespace.release_when_idle)
            if "--no-compact" not in sys.argv:
                ns.inodes.compact()
                ns.views.compact()
            ns.heap.give_back()
            print(f"{folders} folders x {per_folder} files at {rtt * 1000:.0f} ms RTT, "
                  f"prefetch {'on' if prefetch else 'off'}: {took:.1f} s, {gets} GETs; RSS "
                  f"{start_rss:.0f} MiB before, {walked_rss:.0f} MiB after the walk "
                  f"({len(held)} inodes held, {walked_entries} entries in "
                  f"{walked_views} views), {rss_mib():.0f} MiB once forgotten "
                  f"({len(ns.inodes.nodes)} inodes, {len(ns.views)} views)")
            held.clear()
            if tracing:
                after = tracemalloc.take_snapshot()
                print("what the walk left in the Python heap, by where it was allocated:")
                for stat in after.compare_to(before, "lineno")[:15]:
                    print(f"  {stat}")
            print(f"then {rss_mib():.0f} MiB with the walk's own list gone; the remote index "
                  f"holds {len(engine.remote_index.remote)} blob ids")
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
        engine.close()
        lock.release()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    folders = int(args[0]) if args else 1000
    per_folder = int(args[1]) if len(args) > 1 else 100
    rtt = (float(args[2]) if len(args) > 2 else 20.0) / 1000
    with tempfile.TemporaryDirectory(prefix="imgrepo-cold-walk-") as tmp:
        trio.run(walk, folders, per_folder, rtt, "--no-prefetch" not in sys.argv, Path(tmp))


if __name__ == "__main__":
    main()
