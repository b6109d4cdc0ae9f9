"""`file://` backend: a folder laid out exactly like the bucket.

This is the zero-configuration default and the backend most tests run against, so it gives
the same guarantees as S3, also between processes sharing the folder:

- every write goes to a temp file in the target's folder, is fsync'd, then renamed or
  hard-linked into place, and the folder is fsync'd: a reader never sees half an object and a
  crash never leaves one;
- `if_none_match` publishes with `os.link`, which fails atomically if the name exists;
- `if_match`, plain puts and deletes of one key serialise on an `flock` of a per-key lock file,
  so compare-and-swap loses no update across processes;
- etags are the MD5 of the content, so they survive restarts and agree between processes.

Names starting with `.imgrepo-` are ours (temp files, the lock folder) and never keys.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import TypeVar

import trio

from ..errors import (
    IntegrityError,
    ObjectNotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageError,
)
from .base import (
    GET_LIMIT,
    NOT_MODIFIED,
    BlobSource,
    ChunkSink,
    FileSlice,
    NotModified,
    ObjectInfo,
    Store,
    StoredObject,
    too_large,
)
from .threads import run_stoppable

CHUNK = 1 << 20
RESERVED = ".imgrepo-"
TMP_PREFIX = RESERVED + "tmp-"
LOCK_DIR = RESERVED + "locks"
LIST_BATCH = 1000

T = TypeVar("T")


def _etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(folder: Path) -> None:
    """mkdir -p, fsyncing each parent that gained an entry: a blob linked into a brand-new
    folder must survive a crash together with the folder."""
    if folder.is_dir():
        return
    missing: list[Path] = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(new.parent)


class LocalStore(Store):
    """A repository in a local (or network-mounted) folder."""

    def __init__(self, root: Path, create: bool = True) -> None:
        self.root = Path(root).absolute()
        self.url = "file://" + str(self.root)
        if not create:
            return  # read-only use: a missing folder reads as an empty repository
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / LOCK_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise self._os_error(exc, "create the repository folder", None) from exc

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- helpers ----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """The file of a key; rejects keys that could escape the root or hit our own files."""
        if not key or key.startswith("/") or key.endswith("/") or "\0" in key:
            raise ValueError(f"invalid storage key {key!r}")
        for part in key.split("/"):
            if part in ("", ".", "..") or part.startswith(RESERVED):
                raise ValueError(f"invalid storage key {key!r}")
        return self.root / key

    def _os_error(self, exc: OSError, what: str, key: str | None) -> StorageError:
        where = str(self.root / key) if key else str(self.root)
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StorageAccessDenied(f"cannot {what} {where}: {reason}")
        if exc.errno == errno.ENOSPC:
            return StorageError(f"cannot {what} {where}: the disk holding the repository is full")
        return StorageError(f"cannot {what} {where}: {reason}")

    async def _run(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run blocking file IO in a thread; turn storage-side OSErrors into StorageErrors."""
        try:
            return await trio.to_thread.run_sync(fn)
        except _CallerFileError as exc:
            raise exc.error from None
        except OSError as exc:
            raise self._os_error(exc, what, key) from exc

    def _write_temp(self, folder: Path, data: bytes) -> Path:
        tmp = folder / (TMP_PREFIX + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Exclusive, cross-process lock of one key (released when the fd closes)."""
        name = hashlib.sha256(key.encode()).hexdigest()
        try:
            fd = os.open(self.root / LOCK_DIR / name, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # opened with create=False: the repository exists by now
            (self.root / LOCK_DIR).mkdir(exist_ok=True)
            fd = os.open(self.root / LOCK_DIR / name, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- reads ------------------------------------------------------------------------------

    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject | NotModified:
        path = self._path(key)

        def work() -> StoredObject | NotModified:
            try:
                with open(path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size > GET_LIMIT:
                        raise too_large(str(path), size)
                    data = fh.read(GET_LIMIT + 1)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise ObjectNotFound(f"{path} does not exist") from None
            if len(data) > GET_LIMIT:  # grew while read
                raise too_large(str(path), len(data))
            etag = _etag(data)
            if if_none_match is not None and if_none_match == etag:
                return NOT_MODIFIED
            return StoredObject(data, etag)

        return await self._run("read", key, work)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        path = self._path(key)
        if start < 0 or end <= start:
            return b""

        def work() -> bytes:
            try:
                fd = os.open(path, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise ObjectNotFound(f"{path} does not exist") from None
            try:
                parts: list[bytes] = []
                pos = start
                while pos < end:
                    chunk = os.pread(fd, min(end - pos, 1 << 30), pos)
                    if not chunk:
                        break
                    parts.append(chunk)
                    pos += len(chunk)
                return b"".join(parts)
            finally:
                os.close(fd)

        return await self._run("read", key, work)

    async def download(
        self, key: str, dest: Path, start: int = 0, on_chunk: Callable[[int], None] | None = None
    ) -> None:
        path = self._path(key)
        sink = on_chunk if isinstance(on_chunk, ChunkSink) else None

        def work(stop: threading.Event) -> None:
            try:
                src = os.open(path, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise ObjectNotFound(f"{path} does not exist") from None
            try:
                try:
                    out = os.open(dest, os.O_WRONLY | os.O_CREAT, 0o666)
                except OSError as exc:  # the caller's file, not the storage: keep it an OSError
                    raise _CallerFileError(exc) from exc
                try:
                    buf = bytearray(CHUNK)
                    view = memoryview(buf)
                    pos = start
                    while not stop.is_set():
                        n = os.preadv(src, [buf], pos)
                        if n == 0:
                            break
                        done = 0
                        while done < n:
                            try:
                                done += os.pwrite(out, view[done:n], pos + done)
                            except OSError as exc:
                                raise _CallerFileError(exc) from exc
                        if sink is not None:
                            sink.landed(view[:n], pos)
                        pos += n
                        if on_chunk is not None:
                            on_chunk(pos)
                finally:
                    os.close(out)
            finally:
                os.close(src)

        try:
            await run_stoppable(work)
        except _CallerFileError as exc:
            raise exc.error from None
        except OSError as exc:
            raise self._os_error(exc, "read", key) from exc

    async def head(self, key: str) -> int | None:
        path = self._path(key)

        def work() -> int | None:
            try:
                st = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            return st.st_size if stat.S_ISREG(st.st_mode) else None

        return await self._run("stat", key, work)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Walks lazily in key order: batches of rows are produced in a worker thread."""
        rows = self._walk(prefix)
        while True:
            batch = await self._run("list", prefix, lambda: list(islice(rows, LIST_BATCH)))
            for row in batch:
                yield row
            if len(batch) < LIST_BATCH:
                return

    def _walk(self, prefix: str) -> Iterator[ObjectInfo]:
        folder, _, _ = prefix.rpartition("/")
        if folder:
            try:
                self._path(folder)
            except ValueError:
                return
            yield from self._walk_dir(self.root / folder, folder + "/", prefix)
        else:
            yield from self._walk_dir(self.root, "", prefix)

    def _walk_dir(self, folder: Path, base: str, prefix: str) -> Iterator[ObjectInfo]:
        # A sub-folder sorts as its name + "/" (all its keys share that prefix, and no
        # sibling file name contains "/"), which yields keys in plain string order.
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return
        items: list[tuple[str, bool, os.DirEntry[str]]] = []
        for entry in entries:
            if entry.name.startswith(RESERVED):
                continue
            key = base + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    sort_key = key + "/"
                    if sort_key.startswith(prefix) or prefix.startswith(sort_key):
                        items.append((sort_key, True, entry))
                elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                    items.append((key, False, entry))
            except FileNotFoundError:
                continue
        items.sort(key=lambda item: item[0])
        for key, is_dir, entry in items:
            if is_dir:
                yield from self._walk_dir(Path(entry.path), key, prefix)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime)

    # -- writes -----------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        if if_match is not None and if_none_match:
            raise ValueError("put: if_match and if_none_match are exclusive")
        path = self._path(key)
        data = bytes(data)
        etag = _etag(data)

        def work() -> str:
            _ensure_dir(path.parent)
            tmp = self._write_temp(path.parent, data)
            try:
                if if_none_match:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise PreconditionFailed(f"{path} already exists") from None
                else:
                    with self._locked(key):
                        if if_match is not None:
                            try:
                                current = _etag(path.read_bytes())
                            except FileNotFoundError:
                                raise ObjectNotFound(f"{path} does not exist") from None
                            if current != if_match:
                                raise PreconditionFailed(f"{path} was changed by another writer")
                        os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            return etag

        return await self._run("write", key, work)

    async def put_file(self, key: str, path: BlobSource, sha256_hex: str) -> bool:
        """Copies in chunks (never the whole file in memory), checking the SHA-256 on the way."""
        final = self._path(key)
        expected = sha256_hex.lower()

        def work() -> bool:
            if final.exists():
                return False
            try:
                src = FileSlice.whole(path)
            except OSError as exc:  # the caller's file, not the storage
                raise _CallerFileError(exc) from exc
            with src:
                _ensure_dir(final.parent)
                tmp = final.parent / (TMP_PREFIX + secrets.token_hex(8))
                try:
                    digest = hashlib.sha256()
                    buf = bytearray(CHUNK)
                    view = memoryview(buf)
                    with open(tmp, "xb") as out:
                        while True:
                            try:
                                n = src.readinto(buf)
                            except OSError as exc:
                                raise _CallerFileError(exc) from exc
                            if not n:
                                break
                            digest.update(view[:n])
                            out.write(view[:n])
                        out.flush()
                        os.fsync(out.fileno())
                    if digest.hexdigest() != expected:
                        raise IntegrityError(
                            f"{path} does not have the SHA-256 it is stored under "
                            f"({digest.hexdigest()} != {expected}); it changed while being stored"
                        )
                    try:
                        os.link(tmp, final)
                    except FileExistsError:
                        return False
                finally:
                    tmp.unlink(missing_ok=True)
            _fsync_dir(final.parent)
            return True

        return await self._run("write", key, work)

    async def delete(self, key: str) -> None:
        path = self._path(key)

        def work() -> None:
            with self._locked(key):
                try:
                    path.unlink()
                except (FileNotFoundError, NotADirectoryError):
                    return
            _fsync_dir(path.parent)

        await self._run("delete", key, work)


class _CallerFileError(Exception):
    """Carries an OSError about the caller's own file (source or destination) out of a worker
    thread, so it reaches the caller unchanged instead of being reported as a storage fault."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error
