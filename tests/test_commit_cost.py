"""What a manifest commit costs: what its batch changes, not what the folder holds.

- The body written from the kept, entry-by-entry encoded manifest (manifest_cache.py) is
  byte for byte what `serialise_manifest` writes, however the entries changed since.
- A folder committed batch by batch is parsed once, its later commits find it kept, and
  the view updated by the batch's names equals the view computed whole.
- A copy of many files into one folder while someone waits for the upload (`--status
  --wait`, flush mode) takes few manifest writes, not one per finished upload.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio

from fsrepo.chunking import ChunkLists
from fsrepo.inodes import ROOT_INO
from fsrepo.journal import PendingOp
from fsrepo.manifest import (
    Chunks,
    DirEntry,
    FileEntry,
    Manifest,
    SymlinkEntry,
    parse_manifest,
    serialise_manifest,
)
from fsrepo.manifest_cache import WrittenManifests
from fsrepo.merge import Op
from fsrepo.namespace import EMPTY_SHA
from fsrepo.remote_index import RemoteIndex
from fsrepo.repository import blob_key, manifest_key
from fsrepo.store import Store
from fsrepo.store.counting import PUT_IF_MATCH, PUT_IF_NONE_MATCH, CountingStore
from fsrepo.upload_schedule import UploadSchedule

from .coreutil import EngineDriver, read_file, running_engine, settings_for
from .faulty_store import HOLD, Fault, FaultyStore
from .powerloss import PowerLossDisk
from .targets import StorageTarget

SHA = "ab" * 32


def _entry(rng: random.Random) -> FileEntry | DirEntry | SymlinkEntry:
    kind = rng.randrange(5)
    if kind == 0:
        return DirEntry(f"d{rng.getrandbits(124):031x}", rng.randrange(1 << 60),
                        0o700, rng.choice([None, rng.randrange(1 << 60)]))
    if kind == 1:
        target = rng.choice([b"../x", "fé".encode(), b"\xff\xfebad"])
        return SymlinkEntry(target, rng.randrange(1 << 60))
    size = rng.randrange(1, 1 << 30)
    chunks = None
    if kind == 2:
        step = 1 << 22
        chunks = Chunks(step, tuple(f"{rng.getrandbits(256):064x}"
                                    for _ in range(-(-size // step))))
    return FileEntry(f"{rng.getrandbits(256):064x}", size, rng.randrange(1 << 60),
                     rng.choice([0o644, 0o755, 0o600]), chunks)


def _name(rng: random.Random) -> bytes:
    return rng.choice([b"img%d.jpg" % rng.randrange(10_000), "Ünïcode %d \"q\" \\".encode()
                       % rng.randrange(100), b"raw\xff\xfe%d" % rng.randrange(100),
                       "日本 %d".encode() % rng.randrange(100)])


def test_the_kept_encoding_writes_what_serialise_manifest_writes() -> None:
    rng = random.Random(16)
    cache = WrittenManifests()
    for dir_n in range(3):
        dir_id = f"d{dir_n:031x}"
        entries = {_name(rng): _entry(rng) for _ in range(200)}
        for round_n in range(30):
            entries = dict(entries)
            for _ in range(rng.randrange(6)):  # a batch: adds, changes, removals
                name = rng.choice(list(entries)) if entries and rng.random() < 0.5 \
                    else _name(rng)
                if rng.random() < 0.3:
                    entries.pop(name, None)
                else:
                    entries[name] = _entry(rng)
            moved = {f"d{i:031x}": (f"d{i + 1:031x}", b"to\xff%d" % i)
                     for i in range(rng.randrange(3))}
            manifest = Manifest(dir_id, entries, moved,
                                removed=rng.choice([None, (dir_id, b"gone\xfe")]),
                                mtime_ns=rng.choice([None, rng.randrange(1 << 60)]))
            body, fragments = cache.serialise(dir_id, manifest)
            assert body == serialise_manifest(manifest), (dir_n, round_n)
            assert parse_manifest(body, dir_id)[0].entries == entries
            cache.keep(dir_id, f"etag{round_n}", body, manifest, fragments)
            assert cache.get(dir_id, f"etag{round_n}", bytes(body)) is manifest
    # Another version in the local state (another ETag or body) is not the kept one.
    assert cache.get(dir_id, "other", body) is None
    assert cache.get(dir_id, "etag29", body) is None  # (dropped by the miss above)


def test_a_chunk_list_added_to_an_equal_entry_is_encoded_again() -> None:
    """FileEntry's equality ignores its chunk list: the kept fragment of the same content
    without one must not be reused for the entry that now carries it."""
    cache = WrittenManifests()
    plain = FileEntry(SHA, 3 << 22, 1)
    chunked = FileEntry(SHA, 3 << 22, 1, chunks=Chunks(1 << 22, (SHA, SHA, SHA)))
    first = Manifest("d" + "0" * 31, {b"big": plain})
    body, fragments = cache.serialise(first.dir_id, first)
    cache.keep(first.dir_id, "e1", body, first, fragments)
    second = Manifest(first.dir_id, {b"big": chunked})
    assert cache.serialise(first.dir_id, second)[0] == serialise_manifest(second)
    assert b"chunks" in serialise_manifest(second)


def test_kept_manifests_are_bounded_in_number_and_age() -> None:
    now = [0.0]
    cache = WrittenManifests(kept=2, kept_for=10.0, clock=lambda: now[0])
    for n in range(3):
        m = Manifest(f"d{n:031x}", {b"a": FileEntry(SHA, 1, n)})
        body, fragments = cache.serialise(m.dir_id, m)
        cache.keep(m.dir_id, "e", body, m, fragments)
    assert len(cache) == 2 and cache.get(f"d{0:031x}", "e", body) is None
    now[0] = 11.0
    m = Manifest(f"d{9:031x}", {})
    body, fragments = cache.serialise(m.dir_id, m)
    cache.keep(m.dir_id, "e", body, m, fragments)
    assert len(cache) == 1  # the two older ones were not committed for 11 s


@pytest.fixture
def file_storage(tmp_path: Path) -> StorageTarget:
    return StorageTarget(url=f"file://{tmp_path}/repository")


class _CountingWrap:
    def __init__(self) -> None:
        self.store: CountingStore | None = None

    def __call__(self, inner: Store) -> Store:
        self.store = CountingStore(inner, by_key=True)
        return self.store


def test_a_folder_committed_batch_by_batch_is_parsed_once_and_its_view_stays_right(
        file_storage: StorageTarget, tmp_path: Path) -> None:
    async def main() -> None:
        async with running_engine(file_storage.url, None, tmp_path / "a") as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("photos")
            await fs.drain()
            committer = eng.uploader.manifests
            expected = {}
            for batch in range(6):
                for i in range(20):
                    name = f"photos/b{batch}-{i}.jpg"
                    data = os.urandom(100) + name.encode()
                    await fs.create(name, data)
                    expected[name.split("/")[1].encode()] = data
                if batch == 3:  # a rename and a removal within the folder, too
                    await fs.rename("photos/b0-0.jpg", "photos/renamed.jpg")
                    expected[b"renamed.jpg"] = expected.pop(b"b0-0.jpg")
                    await fs.unlink("photos/b0-1.jpg")
                    expected.pop(b"b0-1.jpg")
                await fs.drain()
            assert committer.written.hits >= 5  # every batch after the first found it kept
            node, entry = await fs.node("photos")
            view = eng.ns.views.get(entry.id)  # type: ignore[union-attr]
            assert view is not None
            narrow = dict(view.entries)
            subdirs = view.subdirs
            eng.ns.views.recompute({view.dir_id})
            assert narrow == view.entries and subdirs == view.subdirs
            assert set(view.entries) == set(expected)
            # The bucket holds what the local state says was written, and it parses to it.
            stored = await eng.store.get(manifest_key(view.dir_id))
            row = await eng.db.run(eng.db.state.load_manifest, view.dir_id)
            assert row is not None and row[0] == stored.etag and row[1] == stored.data
            assert parse_manifest(stored.data, view.dir_id)[0].entries == view.entries
            for name, data in expected.items():
                assert await fs.read(b"photos/" + name) == data
    trio.run(main)


def test_a_copy_into_one_folder_while_someone_waits_takes_few_manifest_writes(
        storage: StorageTarget, tmp_path: Path) -> None:
    """`cp -r` of many files followed at once by `--status --wait` (flush mode from the
    first close): the folder's manifest is written a handful of times, not once per upload
    that finishes."""
    counting = _CountingWrap()

    async def main() -> None:
        async with running_engine(storage.url, storage.endpoint_url, tmp_path / "a",
                                  wrap_store=counting) as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("photos")
            await fs.drain()
            photos = (await fs.node("photos"))[1]
            assert counting.store is not None
            before = counting.store.snapshot()
            for i in range(400):
                eng.uploader.kick()  # someone waits all along
                await fs.create(f"photos/img{i:03d}.jpg", os.urandom(3000) + b"%d" % i)
                if i % 20 == 0:
                    await trio.sleep(0.01)  # (the uploads go on while files are closed)
            await fs.drain()
            cost = counting.store.since(before)
            writes = cost.under(manifest_key(photos.id))  # type: ignore[union-attr]
            assert writes[PUT_IF_NONE_MATCH] == 1 and cost.uploads == 400, cost
            print("manifest writes:", writes.manifest_writes, writes[PUT_IF_MATCH])
            assert 1 <= writes.manifest_writes <= 8, cost
    trio.run(main)


class _RecordingDisk(PowerLossDisk):
    """Records which files each group commit synced whole and which data only."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.whole: list[set[str]] = []
        self.data_only: list[set[str]] = []

    def sync_files(self, paths: Iterable[Path]) -> None:
        paths = list(paths)
        self.whole.append({p.name for p in paths})
        super().sync_files(paths)

    def sync_data(self, paths: Iterable[Path]) -> None:
        paths = list(paths)
        self.data_only.append({p.name for p in paths})
        super().sync_data(paths)


