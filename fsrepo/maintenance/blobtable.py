"""The bucket's blobs as verify and gc hold them: compact enough for millions.

A dict of hex strings to (size, mtime) tuples costs ~280 bytes a blob; here each blob is
32 bytes of digest, a size and an mtime in flat arrays (48 bytes), sorted by digest and
found through an index of the first two bytes and a short binary search. Listings come in
key order, which is digest order, so building it sorts nothing.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

DIGEST = 32
_BUCKETS = 1 << 16  # the index: where each value of a digest's first two bytes starts


class BlobTable:
    def __init__(self) -> None:
        self._digests = bytearray()
        self._sizes = array("q")
        self._mtimes = array("d")
        self._starts: array | None = None  # set by `seal`
        self._sorted = True

    def add(self, sha: str, size: int, mtime: float) -> None:
        """One blob of the listing (before `seal`)."""
        digest = bytes.fromhex(sha)
        if self._sorted and self._digests and digest <= self._digests[-DIGEST:]:
            self._sorted = False
        self._digests += digest
        self._sizes.append(size)
        self._mtimes.append(mtime)

    def seal(self) -> BlobTable:
        """Done adding: sort (only if the listing was not in order) and index."""
        if not self._sorted:
            self._sort()
        starts = array("q", bytes(8 * (_BUCKETS + 1)))
        count = len(self)
        position = 0
        for bucket in range(_BUCKETS):
            starts[bucket] = position
            while position < count and self._prefix(position) == bucket:
                position += 1
        starts[_BUCKETS] = count
        self._starts = starts
        return self

    def _prefix(self, index: int) -> int:
        at = index * DIGEST
        return (self._digests[at] << 8) | self._digests[at + 1]

    def _sort(self) -> None:
        digests = self._digests
        order = sorted(range(len(self)), key=lambda i: digests[i * DIGEST:(i + 1) * DIGEST])
        self._digests = bytearray(b"".join(digests[i * DIGEST:(i + 1) * DIGEST]
                                           for i in order))
        self._sizes = array("q", (self._sizes[i] for i in order))
        self._mtimes = array("d", (self._mtimes[i] for i in order))
        self._sorted = True

    def __len__(self) -> int:
        return len(self._sizes)

    def find(self, sha: str) -> int:
        """The blob's index, or -1 if the bucket does not hold it."""
        try:
            digest = bytes.fromhex(sha)
        except ValueError:
            return -1
        if len(digest) != DIGEST or self._starts is None:
            return -1
        bucket = (digest[0] << 8) | digest[1]
        lo, hi = self._starts[bucket], self._starts[bucket + 1]
        digests = self._digests
        while lo < hi:
            mid = (lo + hi) // 2
            here = digests[mid * DIGEST:(mid + 1) * DIGEST]
            if here < digest:
                lo = mid + 1
            elif here > digest:
                hi = mid
            else:
                return mid
        return -1

    def __contains__(self, sha: str) -> bool:
        return self.find(sha) >= 0

    def sha(self, index: int) -> str:
        return self._digests[index * DIGEST:(index + 1) * DIGEST].hex()

    def size(self, index: int) -> int:
        return self._sizes[index]

    def mtime(self, index: int) -> float:
        return self._mtimes[index]

    def total_bytes(self) -> int:
        return sum(self._sizes)

    def __iter__(self) -> Iterator[str]:
        """The shas, in digest order."""
        for index in range(len(self)):
            yield self.sha(index)
