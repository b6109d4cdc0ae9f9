"""The files a verify walk found, compactly: which blob each names, with what size, in
which directory (44 bytes a file in flat arrays, not a tuple and a list per file). Names
are not kept: the few files with a problem are named by reading their directory again."""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from .blobtable import DIGEST


class FileRefs:
    def __init__(self) -> None:
        self._digests = bytearray()
        self._sizes = array("q")
        self._dirs = array("l")  # index into `dir_ids`
        self.dir_ids: list[str] = []
        self._dir_index: dict[str, int] = {}

    def add(self, dir_id: str, sha: str, size: int) -> None:
        index = self._dir_index.get(dir_id)
        if index is None:
            index = self._dir_index[dir_id] = len(self.dir_ids)
            self.dir_ids.append(dir_id)
        self._digests += bytes.fromhex(sha)
        self._sizes.append(size)
        self._dirs.append(index)

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        """(dir_id, sha, size) of every file, in the order found."""
        for i in range(len(self)):
            yield (self.dir_ids[self._dirs[i]],
                   self._digests[i * DIGEST:(i + 1) * DIGEST].hex(), self._sizes[i])

    def users(self, sha: str, limit: int) -> list[str]:
        """The directories of up to `limit` files naming the blob (one per file)."""
        digest = bytes.fromhex(sha)
        out: list[str] = []
        at = self._digests.find(digest)
        while at >= 0 and len(out) < limit:
            if at % DIGEST == 0:
                out.append(self.dir_ids[self._dirs[at // DIGEST]])
                at = self._digests.find(digest, at + DIGEST)
            else:
                at = self._digests.find(digest, at + 1)
        return out
