"""`imgrepo-mount --salvage DEST`: copy every file not yet uploaded out of a local cache.

When a cache directory cannot be used with its bucket any more (the bucket now holds another
repository, or was deleted), the changes still in its journal must not be lost with it.
This reads only the local state (journal, cached manifests, blob cache), never the bucket:
each directory is rebuilt as the mount showed it (last cached manifest + pending ops), and
every file a pending op wrote is copied to DEST under its path, and so is every file the
last run closed (or fsync'd while open) that is still a staging copy, not yet named: what the
next mount's recovery would journal (`Staging.recover_synced`), taken here without changing
the cache. Files whose directory can no
longer be reached from the root land under DEST/unreachable/<directory id>/. A large file
kept as chunks (read chunk by chunk, or sent as chunks but not yet named in a manifest) is
put together from its cached chunks and checked against its whole-file hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .chunking import ChunkLists
from .closed_log import LOG_NAME, ClosedLog
from .config import Settings
from .errors import ImgrepoError, ManifestError
from .hashing import HASH_CHUNK
from .manifest import ROOT_ID, Chunks, DirEntry, Entry, FileEntry, SymlinkEntry, parse_manifest
from .merge import Op, apply_ops
from .staging import STAGING_DIR, recovered_entry
from .state import JournalOp, LocalState, SyncedCopy
from .units import human


@dataclass
class SalvageReport:
    copied: list[str] = field(default_factory=list)  # paths relative to DEST
    bytes: int = 0
    missing: list[str] = field(default_factory=list)  # pending, but its cache file is gone


def _staged_copies(state_dir: Path, state: LocalState) -> list[tuple[SyncedCopy, bool]]:
    """The staging copies the last run left as a file's content, each with whether it was
    closed: fsync'd while open, or closed and not named yet (the closed-file log's lines of
    this boot; an earlier boot's are absent, as for the mount), whose copy is still there."""
    copies = [(copy, False) for copy in state.synced_copies()]
    copies += [(copy, True) for copy in ClosedLog(state_dir / LOG_NAME).trusted()]
    return [(copy, closed) for copy, closed in copies
            if (state_dir / STAGING_DIR / copy.path).is_file()]


def _unnamed_ops(state_dir: Path, state: LocalState) -> tuple[list[JournalOp], dict[str, Path]]:
    """The ops the next start's recovery would journal for the staged copies (a copy
    whose content the name's pending op already holds is left out, as recovery does),
    and the copy each new content is read from, by its hash."""
    ops: list[JournalOp] = []
    sources: dict[str, Path] = {}
    for copy, closed in _staged_copies(state_dir, state):
        path = state_dir / STAGING_DIR / copy.path
        entry = recovered_entry(path, copy, state, closed)
        if entry is not None:
            ops.append(JournalOp(0, copy.dir_id, copy.name, entry, copy.base, None, 0))
            sources[entry.sha256] = path
    return ops, sources


def _views(state: LocalState, ops: list[JournalOp]) -> dict[str, dict[bytes, Entry]]:
    """Each directory the journal touches (and its ancestors' cached manifests) as the
    mount showed it: cached manifest + pending ops."""
    by_dir: dict[str, list[Op]] = {}
    for row in ops:
        by_dir.setdefault(row.dir_id, []).append(Op(row.name, row.entry, row.base))
    views: dict[str, dict[bytes, Entry]] = {}

    def view(dir_id: str) -> dict[bytes, Entry]:
        if dir_id not in views:
            entries: dict[bytes, Entry] = {}
            row = state.load_manifest(dir_id)
            if row is not None and row[1]:
                try:
                    entries = parse_manifest(row[1], dir_id)[0].entries
                except ManifestError:
                    entries = {}
            apply_ops(entries, by_dir.get(dir_id, []), host="salvage")
            views[dir_id] = entries
        return views[dir_id]

    for dir_id in [ROOT_ID, *by_dir]:
        view(dir_id)
    # Walk down from the root through cached manifests, so pending dirs' paths resolve.
    stack, seen = [ROOT_ID], {ROOT_ID}
    while stack:
        for entry in view(stack.pop()).values():
            if isinstance(entry, DirEntry) and entry.id not in seen:
                seen.add(entry.id)
                if state.load_manifest(entry.id) is not None or entry.id in by_dir:
                    stack.append(entry.id)
    return views


def _paths(views: dict[str, dict[bytes, Entry]]) -> dict[str, bytes]:
    """dir id -> its path from the root (only for directories reachable from it)."""
    paths = {ROOT_ID: b""}
    stack = [ROOT_ID]
    while stack:
        dir_id = stack.pop()
        for name, entry in views.get(dir_id, {}).items():
            if isinstance(entry, DirEntry) and entry.id not in paths:
                paths[entry.id] = os.path.join(paths[dir_id], name)
                stack.append(entry.id)
    return paths


