"""The SHA-256 of a file, read in chunks: how blobs are named and checked; and the threads
that hash files while they are written (`HashThread`, over `RunningHash`es)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import outcome
import trio

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
# The writer of a staging copy waits while the hash threads are this far behind: buffers
# queued (memory), or bytes queued as ranges of the copies (read back from the page cache;
# past this much the kernel may have let the pages go and the read-back hits the disk).
HELD_LIMIT = 16 << 20
LAG_LIMIT = 2 << 30
# The niceness of background threads where SCHED_IDLE is not available.
BACKGROUND_NICE = 19
BACKGROUND, FOREGROUND = "background", "foreground"
LANES = (BACKGROUND, FOREGROUND)
# A burst of writes is on while writes come less than BURST_GAP apart; during one, work in
# the background waits while the thread that answers the writes waited for a CPU more
# than CONTENDED of its last WINDOW (or longer) seconds.
BURST_GAP = 0.1
CONTENDED = 0.1
WINDOW = 0.05


def hash_file(path: os.PathLike[str] | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def set_background_priority() -> bool:
    """Put the calling thread in the background (Linux: per thread): SCHED_IDLE, which any
    other thread that wakes preempts at once (a FUSE request, the writer), else niceness
    BACKGROUND_NICE. Only for a thread that nothing waits for: an unprivileged process
    cannot undo either. False where the system allows neither."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return True
    except (AttributeError, OSError):
        pass
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < BACKGROUND_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
        return True
    except OSError:
        return False


class WriterFirst:
    """Whether work in the background should wait for the writer: a burst of writes is
    on, and the thread that answers them (the trio thread: the one that calls `wrote`)
    has had to wait for a CPU lately (its schedstat). A low priority alone does not keep
    such work out of the writer's way on a core shared with it: a thread whose requests
    ping-pong with the writer's is often not runnable for an instant, and the scheduler
    then runs what is owed time (measured: the SCHED_IDLE hash thread took 0.1-0.3 s of
    a 512 MiB `dd` while the trio thread waited). On a machine with a free core the trio
    thread hardly waits, and the work runs beside the writes; on a shared one it runs
    when they pause."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 stats: Callable[[int], str] | None = None) -> None:
        self.clock = clock
        self.stats = stats or _schedstat
        self.last_write = -BURST_GAP
        self.tid = 0  # the writes' thread
        self._seen: tuple[float, float] | None = None  # (time, seconds waited) last read
        self._contended = False

    def wrote(self) -> None:
        """After a write (on the thread that answers them)."""
        self.last_write = self.clock()
        self.tid = threading.get_native_id()

    def holds(self) -> bool:
        now = self.clock()
        if now - self.last_write >= BURST_GAP:
            return False
        try:
            waited = int(self.stats(self.tid).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return False  # (not measurable here: nothing waits)
        seen = self._seen
        if seen is None:
            self._seen = (now, waited)
        elif now - seen[0] >= WINDOW:
            self._contended = (waited - seen[1]) / (now - seen[0]) > CONTENDED
            self._seen = (now, waited)
        return self._contended


def _schedstat(tid: int) -> str:
    """A thread's scheduler statistics: seconds on a CPU, seconds runnable and waiting
    for one (ns), timeslices (Linux)."""
    with open(f"/proc/self/task/{tid}/schedstat") as fh:
        return fh.read()


class RunningHash:
    """A SHA-256 fed in order, whose state the hash threads replace piece by piece: each
    piece is hashed into a copy, kept only if no other lane took the piece over meanwhile
    (see HashThread)."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        self.state.update(data)

    def hexdigest(self) -> str:
        return self.state.hexdigest()


@dataclass
class _Source:
    """A staging copy read back by the hash threads: a descriptor of our own (the copy's
    may be closed or reused meanwhile), kept while jobs still read it."""

    fd: int
    hasher: RunningHash
    jobs: int = 0  # queued ranges of it
    readers: int = 0  # lanes reading it now (one taken over may still be)


