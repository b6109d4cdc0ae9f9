"""The pieces of a multipart upload: a part's body streamed from the file, its checksum."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from .base import BlobSource, FileSlice

__all__ = ["CHUNK", "FileSlice", "hash_range"]

CHUNK = 1 << 20  # bytes read (or written) at a time


def hash_range(path: BlobSource, offset: int, length: int, whole: Any) -> str:
    """SHA-256 (base64) of one part, also feeding the running whole-file hash."""
    part = hashlib.sha256()
    with FileSlice(path, offset, length) as fh:
        left = length
        while left:
            chunk = fh.read(min(CHUNK, left))
            part.update(chunk)
            whole.update(chunk)
            left -= len(chunk)
    return base64.b64encode(part.digest()).decode("ascii")