def salvage(state_dir: Path, dest: Path) -> SalvageReport:
    """Copy the pending files of the cache at `state_dir` into `dest` (created; must be
    empty if it exists)."""
    db_path = state_dir / "state.db"
    if not db_path.exists():
        raise ImgrepoError(f"{state_dir} holds no imgrepo cache (no state.db)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ImgrepoError(f"{dest} exists and is not an empty folder")
    state = LocalState(db_path)
    try:
        unnamed, sources = _unnamed_ops(state_dir, state)
        ops = state.pending_ops() + unnamed
        views = _views(state, ops)
    finally:
        state.close()
    paths = _paths(views)
    chunk_lists = ChunkLists(state_dir / "chunklists")
    pending = {(row.dir_id, row.entry) for row in ops
               if isinstance(row.entry, FileEntry | SymlinkEntry)}
    report = SalvageReport()
    dest.mkdir(parents=True, exist_ok=True)
    root = os.fsencode(dest)
    for dir_id, entries in views.items():
        base = paths.get(dir_id)
        if base is None:
            base = os.path.join(b"unreachable", dir_id.encode())
        for name, entry in entries.items():
            if (dir_id, entry) not in pending:
                continue
            rel = os.path.join(base, name)
            target = os.path.join(root, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if isinstance(entry, SymlinkEntry):
                os.symlink(entry.target, target)
                report.copied.append(os.fsdecode(rel))
                continue
            assert isinstance(entry, FileEntry)
            if not _copy_content(state_dir, entry, os.fsdecode(target), chunk_lists,
                                 sources.get(entry.sha256)):
                report.missing.append(os.fsdecode(rel))
                continue
            os.chmod(target, entry.mode & 0o7777)
            os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns))
            report.copied.append(os.fsdecode(rel))
            report.bytes += entry.size
    return report


def _copy_content(state_dir: Path, entry: FileEntry, target: str,
                  chunk_lists: ChunkLists, staged: Path | None = None) -> bool:
    """Copy a file's content out of the cache: its staging copy (`staged`: not named
    yet), its whole blob, or its chunks put together (False: not all of it is cached, or
    what is cached is not the file)."""
    if staged is not None:
        try:
            shutil.copyfile(staged, target)
            return True
        except FileNotFoundError:
            pass
    blobs = state_dir / "blobs"
    try:
        shutil.copyfile(blobs / entry.sha256[:2] / entry.sha256, target)
        return True
    except FileNotFoundError:
        pass
    chunks = entry.chunks or chunk_lists.get(entry.sha256)
    if chunks is None or len(chunks.shas) != -(-entry.size // chunks.size):
        return False
    try:
        whole = _join_chunks(blobs, chunks, target)
    except FileNotFoundError:
        whole = None
    if whole != entry.sha256:
        Path(target).unlink(missing_ok=True)
        return False
    return True


def _join_chunks(blobs: Path, chunks: Chunks, target: str) -> str:
    """Write the chunks one after another into `target`; the SHA-256 of what was written."""
    whole = hashlib.sha256()
    with open(target, "wb") as out:
        for sha in chunks.shas:
            with open(blobs / sha[:2] / sha, "rb") as chunk:
                while data := chunk.read(HASH_CHUNK):
                    whole.update(data)
                    out.write(data)
    return whole.hexdigest()


def pending_count(state_dir: Path) -> int:
    """How many changes a cache still owes its bucket (0 if it has no state): journaled
    ones, and staging copies closed or fsync'd and not named yet."""
    db_path = state_dir / "state.db"
    if not db_path.exists():
        return 0
    state = LocalState(db_path)
    try:
        return len(state.pending_ops()) + len(_staged_copies(state_dir, state))
    finally:
        state.close()


def salvage_advice(settings: Settings) -> str:
    """The end of a refusal message about a cache that cannot be used any more."""
    state_dir = settings.state_dir()
    count = pending_count(state_dir)
    if not count:
        return "; nothing in it waits for upload, so move that directory away to start afresh"
    endpoint = f" --endpoint-url {settings.endpoint_url}" if settings.endpoint_url else ""
    return (f"; it still holds {count} changes not yet uploaded: copy its files out with "
            f"`imgrepo-mount --salvage DEST --storage {settings.storage}{endpoint} --cache-dir "
            f"{settings.cache_root}`, then move that directory away to start afresh")


def run_salvage(settings: Settings, dest: Path) -> int:
    """`imgrepo-mount --salvage DEST [--storage URL] [--cache-dir DIR]`: the cache is looked
    for where this version keeps it, then where versions before the endpoint counted did."""
    state_dir, legacy = settings.state_dir(), settings.legacy_state_dir()
    if not (state_dir / "state.db").exists() and legacy is not None \
            and (legacy / "state.db").exists():
        state_dir = legacy
    report = salvage(state_dir, dest)
    print(f"salvage: copied {len(report.copied)} files not yet uploaded "
          f"({human(report.bytes)}) from {state_dir} to {dest}")
    for rel in report.missing:
        print(f"salvage: {rel}: its content is no longer in the cache", flush=True)
    return 1 if report.missing else 0