def test_an_open_file_fsynced_again_has_only_its_data_synced_and_survives_a_power_loss(
        tmp_path: Path) -> None:
    """A database's fsync at every transaction: the first syncs its staging copy whole
    (its name and record), the next ones its data only (fdatasync, a quarter of an fsync on
    ext4); what the last one covered survives a power loss."""
    url = f"file://{tmp_path / 'bucket'}"
    state_dir = settings_for(url, None, tmp_path / "cache").state_dir()
    disk = _RecordingDisk(state_dir)

    async def main() -> None:
        async with running_engine(url, None, tmp_path / "cache", upload=False, disk=disk,
                                  commit_interval=3600.0) as eng:
            handle, _ = await eng.files.create(ROOT_INO, b"db.sqlite", 0o644)
            await eng.files.write(handle.fh, 0, b"first" * 1000)
            await eng.files.fsync(handle.fh)
            staged = eng.files.staging.copies_on_disk()
            assert len(staged) == 1 and not disk.data_only
            assert sum(staged <= whole for whole in disk.whole) == 1
            for n in range(5):
                await eng.files.write(handle.fh, 0, b"v%04d" % n * 2000)  # grows, too
                await eng.files.fsync(handle.fh)
                assert disk.data_only[-1] == staged and len(disk.data_only) == n + 1
            assert sum(staged <= whole for whole in disk.whole) == 1
            disk.image(settings_for(url, None, tmp_path / "lost").state_dir())
            await eng.files.release(handle.fh)
        async with running_engine(url, None, tmp_path / "lost", upload=False) as eng:
            assert await read_file(eng, "db.sqlite") == b"v%04d" % 4 * 2000
    trio.run(main)


