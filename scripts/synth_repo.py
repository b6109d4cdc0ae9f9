#!/usr/bin/env python3
"""Generate a synthetic imgrepo repository shaped like a photo library, for scale measures.

    python scripts/synth_repo.py file:///tmp/photos --files 100000 --folders 1000
    python scripts/synth_repo.py s3://bucket/prefix --endpoint-url http://127.0.0.1:9000 \\
        --files 1000000 --folders 10000 --distinct-blobs

The tree is year / month / event (`2019/07/2019-07-14 Beach/IMG_04211.JPG`): `--folders`
event folders hold the `--files` files, spread over up to 20 years of months. Everything is
written in the project's own format (keys from `fsrepo.repository`, manifests serialised by
`fsrepo.manifest`) through the `Store` interface, many writes in flight, so the result is a
repository any mount, `--verify` or `--gc` reads like a real one.

Blob content: by default a few distinct blobs (`--shared-blobs`, sizes up to `--blob-kib`)
that every file shares, so generating a million files costs a few thousand manifest writes;
with `--distinct-blobs` every file gets its own tiny blob (what `--verify` and `--gc` must
hold in memory with a real library). Every manifest entry names a blob that exists with
exactly its size, unless `--no-blobs` leaves the distinct blobs unwritten (a tree to walk,
not to read). The location must be empty. The same `--seed` gives the same repository.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROG = "synth_repo"
LAST_YEAR = 2024
MAX_YEARS = 20
EVENTS = ["Beach", "Birthday", "Hiking", "Wedding", "Christmas", "Garden", "Zoo", "Picnic",
          "Concert", "Road trip", "Skiing", "Graduation", "Museum", "Camping", "Harbour",
          "Market", "Lake", "Snow", "Party", "Visit grandparents"]
# (prefix, extension, weight): what phones and cameras name their files
CAMERAS = [("IMG_", ".JPG", 70), ("IMG_", ".HEIC", 12), ("DSC", ".JPG", 10),
           ("VID_", ".MP4", 4), ("PXL_", ".jpg", 4)]


@dataclass
class Event:
    """One leaf folder: its directory id, name, date and how many files it holds."""

    dir_id: str
    name: bytes
    mtime_ns: int
    files: int


@dataclass
class Month:
    dir_id: str
    year: int
    month: int
    events: list[Event] = field(default_factory=list)


@dataclass
class Plan:
    """The whole tree's shape, without its files (those are made folder by folder)."""

    years: dict[int, str]  # year -> dir id
    months: list[Month]

    @property
    def directories(self) -> int:
        return len(self.years) + len(self.months) + sum(len(m.events) for m in self.months)


@dataclass
class Blob:
    sha256: str
    data: bytes


@dataclass
class Tally:
    blobs: int = 0
    blob_bytes: int = 0
    manifests: int = 0
    manifest_bytes: int = 0
    files: int = 0
    file_bytes: int = 0


def new_dir_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def epoch_ns(year: int, month: int, day: int) -> int:
    return int(time.mktime((year, month, day, 12, 0, 0, 0, 0, 0))) * 1_000_000_000


def plan_tree(files: int, folders: int, rng: random.Random) -> Plan:
    """Spread `folders` events over up to 20 years of months, `files` over the events."""
    n_months = max(1, min(folders, MAX_YEARS * 12))
    first_year = LAST_YEAR - (n_months - 1) // 12
    years: dict[int, str] = {}
    months: list[Month] = []
    for index in range(n_months):
        year, month = first_year + index // 12, 1 + index % 12
        if year not in years:
            years[year] = new_dir_id(rng)
        months.append(Month(new_dir_id(rng), year, month))
    per_folder, extra = divmod(files, folders)
    for index in range(folders):
        month = months[index % n_months]
        day = 1 + (len(month.events) * 3 + rng.randrange(3)) % 28
        label = EVENTS[rng.randrange(len(EVENTS))]
        name = f"{month.year}-{month.month:02d}-{day:02d} {label} {index:05d}".encode()
        month.events.append(Event(new_dir_id(rng), name, epoch_ns(month.year, month.month, day),
                                  per_folder + (1 if index < extra else 0)))
    return Plan(years, months)


def shared_blobs(count: int, max_kib: int, rng: random.Random) -> list[Blob]:
    """`count` distinct blobs of random bytes, between half of `max_kib` and all of it."""
    out = []
    for _ in range(count):
        size = rng.randint(max(1, max_kib * 512), max(1, max_kib * 1024))
        data = rng.randbytes(size)
        out.append(Blob(hashlib.sha256(data).hexdigest(), data))
    return out


def distinct_blob(seed: int, number: int) -> Blob:
    data = f"imgrepo synthetic photo {number} (seed {seed})\n".encode()
    return Blob(hashlib.sha256(data).hexdigest(), data)


def file_names(count: int, rng: random.Random) -> Iterator[bytes]:
    """Camera-style names, unique within one folder (one counter per folder)."""
    weights = [w for _, _, w in CAMERAS]
    start = rng.randrange(1, 9000)
    for k in range(count):
        prefix, ext, _ = rng.choices(CAMERAS, weights)[0]
        yield f"{prefix}{start + k:05d}{ext}".encode()