@dataclass
class _Job:
    """One queued step for a running hash: bytes to add (`data`), a byte range of a copy
    to read back and add (`source`, `start`, `end`; taken a piece at a time), or the value
    wanted by a waiting task (`task`)."""

    hasher: RunningHash
    data: bytes | None = None
    source: _Source | None = None
    start: int = 0
    end: int = 0
    task: trio.lowlevel.Task | None = None


@dataclass
class _Piece:
    """What a lane is hashing: a job (a range's part [start, end)), the lane, and whether
    the other lane took it over (then this lane's result is dropped)."""

    job: _Job
    start: int
    end: int
    last: bool  # the range's last piece: its source may go after it
    lane: str
    taken_over: bool = field(default=False)


class HashThread:
    """Running SHA-256s fed from the trio thread and computed on threads of their own, in
    two lanes. While nobody waits for a result, a background lane (SCHED_IDLE): on a core
    shared with the writer, the writes and the kernel's work for them go first and the
    hashing takes the time they leave; on a free core it runs at full speed. While a task
    waits (a value asked for, a writer held back, the mount stopping), a foreground lane at
    the process's priority: nothing that waits depends on a thread that any busy process
    may keep off the CPU (an unprivileged thread cannot raise its priority back, hence two
    threads). Pieces are at most HASH_CHUNK bytes, one at a time, hashed into a copy of the
    state and kept only by the lane that owns the piece at its end: the foreground lane takes
    over the piece the background one is in, rather than wait for it.

    A write's bytes are queued as a range of its staging copy (`update_range`: nothing is
    held, they are read back from the page cache) or as a buffer (`update`). `backlog`:
    bytes queued and not hashed yet; a writer too far behind (`too_far_behind`) waits
    (`catch_up`), which bounds the memory the buffers hold and how far the read-back
    trails."""

    def __init__(self, name: str = "hash") -> None:
        self.name = name
        self._queued = 0  # bytes queued so far
        self._done = 0  # bytes hashed so far
        self._held = 0  # bytes of queued buffers
        self._lock = threading.Lock()  # guards everything below and the counters
        # Where each lane waits for its turn (one lane woken at a time: a write wakes no
        # thread that would only go back to sleep).
        self._wake = {lane: threading.Condition(self._lock) for lane in LANES}
        self._jobs: deque[_Job] = deque()
        self._sources: dict[int, _Source] = {}  # by id(hasher): open read-backs
        self._urgent = 0  # tasks waiting for the lanes
        self._piece: _Piece | None = None  # being hashed
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._token: trio.lowlevel.TrioToken | None = None  # of the run the lanes serve
        self._waiters: list[trio.Event] = []  # writers held back
        self._failed: dict[int, tuple[RunningHash, str]] = {}  # reads that went wrong
        self.writer = WriterFirst()  # the background lane waits while it holds
        self._yielding = False  # the background lane waits for the writer

    @property
    def backlog(self) -> int:
        return self._queued - self._done

    @property
    def held(self) -> int:
        return self._held

    @property
    def too_far_behind(self) -> bool:
        return self._held > HELD_LIMIT or self.backlog > LAG_LIMIT

    def update(self, hasher: RunningHash, data: bytes) -> None:
        """Queue `hasher.update(data)` (not copied: the caller must not change the bytes)."""
        self._start()
        self.writer.wrote()
        with self._lock:
            self._queued += len(data)
            self._held += len(data)
            self._jobs.append(_Job(hasher, data=data))
            self._notify()

    def update_range(self, hasher: RunningHash, fd: int, offset: int, length: int) -> None:
        """Queue `hasher.update` with bytes [offset, offset+length) of the open file `fd`,
        read back when their turn comes: the caller must not change them before the hash
        is taken (a copy written out of order drops its running hash). The descriptor may
        be closed once this returns."""
        if length <= 0:
            return
        self._start()
        self.writer.wrote()
        with self._lock:
            self._queued += length
            last = self._jobs[-1] if self._jobs else None
            if last is not None and last.source is not None and last.hasher is hasher \
                    and last.end == offset:
                last.end += length  # (the same run of writes: one job)
            else:
                source = self._sources.get(id(hasher))
                if source is None or source.hasher is not hasher:
                    source = self._sources[id(hasher)] = _Source(os.dup(fd), hasher)
                source.jobs += 1
                self._jobs.append(_Job(hasher, source=source, start=offset,
                                       end=offset + length))
            self._notify()

    async def hexdigest(self, hasher: RunningHash) -> str:
        """The hash's value once every update queued before has run (OSError if a range
        could not be read back)."""
        self._start()
        with self._lock:
            self._urgent += 1  # (until the job is served)
            self._jobs.append(_Job(hasher, task=trio.lowlevel.current_task()))
            self._notify()
        result = await trio.lowlevel.wait_task_rescheduled(
            lambda _: trio.lowlevel.Abort.FAILED)
        return cast(str, result)

    async def catch_up(self) -> None:
        """Until the hash threads are half as far behind as `too_far_behind` allows (the
        foreground lane hashes meanwhile)."""
        await self._wait_for(lambda: self._held <= HELD_LIMIT // 2
                             and self.backlog <= LAG_LIMIT // 2)

    async def drained(self, limit: int = 0) -> None:
        """Until at most `limit` bytes are waiting to be hashed."""
        await self._wait_for(lambda: self.backlog <= limit)

    async def _wait_for(self, check: Callable[[], bool]) -> None:
        if check():
            return
        self._start()
        with self._lock:
            self._urgent += 1
            self._notify()
        try:
            while not check():
                event = trio.Event()
                self._waiters.append(event)
                try:
                    if not check():  # (the lanes may have caught up meanwhile)
                        await event.wait()
                finally:
                    self._waiters.remove(event)
        finally:
            with self._lock:
                self._urgent -= 1

    def _start(self) -> None:
        token = trio.lowlevel.current_trio_token()
        if token is self._token:
            return
        # A new trio run (tests run several with one engine): the lanes of the last one
        # finish what they were given first, so no hash sees its bytes out of order.
        self.close()
        with self._lock:
            self._token, self._stopping = token, False
        self._threads = [threading.Thread(target=self._serve, args=(lane, token), daemon=True,
                                          name=f"{self.name}-{lane}")
                         for lane in LANES]
        for thread in self._threads:
            thread.start()

    # -- the lanes (lock held unless said otherwise) --------------------------------------
    def _wanted(self) -> str:
        """The lane whose turn it is."""
        return FOREGROUND if self._urgent or self._stopping else BACKGROUND

    def _notify(self) -> None:
        """Wake the lane whose turn it is, if it sleeps (not the background lane while the
        writer holds it: it looks again by itself, and a write does not wake it)."""
        lane = self._wanted()
        if lane == FOREGROUND or not self._yielding:
            self._wake[lane].notify()

    def _next(self, lane: str) -> _Piece | None:
        """The piece `lane` is to hash now, if any: the next one of the queue, or (the
        foreground lane) the one the background lane is in."""
        if lane != self._wanted():
            return None
        piece = self._piece
        if piece is not None:
            if piece.lane == lane or lane == BACKGROUND:
                return None
            piece.taken_over = True
            self._piece = _Piece(piece.job, piece.start, piece.end, piece.last, lane)
            return self._piece
        if not self._jobs:
            return None
        job = self._jobs[0]
        start = job.start
        if job.source is None:
            self._jobs.popleft()
            self._piece = _Piece(job, 0, 0, False, lane)
        else:
            job.start = min(job.end, start + HASH_CHUNK)
            last = job.start == job.end
            if last:
                self._jobs.popleft()
            self._piece = _Piece(job, start, job.start, last, lane)
        return self._piece

    def _serve(self, lane: str, token: trio.lowlevel.TrioToken) -> None:
        if lane == BACKGROUND and not set_background_priority():
            log.debug("the hash thread's priority cannot be lowered here")
        buf = bytearray(HASH_CHUNK)
        while True:
            held = lane == BACKGROUND and self.writer.holds()
            with self._lock:
                piece = None if held else self._next(lane)
                if piece is None:
                    if self._stopping and not self._jobs and self._piece is None:
                        return
                    self._yielding = held
                    self._wake[lane].wait(BURST_GAP if held else None)
                    self._yielding = False
                    continue
                state = piece.job.hasher.state.copy()
                source = piece.job.source
                if source is not None:
                    source.readers += 1
            result = self._run(piece, state, buf)  # (no lock held)
            with self._lock:
                if source is not None:
                    source.readers -= 1
                if piece.taken_over:
                    if source is not None:
                        self._release(source)
                    continue  # (the foreground lane hashed it again and keeps its result)
                self._piece = None
                if piece.job.task is None:
                    piece.job.hasher.state = state
                self._finish(piece)
                if self._jobs:
                    self._notify()  # (the other lane, if the turn changed)
                elif self._stopping:
                    self._wake[BACKGROUND].notify_all()  # (it waits to end)
            if piece.job.task is not None:
                self._tell(token, trio.lowlevel.reschedule, piece.job.task, result)
            elif self._waiters:
                for event in list(self._waiters):
                    self._tell(token, event.set)

    def _run(self, piece: _Piece, state: hashlib._Hash, buf: bytearray) -> outcome.Outcome:
        """Hash one piece into `state` (no lock held); for a value asked for, the outcome
        to hand back."""
        job = piece.job
        failed = self._failed.get(id(job.hasher))
        if failed is not None and failed[0] is not job.hasher:
            failed = None
        if job.task is not None:
            if failed is not None:
                return outcome.Error(OSError(f"a staging copy could not be read back for "
                                             f"its hash: {failed[1]}"))
            return outcome.Value(state.hexdigest())
        if job.data is not None:
            state.update(job.data)
            return outcome.Value(None)
        assert job.source is not None
        if failed is not None:
            return outcome.Value(None)  # (its value is an error already)
        offset, end = piece.start, piece.end
        view = memoryview(buf)
        while offset < end:
            try:
                n = os.preadv(job.source.fd, [view[:end - offset]], offset)
            except OSError as exc:
                reason = str(exc)
            else:
                if n:
                    state.update(view[:n])
                    offset += n
                    continue
                reason = f"it ended before byte {end}"  # (truncated: a stale hash)
            with self._lock:
                if not piece.taken_over:
                    self._failed[id(job.hasher)] = (job.hasher, reason)
                    while len(self._failed) > 64:  # (nobody asks for a stale hash's value)
                        del self._failed[next(iter(self._failed))]
            break
        return outcome.Value(None)

    def _finish(self, piece: _Piece) -> None:
        """Count a hashed piece; a range's last piece lets its source go."""
        job = piece.job
        if job.task is not None:
            self._urgent -= 1
            failed = self._failed.get(id(job.hasher))
            if failed is not None and failed[0] is job.hasher:
                del self._failed[id(job.hasher)]
        elif job.data is not None:
            self._done += len(job.data)
            self._held -= len(job.data)
        else:
            self._done += piece.end - piece.start
            source = job.source
            if piece.last and source is not None:
                source.jobs -= 1
                self._release(source)

    def _release(self, source: _Source) -> None:
        """Close a source no queued range and no lane needs any more (once)."""
        if source.jobs or source.readers or source.fd < 0:
            return
        os.close(source.fd)
        source.fd = -1
        if self._sources.get(id(source.hasher)) is source:
            del self._sources[id(source.hasher)]

    @staticmethod
    def _tell(token: trio.lowlevel.TrioToken, fn: Callable[..., object],
              *args: object) -> None:
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass  # nobody waits any more; the updates after it still run

    def close(self) -> None:
        """Stop the lanes once what is queued has run (in the foreground lane)."""
        threads, self._threads, self._token = self._threads, [], None
        if not threads:
            return
        with self._lock:
            self._stopping = True
            for wake in self._wake.values():
                wake.notify_all()
        for thread in threads:
            thread.join()