def test_the_kept_pending_blobs_are_what_working_them_out_again_gives(
        file_storage: StorageTarget, tmp_path: Path) -> None:
    """The upload loop looks at the pending blobs after every upload: they are kept while
    the journal is unchanged, uploads taken out as they finish. At every step they equal
    what a fresh look at the journal finds, and a folder still waiting for blobs, committed
    less than the commit delay ago, is held back without a look at its ops."""
    async def main() -> None:
        async with running_engine(file_storage.url, None, tmp_path / "a", upload=False) as eng:
            fs = EngineDriver(eng)
            schedule = eng.uploader.schedule
            for d in ("a", "b"):
                await fs.mkdir(d)
                for i in range(15):
                    await fs.create(f"{d}/f{i}", os.urandom(500))
            await eng.files.name_closed()  # their content journaled, as after a burst
            await eng.journal.write_queued()

            def fresh() -> dict[str, int]:
                return schedule._work_out_pending()[0]

            pending = schedule.pending_blobs()
            assert pending == fresh() and len(pending) == 30
            a_id = (await fs.node("a"))[1].id  # type: ignore[union-attr]
            schedule.commit_started(a_id)
            now = time.monotonic()
            assert schedule.held_back(a_id, now)
            for n, sha in enumerate(sorted(pending)):
                eng.remote_index.seen_in_bucket(sha)
                schedule.uploaded(sha)
                assert schedule.pending_blobs() == fresh(), n
                if n == 10:  # the journal changes: worked out again, the new file in it
                    await fs.create("a/late", b"late" * 100)
                    await eng.files.name_closed()
                    await eng.journal.write_queued()
                    assert len(schedule.pending_blobs()) == len(pending) - n
            assert list(schedule.pending_blobs()) == [hashlib.sha256(b"late" * 100)
                                                      .hexdigest()]
            eng.remote_index.seen_in_bucket(next(iter(schedule.pending_blobs())))
            schedule.uploaded(next(iter(schedule.pending_blobs())))
            assert schedule.pending_blobs() == {} == fresh()
            assert not schedule.held_back(a_id, now)  # it waits for nothing now
    trio.run(main)


