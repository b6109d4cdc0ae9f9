"""Which blobs this process may take to be in the bucket: the dedup trust index.

Identical content costs one upload, ever: a blob the bucket has is never sent again. But the
index of known blobs outlives a `--gc` that deleted some of them (after they had been
unreferenced for its grace period), so a blob is trusted without a look only for
TRUST_REMOTE seconds after this process last saw it there; otherwise it is checked again
(one HEAD) before a manifest references it.

What it holds follows what this process did, not what it read: a walk over a million
photos (a blob each) adds nothing. It holds the blobs this process uploaded or saw with a
HEAD, and those its ops carried from a manifest (a rename, a chmod of a file another machine
wrote, a folder merge: `Namespace._carried`; were such a blob unknown, the commit would
wait for an upload that cannot start, the content being only in the bucket). A blob's time
of confirmation goes once too old to matter, and a start loads, of the blobs earlier runs
uploaded, those pending changes name (the others such changes name get one HEAD).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from .blobset import BlobSet
from .namespace import EMPTY_SHA

TRUST_REMOTE = 600.0  # seconds; far below any sensible gc grace period (hours)


class RemoteIndex:
    """The blobs known to be in the bucket, and how far each may be trusted."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        # blobs known to be in the bucket (uploaded, seen, or carried by an op from a
        # manifest): a million take ~40 MB as digests, ~140 MB as str
        self.remote = BlobSet()
        self._clock = clock
        # When this process last saw each blob in the bucket (uploaded or HEAD), within
        # TRUST_REMOTE (oldest first in `_seen`, to let go of), and the known blobs that new
        # content re-uses and that must be seen there again first: a gc may have deleted a
        # blob the index still lists (see `reuse_or_recheck`).
        self.confirmed: dict[str, float] = {}
        self._seen: deque[tuple[float, str]] = deque()
        self.unconfirmed: set[str] = set()
        self.lost: set[str] = set()  # pending blobs whose cache file was gone at startup
        # Pending blobs left by an earlier run: a power loss may have torn their file, so
        # each is hashed once before it is sent (servers that skip the checksum exist).
        self.unverified: set[str] = set()

    def note_known(self, shas: set[str]) -> None:
        """Blobs a manifest read from the bucket names, that an op carries: known there."""
        self.remote.update(shas)

    def known(self, sha: str) -> bool:
        """Whether the blob is known to be in the bucket (uploaded, seen, or carried)."""
        return sha in self.remote

    def reuse_or_recheck(self, sha: str) -> bool:
        """Whether a closed file whose content is blob `sha` may skip its upload (dedup).
        Only if this process saw the blob in the bucket within TRUST_REMOTE seconds;
        otherwise the blob is marked for a check (one HEAD, no upload if it is there)
        before any manifest references it, and uploaded again if it is not."""
        if not self.known(sha):
            return False
        if sha == EMPTY_SHA or self._clock() - self.confirmed.get(sha, -math.inf) \
                < TRUST_REMOTE:
            return True
        self.unconfirmed.add(sha)
        return False

    def needs_upload(self, sha: str) -> bool:
        """Whether blob `sha` must be uploaded (or seen in the bucket) before a manifest
        may name it."""
        return not self.known(sha) or sha in self.unconfirmed

    def seen_in_bucket(self, sha: str) -> None:
        """This process just uploaded blob `sha`, or saw it in the bucket."""
        now = self._clock()
        self.remote.add(sha)
        self.confirmed[sha] = now
        self._seen.append((now, sha))
        self._forget_old_confirmations(now)
        self.unconfirmed.discard(sha)

    def _forget_old_confirmations(self, now: float) -> None:
        """Confirmations past TRUST_REMOTE decide nothing any more: each blob's goes once
        its newest is that old (a million uploads would otherwise keep ~200 MB)."""
        seen = self._seen
        while seen and now - seen[0][0] >= TRUST_REMOTE:
            when, sha = seen.popleft()
            if self.confirmed.get(sha) == when:
                del self.confirmed[sha]
