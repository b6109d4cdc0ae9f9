"""A set of SHA-256 blob ids kept as 32-byte digests, about 40 bytes each: a mount that
has seen a million blobs holds them in ~40 MB instead of ~140 MB of hex strings.

The digests are spread over 4,096 buckets by their first 12 bits (SHA-256 spreads them
evenly: a million ids make ~250 a bucket, 8 KB); a bucket is one `bytearray` of digests,
searched in C (`find`), appended to in place. No per-id object, no rebuilding pass. Few
and large on purpose: the set grows while a walk allocates and frees millions of small
objects, and 65,536 small buckets (the first version) ended up in every pymalloc arena
the walk used, so none could be given back once the walk's objects were freed; buffers
past 512 bytes come from the C heap, which gives back free pages one by one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

DIGEST = 32
BUCKETS = 1 << 12


class BlobSet:
    """Blob ids (lowercase hex SHA-256, as manifests name them)."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._buckets: list[bytearray | None] = [None] * BUCKETS
        self._count = 0
        self.update(ids)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, sha: object) -> bool:
        if not isinstance(sha, str):
            return False
        try:
            digest = bytes.fromhex(sha)
        except ValueError:
            return False
        if len(digest) != DIGEST:
            return False
        bucket = self._buckets[digest[0] << 4 | digest[1] >> 4]
        return bucket is not None and _holds(bucket, digest)

    def add(self, sha: str) -> None:
        self.update((sha,))

    def update(self, shas: Iterable[str]) -> None:
        """Add ids; ValueError (nothing of it added) if one is not a SHA-256 in hex."""
        batch = list(shas)
        try:
            data = bytes.fromhex("".join(batch))
        except ValueError:
            data = b""
        if len(data) != DIGEST * len(batch) or any(len(s) != 2 * DIGEST for s in batch):
            bad = next((s for s in batch if len(s) != 2 * DIGEST), batch[0] if batch else "")
            raise ValueError(f"not a SHA-256: {str(bad)[:80]!r}")
        buckets = self._buckets
        added = 0
        for at in range(0, len(data), DIGEST):
            digest = data[at:at + DIGEST]
            p = digest[0] << 4 | digest[1] >> 4
            bucket = buckets[p]
            if bucket is None:
                buckets[p] = bytearray(digest)
                added += 1
            elif not _holds(bucket, digest):
                bucket += digest
                added += 1
        self._count += added

    def footprint(self) -> int:
        """Bytes of memory the set holds (what the scale measures report)."""
        return sys.getsizeof(self._buckets) + sum(
            sys.getsizeof(b) for b in self._buckets if b is not None)

    def __ior__(self, shas: Iterable[str]) -> BlobSet:
        self.update(shas)
        return self


def _holds(bucket: bytearray, digest: bytes) -> bool:
    at = bucket.find(digest)
    while at >= 0:
        if at % DIGEST == 0:
            return True
        at = bucket.find(digest, at + 1)
    return False
