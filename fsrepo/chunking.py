"""Cutting a large file into chunks, and the chunk lists of the files this machine stored.

A file larger than the repository's chunk size goes to the bucket as chunks (manifest.Chunks).
Its journal entry names only the whole file's SHA-256; the uploader cuts the cached file
into chunks when it sends it, and keeps the chunk list here (a small file per list, next to
the cache) before it records the file as uploaded. The manifest commit then writes the list
into the file's entry, and a later copy of the same content needs no new cut: dedup of
whole files stays one lookup.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .hashing import HASH_CHUNK
from .manifest import MAX_CHUNK, MIN_CHUNK, Chunks, Entry, FileEntry

CHUNK_SIZE_FILE = "chunk_size"  # in the chunk lists' folder: the repository's chunk size


def hash_range(fd: int, offset: int, length: int) -> str:
    """The SHA-256 of bytes [offset, offset+length) of an open file, read into one reused
    buffer (no copy of the chunk is kept: its PUT streams the same range; worker thread)."""
    h = hashlib.sha256()
    buf = bytearray(min(HASH_CHUNK, length))
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[:min(len(buf), length - done)]], offset + done)
        if n == 0:
            raise OSError(f"the file ended before byte {offset + length}")
        h.update(view[:n])
        done += n
    return h.hexdigest()


class ChunkLists:
    """The chunk lists of files this machine sent as chunks, by whole-file SHA-256, and the
    repository's chunk size (None: the repository keeps whole files only)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # as last learnt from the bucket: a mount started offline cuts files the same way
        self.chunk_size: int | None = self._remembered()
        self._sending: dict[str, trio.Event] = {}  # chunks on their way to the bucket
        # The files that have a list, read from the folder at the first look: every upload
        # and every manifest commit asks for each file above MIN_CHUNK, almost none has
        # one, and only `put` (a worker thread; this process holds the state's lock) makes
        # one. The lock keeps a put from landing between the folder's read and its use.
        self._listed: set[str] | None = None
        self._lock = threading.Lock()

    def _remembered(self) -> int | None:
        try:
            size = int((self.root / CHUNK_SIZE_FILE).read_text())
        except (OSError, ValueError):
            return None  # never learnt (a repository before format 4, or a new cache)
        return size if MIN_CHUNK <= size <= MAX_CHUNK else None

    def learn(self, chunk_size: int | None) -> None:
        """The chunk size the repository's descriptor names, kept in the local state (a
        mount started offline later still sends large files as chunks). A repository
        cannot go back to whole files, so what was learnt stays true."""
        if chunk_size == self.chunk_size and (chunk_size is None or self._remembered()):
            return
        self.chunk_size = chunk_size
        path = self.root / CHUNK_SIZE_FILE
        if chunk_size is None:
            path.unlink(missing_ok=True)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(chunk_size))
        os.replace(tmp, path)

    @asynccontextmanager
    async def sending(self, sha: str) -> AsyncIterator[None]:
        """Hold a chunk while it is checked and sent: the early sender and the uploader
        (after close) may both get to it, and the second must find it sent, not send it
        again."""
        while (busy := self._sending.get(sha)) is not None:
            await busy.wait()
        done = self._sending[sha] = trio.Event()
        try:
            yield
        finally:
            del self._sending[sha]
            done.set()

    def _path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.json"

    def wants_chunks(self, size: int) -> bool:
        return self.chunk_size is not None and size > self.chunk_size

    def get(self, sha: str) -> Chunks | None:
        listed = self._listed
        if listed is None:
            with self._lock:
                listed = self._listed = {p.stem for p in self.root.glob("*/*.json")}
        if sha not in listed:
            return None
        try:
            raw = json.loads(self._path(sha).read_bytes())
            return Chunks(int(raw["size"]), tuple(raw["sha256"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # never cut here, or a damaged list: cut again

    def put(self, sha: str, chunks: Chunks) -> None:
        """Keep a chunk list durably (worker thread): a manifest may name the file only
        once its list survives a crash."""
        path = self._path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump({"size": chunks.size, "sha256": list(chunks.shas)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with self._lock:
            if self._listed is not None:
                self._listed.add(sha)

    def with_chunks(self, entries: dict[bytes, Entry],
                    names: set[bytes]) -> dict[bytes, Entry]:
        """The entries, those of `names` (what a batch of ops wrote) that this machine sent
        as chunks carrying their chunk lists (whatever the chunk size is now: an offline
        start does not know it)."""
        out = dict(entries)
        for name in names:
            entry = entries.get(name)
            if isinstance(entry, FileEntry) and entry.chunks is None \
                    and entry.size > MIN_CHUNK:
                chunks = self.get(entry.sha256)
                if chunks is not None and len(chunks.shas) == -(-entry.size // chunks.size):
                    out[name] = FileEntry(entry.sha256, entry.size, entry.mtime_ns,
                                          entry.mode, chunks)
        return out
