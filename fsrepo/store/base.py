"""The storage interface: a flat key space with conditional writes.

Both backends (`file://` and `s3://`) implement exactly this, with the same semantics, so
that everything above them (repository format, namespace, uploader) is written once and
tested against both. Keys are '/'-separated strings relative to the repository prefix.

Semantics every backend guarantees:
- `put(..., if_none_match=True)` creates the key only if it does not exist, atomically;
  otherwise raises `PreconditionFailed`.
- `put(..., if_match=etag)` replaces the key only if its current etag equals `etag`;
  raises `PreconditionFailed` if it changed, `ObjectNotFound` if it does not exist.
- etags are opaque strings that change whenever the content changes.
- `get(key, if_none_match=etag)` returns `NOT_MODIFIED` when the etag still matches.
- Errors are the exceptions of `fsrepo.errors`; transient faults are retried inside the
  backend before anything is raised.
"""

from __future__ import annotations

import abc
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import StorageError, StorageOffline

# The most `get` reads whole: everything it reads (manifests, the descriptor, change
# records) has a smaller documented limit, so a larger object is hostile or broken and is
# refused before it is read into memory.
GET_LIMIT = 80 << 20


class ObjectTooLarge(StorageError):
    """An object `get` was asked to read whole is over GET_LIMIT: refused, left unread."""


def too_large(where: str, size: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"{where} is {size >> 20} MiB, over the {GET_LIMIT >> 20} MiB "
                          "that imgrepo reads whole: refused (a damaged or hostile object)")


@dataclass(frozen=True)
class FileRange:
    """Bytes [offset, offset + length) of an open file, sent by `put_file` as one object
    without a copy of their own (a chunk of a cached or staged file). The store reads them
    through its own duplicate of `fd`; the caller keeps `fd` open until put_file returns."""

    fd: int
    offset: int
    length: int


BlobSource = Path | FileRange  # what put_file sends: a whole file, or a range of one


def source_size(source: BlobSource) -> int:
    return source.length if isinstance(source, FileRange) else os.stat(source).st_size


class FileSlice:
    """A seekable, read-only view of `length` bytes of a file (a path, or a FileRange)
    from `offset`: a body streamed from disk, rewindable for signing and retries."""

    def __init__(self, source: BlobSource, offset: int, length: int) -> None:
        if isinstance(source, FileRange):
            self._fd, self._offset = os.dup(source.fd), source.offset + offset
        else:
            self._fd, self._offset = os.open(source, os.O_RDONLY), offset
        self._length = length
        self._pos = 0

    @classmethod
    def whole(cls, source: BlobSource) -> FileSlice:
        return cls(source, 0, source_size(source))

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        parts: list[bytes] = []
        while size > 0:
            chunk = os.pread(self._fd, size, self._offset + self._pos)
            if not chunk:
                raise OSError(f"file shrank while being uploaded (at {self._offset})")
            parts.append(chunk)
            self._pos += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def readinto(self, buf: bytearray | memoryview) -> int:
        view = memoryview(buf)[:self._length - self._pos]
        if not view:
            return 0
        n = os.preadv(self._fd, [view], self._offset + self._pos)
        if n == 0:
            raise OSError(f"file shrank while being uploaded (at {self._offset})")
        self._pos += n
        return n

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileSlice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class StoredObject:
    """An object's bytes and the etag they had when read."""

    data: bytes
    etag: str


@dataclass(frozen=True)
class ObjectInfo:
    """One listing row."""

    key: str
    size: int
    mtime: float  # seconds since the epoch, when the object was last written
    etag: str | None = None  # when the listing gives it (S3 does; it is the GET's etag)


class NotModified:
    """What `get(key, if_none_match=etag)` returns while the etag still matches (only the
    one instance, NOT_MODIFIED)."""

    def __repr__(self) -> str:
        return "NOT_MODIFIED"


NOT_MODIFIED = NotModified()


class ChunkSink(abc.ABC):
    """An `on_chunk` for `Store.download` that also takes the bytes: the store hands it each
    piece it wrote (`landed`), then calls it with the new end as any `on_chunk`. A caller
    that hashes what arrives (the blob cache) need not read it back from the file. Stores
    that do not know it call it with the end alone; wrappers pass it on as it is."""

    @abc.abstractmethod
    def landed(self, data: bytes | memoryview, at: int) -> None:
        """The bytes just written at offset `at` of the file (the download's thread)."""

    @abc.abstractmethod
    def __call__(self, end: int) -> None:
        """The file holds the object's bytes up to `end` (the download's thread)."""


class Store(abc.ABC):
    """Async access to one repository's key space (bucket + prefix, or a folder)."""

    url: str

    @abc.abstractmethod
    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject | NotModified:
        """Read a whole (small) object. Raises ObjectNotFound, or ObjectTooLarge above
        GET_LIMIT (without reading it)."""

    @abc.abstractmethod
    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Read bytes [start, end) of an object. Raises ObjectNotFound."""

    @abc.abstractmethod
    async def download(
        self, key: str, dest: Path, start: int = 0, on_chunk: Callable[[int], None] | None = None
    ) -> None:
        """Stream an object from byte `start` into the file `dest` (written at offset
        `start`, created if missing), calling `on_chunk(bytes_so_far_in_file)` as data lands,
        from a worker thread (a `ChunkSink` is handed each piece's bytes first). Raises
        ObjectNotFound."""

    @abc.abstractmethod
    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Write a small object (manifests, descriptor); returns its new etag."""

    @abc.abstractmethod
    async def put_file(self, key: str, path: BlobSource, sha256_hex: str) -> bool:
        """Upload a file (or a FileRange of one) as an immutable object, if-none-match,
        with its SHA-256 checksum sent to the server (multipart above a threshold), which
        refuses a body that does not match it. Returns True if this call created the
        object, False if it already existed."""

    @abc.abstractmethod
    async def head(self, key: str) -> int | None:
        """The object's size, or None if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """All keys under `prefix`, in lexicographic order, paginated internally."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove a key; no error if it does not exist."""

    @property
    def online(self) -> bool:
        """Whether the storage is believed reachable. A plain backend always says yes (each
        call finds out for itself); the connectivity guard answers from what it saw."""
        return True

    def offline_error(self) -> StorageOffline:
        """What to tell a user whose request needs the storage while it is not `online`
        (the guard says since when and why)."""
        return StorageOffline(f"the storage {self.url} is unreachable")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""