def test_chunk_lists_are_looked_up_in_memory_and_put_ones_are_found(tmp_path: Path) -> None:
    """The folder of lists is read once (every upload and commit asks for each file above
    64 KiB, almost none has a list); a list kept by `put` afterwards is found, and so is
    one an earlier run kept."""
    root = tmp_path / "chunklists"
    chunks = Chunks(1 << 16, (SHA, SHA))
    earlier = ChunkLists(root)
    earlier.put(SHA, chunks)
    lists = ChunkLists(root)
    other = "cd" * 32
    assert lists.get(other) is None and lists.get(SHA) == chunks
    (root / other[:2]).mkdir()
    (root / other[:2] / f"{other}.json").write_text('{"size": 65536, "sha256": []}')
    assert lists.get(other) is None  # (read once: only put() writes lists)
    lists.put(other, chunks)
    assert lists.get(other) == chunks


def test_a_partial_batch_still_goes_while_an_upload_of_its_folder_is_stuck(
        file_storage: StorageTarget, tmp_path: Path) -> None:
    """Spacing a folder's partial batches (one per commit delay) must not hold them back
    for good: with b.jpg's upload stuck, a.jpg (closed before it) reaches the bucket."""
    faulty: list[FaultyStore] = []

    def wrap(inner: Store) -> Store:
        faulty.append(FaultyStore(inner))
        return faulty[0]

    async def main() -> None:
        async with running_engine(file_storage.url, None, tmp_path / "a",
                                  wrap_store=wrap) as eng:
            fs = EngineDriver(eng)
            await fs.mkdir("photos")
            await fs.create("photos/x.jpg", b"x" * 1000)
            await fs.drain()  # the folder's manifest was just written: the next batch waits
            photos = (await fs.node("photos"))[1]
            stuck = Fault("put_file", effect=HOLD,
                          prefix=blob_key(hashlib.sha256(b"b" * 1000).hexdigest()))
            faulty[0].arm(stuck)
            await fs.create("photos/a.jpg", b"a" * 1000)
            await fs.create("photos/b.jpg", b"b" * 1000)
            with trio.fail_after(60):  # (a bound for a hang, not a measure)
                await stuck.held.wait()
                while True:
                    eng.uploader.kick()  # someone waits, as --status --wait does
                    stored = await eng.store.get(manifest_key(photos.id))  # type: ignore
                    names = parse_manifest(stored.data, photos.id)[0].entries  # type: ignore
                    if b"a.jpg" in names:
                        break
                    await trio.sleep(0.05)
            assert b"b.jpg" not in names and not stuck.released.is_set()
            stuck.release()
            await fs.drain()
            stored = await eng.store.get(manifest_key(photos.id))  # type: ignore
            assert {b"x.jpg", b"a.jpg", b"b.jpg"} <= parse_manifest(
                stored.data, photos.id)[0].entries.keys()  # type: ignore
    trio.run(main)


class _Ops:
    """A folder's pending ops, as the journal holds them (what the schedule reads)."""

    def __init__(self) -> None:
        self.by_dir: dict[str, list[PendingOp]] = {}
        self.by_seq: dict[int, PendingOp] = {}
        self.version = 0

    def add(self, dir_id: str, name: bytes, entry: FileEntry | DirEntry | None, base: FileEntry | None = None,
            requires: int | None = None) -> PendingOp:
        p = PendingOp(self.version + 1, dir_id, Op(name, entry, base), requires)
        self.by_dir.setdefault(dir_id, []).append(p)
        self.by_seq[p.seq] = p
        self.version += 1
        return p

    def retire(self, batch: list[PendingOp]) -> None:
        for p in batch:
            del self.by_seq[p.seq]
            self.by_dir[p.dir_id].remove(p)
        self.version += 1


