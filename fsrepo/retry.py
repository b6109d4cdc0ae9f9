"""Retry policies, stated once per layer.

Retries happen at exactly two layers, never multiplied by the layers above them:

- **REQUEST** (the store layer): one storage request that failed in a way another try can
  fix (a dropped connection, 5xx/429/SlowDown, a 409 ConditionalRequestConflict, a body cut
  off mid-read). A few quick tries with jittered exponential backoff, then the store raises
  and the caller sees one error. botocore's own retries are this layer too (it is set to
  REQUEST.attempts).
- **QUEUE** (background work: uploads, manifest commits, revalidation): a piece of work
  that failed after the store's retries is put back and tried again later, forever, with a
  slowly growing, jittered delay. Nothing in the journal is dropped because the network was
  down; the connectivity guard wakes the queue at once when the storage answers again.

Reads for a waiting reader add no layer of their own: what the store could not fetch after
its REQUEST retries is an error for that read (the next open or read starts again).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: try `n` waits `first * factor**(n-1)` seconds, capped at
    `cap`, times a random factor in [1 - jitter, 1 + jitter] so that many clients (or many
    keys) failing together do not retry in step. `attempts` is the number of tries in all
    (None: unlimited)."""

    first: float
    cap: float
    factor: float = 2.0
    jitter: float = 0.5
    attempts: int | None = None

    def delay(self, tries: int, rand: random.Random | None = None) -> float:
        """Seconds to wait after the `tries`-th failed try (1-based)."""
        base = min(self.cap, self.first * self.factor ** max(0, tries - 1))
        r = (rand or random).random()
        return base * (1.0 - self.jitter + 2.0 * self.jitter * r)

    def gives_up(self, tries: int) -> bool:
        """Whether `tries` failed tries are all this policy allows."""
        return self.attempts is not None and tries >= self.attempts


REQUEST = Backoff(first=0.05, cap=2.0, attempts=6)
QUEUE = Backoff(first=0.5, cap=60.0)


class RetryTracker:
    """Per-key failure counts and retry times for QUEUE-layer work (one per key: a blob, a
    directory). `ready(key)` says whether a key may be tried now."""

    def __init__(self, policy: Backoff = QUEUE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, key: str) -> float:
        """Record a failure; returns the delay before the key is ready again."""
        count = self._failures.get(key, (0, 0.0))[0] + 1
        delay = self.policy.delay(count)
        self._failures[key] = (count, self._clock() + delay)
        return delay

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def ready(self, key: str) -> bool:
        return self._failures.get(key, (0, 0.0))[1] <= self._clock()

    def failures(self, key: str) -> int:
        return self._failures.get(key, (0, 0.0))[0]

    def forget_all(self) -> None:
        """The storage is back: everything that failed may be tried again at once."""
        self._failures.clear()

    def __len__(self) -> int:
        return len(self._failures)


class SharedThrottle:
    """One store's answer to "slow down" (429, 503 SlowDown): after a throttling answer
    every request of the store waits out the same pause before its next try, so that all
    its threads back off together instead of each on its own schedule (what botocore's
    adaptive mode does for boto3's requests; the direct blob path has its own). The pause
    grows by `policy` with throttling answers in a row and shrinks with each success.
    Thread-safe: requests run in worker threads."""

    def __init__(self, policy: Backoff = REQUEST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._strikes = 0
        self._until = 0.0

    def throttled(self) -> float:
        """Record a throttling answer; returns the pause every request now waits out."""
        with self._lock:
            self._strikes += 1
            delay = self.policy.delay(self._strikes)
            self._until = max(self._until, self._clock() + delay)
            return delay

    def succeeded(self) -> None:
        with self._lock:
            self._strikes = max(0, self._strikes - 1)

    def pause(self) -> float:
        """Seconds to wait before the next request may go (0 when not throttled)."""
        with self._lock:
            return max(0.0, self._until - self._clock())