def writes(plan: Plan, args: argparse.Namespace, rng: random.Random,
           tally: Tally) -> Iterator[tuple[str, bytes]]:
    """Every (key, bytes) to store: blobs before the manifests that name them, and each
    directory's manifest after its children's."""
    from fsrepo.manifest import ROOT_ID, DirEntry, FileEntry, Manifest, serialise_manifest
    from fsrepo.repository import blob_key, manifest_key

    def manifest(dir_id: str, entries: dict) -> tuple[str, bytes]:
        data = serialise_manifest(Manifest(dir_id, entries))
        tally.manifests += 1
        tally.manifest_bytes += len(data)
        return manifest_key(dir_id), data

    def blob(b: Blob) -> tuple[str, bytes]:
        tally.blobs += 1
        tally.blob_bytes += len(b.data)
        return blob_key(b.sha256), b.data

    pool: list[Blob] = []
    if not args.distinct_blobs:
        pool = shared_blobs(args.shared_blobs, args.blob_kib, rng)
        for b in pool:
            yield blob(b)
    number = 0
    for month in plan.months:
        for event in month.events:
            entries: dict = {}
            for k, name in enumerate(file_names(event.files, rng)):
                if args.distinct_blobs:
                    b = distinct_blob(args.seed, number)
                    if not args.no_blobs:
                        yield blob(b)
                else:
                    b = pool[rng.randrange(len(pool))]
                number += 1
                tally.files += 1
                tally.file_bytes += len(b.data)
                entries[name] = FileEntry(b.sha256, len(b.data),
                                          event.mtime_ns + k * 7_000_000_000)
            yield manifest(event.dir_id, entries)
        yield manifest(month.dir_id, {
            event.name: DirEntry(event.dir_id, event.mtime_ns) for event in month.events})
    for year, year_id in plan.years.items():
        yield manifest(year_id, {
            f"{m.month:02d}".encode(): DirEntry(m.dir_id, epoch_ns(m.year, m.month, 1))
            for m in plan.months if m.year == year})
    yield manifest(ROOT_ID, {
        str(year).encode(): DirEntry(year_id, epoch_ns(year, 1, 1))
        for year, year_id in plan.years.items()})


async def generate(args: argparse.Namespace) -> tuple[Plan, Tally]:
    import trio

    from fsrepo.repository import open_repository
    from fsrepo.store import open_store

    store = open_store(args.location, args.endpoint_url)
    try:
        async for info in store.list(""):
            raise SystemExit(f"{PROG}: {store.url} is not empty (found {info.key!r}); "
                             "give an empty folder or prefix")
        await open_repository(store, create=True)
        rng = random.Random(args.seed)
        plan = plan_tree(args.files, args.folders, rng)
        tally = Tally()
        slots = trio.Semaphore(args.in_flight)

        async def put(key: str, data: bytes) -> None:
            try:
                await store.put(key, data, if_none_match=True)
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for key, data in writes(plan, args, rng, tally):
                await slots.acquire()
                nursery.start_soon(put, key, data)
        return plan, tally
    finally:
        await store.aclose()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("location", help="file:///empty/folder or s3://bucket/prefix")
    p.add_argument("--endpoint-url", help="S3 endpoint (e.g. a local test server)")
    p.add_argument("--files", type=int, default=10_000, help="files in all (default 10,000)")
    p.add_argument("--folders", type=int, default=100,
                   help="event folders holding the files (default 100)")
    p.add_argument("--distinct-blobs", action="store_true",
                   help="one tiny distinct blob per file, instead of a few shared ones")
    p.add_argument("--no-blobs", action="store_true",
                   help="with --distinct-blobs: write the manifests only (their entries name "
                        "blobs that are not written: the tree walks, its files do not read), "
                        "for measures of walks where a million blob writes would take longer "
                        "than the measure")
    p.add_argument("--shared-blobs", type=int, default=16,
                   help="distinct blobs the files share (default 16)")
    p.add_argument("--blob-kib", type=int, default=64,
                   help="largest shared blob in KiB (sizes vary from half to this; default 64)")
    p.add_argument("--in-flight", type=int, default=64, help="writes in flight (default 64)")
    p.add_argument("--seed", type=int, default=1, help="the same seed makes the same repository")
    args = p.parse_args(argv)
    if args.folders < 1 or args.files < 0 or args.shared_blobs < 1 or args.in_flight < 1:
        p.error("--folders, --shared-blobs and --in-flight must be at least 1, --files >= 0")
    if args.no_blobs and not args.distinct_blobs:
        p.error("--no-blobs goes with --distinct-blobs (the shared blobs are few and written)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import trio

    t0 = time.perf_counter()
    plan, tally = trio.run(generate, args)
    elapsed = time.perf_counter() - t0
    print(f"{PROG}: wrote {tally.files:,} files in {args.folders:,} event"
          f" folders ({plan.directories:,} directories: {len(plan.years)} years, "
          f"{len(plan.months)} months) to {args.location}")
    print(f"{PROG}: {tally.blobs:,} blobs ({tally.blob_bytes / 2**20:.1f} MiB), "
          f"{tally.manifests:,} manifests ({tally.manifest_bytes / 2**20:.1f} MiB), "
          f"{tally.file_bytes / 2**20:.1f} MiB of files in the tree; "
          f"{elapsed:.1f} s ({tally.files / max(elapsed, 1e-9):,.0f} files/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