def test_content_a_batch_writes_before_a_held_removal_is_sent() -> None:
    """A file written, a folder moved out to another folder (its removal waits for that
    folder's commit), then the file removed: the removal waits too (`_held_after_a_gap`),
    so the batch writes the file's content, which must be sent. The schedule sent only
    the blob of each name's last op (here a removal: none), and the folder never committed;
    when the other folder's commit waited for this one, nothing moved (a kill -9 soak round
    stalled so in CI)."""
    def blob(data: bytes) -> FileEntry:
        return FileEntry(hashlib.sha256(data).hexdigest(), len(data), 1, 0o644)
    ops = _Ops()
    bucket = RemoteIndex()
    schedule = UploadSchedule(ops, bucket, commit_delay=1.0, quiet=0.5)  # type: ignore[arg-type]
    bucket.seen_in_bucket(EMPTY_SHA)
    empty, content = FileEntry(EMPTY_SHA, 0, 1, 0o644), blob(b"a photo")
    album = DirEntry("album-id", 1)
    create, put = ops.add("root", b"f.jpg", empty), ops.add("root", b"f.jpg", content, empty)
    moved_in = ops.add("other", b"album", album)
    ops.add("root", b"album", None, requires=moved_in.seq)  # (as namespace.rename records it)
    ops.add("root", b"f.jpg", None, content)
    assert set(schedule.pending_blobs()) == {content.sha256}
    bucket.seen_in_bucket(content.sha256)
    assert schedule.committable("root") == [create, put]


def test_a_name_held_back_holds_back_no_other_name_of_its_folder() -> None:
    """Files closed together are named together: their creates come before their contents
    (create a, create b, put b, put a). With b's blob stuck, a's create and content go; b's
    create does not (its empty version is never uploaded), nor does the removal of a
    rename within the folder whose addition waits for its blob (nothing ties the two ops
    but their order), nor a later op on that removed name; a rename to another folder
    (`requires`) waits for its addition's commit."""
    def blob(data: bytes) -> FileEntry:
        return FileEntry(hashlib.sha256(data).hexdigest(), len(data), 1, 0o644)
    ops = _Ops()
    bucket = RemoteIndex()
    schedule = UploadSchedule(ops, bucket, commit_delay=1.0, quiet=0.5)  # type: ignore[arg-type]
    empty, a, b, c = FileEntry(EMPTY_SHA, 0, 1, 0o644), blob(b"a"), blob(b"b"), blob(b"c")
    bucket.seen_in_bucket(c.sha256)
    old = ops.add("d", b"old.jpg", c)  # (an earlier file, in the bucket: goes)
    create_a, create_b = ops.add("d", b"a.jpg", empty), ops.add("d", b"b.jpg", empty)
    put_b, put_a = ops.add("d", b"b.jpg", b, empty), ops.add("d", b"a.jpg", a, empty)
    moved_to = ops.add("d", b"new.jpg", b)  # old.jpg -> new.jpg in one folder, b's content
    moved_from = ops.add("d", b"old.jpg", None, c)  # (as namespace.rename records it)
    again = ops.add("d", b"old.jpg", a)  # a new old.jpg: after the removal, not before
    folder = ops.add("d", b"album", DirEntry("album-id", 1))  # (a folder's put waits too)
    assert set(schedule.pending_blobs()) == {a.sha256, b.sha256}
    bucket.seen_in_bucket(a.sha256)
    batch = schedule.committable("d")
    assert batch == [old, create_a, put_a]  # old.jpg's removal waits for new.jpg's put
    ops.retire(batch)
    assert schedule.committable("d") == []  # b's blob is still on its way
    away = ops.add("e", b"gone.jpg", None, a, requires=ops.add("f", b"gone.jpg", a).seq)
    assert schedule.committable("e") == []  # moved to f: after f's commit
    bucket.seen_in_bucket(b.sha256)
    batch = schedule.committable("d")
    assert batch == [create_b, put_b, moved_to, moved_from, again, folder]  # together
    ops.retire(batch)
    ops.retire(schedule.committable("f"))
    assert schedule.committable("e") == [away]
    assert schedule.pending_blobs() == {}
