"""The pieces of a multipart upload: a part's body streamed from the file, its checksum."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # bytes read (or written) at a time


class FileSlice:
    """A seekable, read-only view of `length` bytes of a file from `offset`: the body of one
    multipart part, streamed from disk (and rewindable for botocore's signing and retries)."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._offset = offset
        self._length = length
        self._pos = 0

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        parts: list[bytes] = []
        while size > 0:
            chunk = os.pread(self._fd, size, self._offset + self._pos)
            if not chunk:
                raise OSError(f"file shrank while being uploaded (part at {self._offset})")
            parts.append(chunk)
            self._pos += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

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


def hash_range(path: Path, offset: int, length: int, whole: Any) -> str:
    """SHA-256 (base64) of one part, also feeding the running whole-file hash."""
    part = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"{path} shrank while being uploaded")
            part.update(chunk)
            whole.update(chunk)
            left -= len(chunk)
    return base64.b64encode(part.digest()).decode("ascii")
