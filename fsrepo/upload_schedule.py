"""What of the journal is due to go to the bucket, and when: the batching rules.

A directory's pending ops are committed together, in one manifest write. A commit waits
until the directory has been quiet for `quiet` seconds or its oldest op has waited
`commit_delay`, unless someone waits for the upload (`kick`, flush mode). A batch that
leaves some of the directory's ops behind (their blobs still on their way) goes at most
once per `commit_delay` per directory, waiter or not: each write carries the whole
manifest, so a `cp -r` of 1,000 files costs a handful of manifest writes, not one per
upload that lands; an op still waits at most `commit_delay` once its blob is there.

An op is due only when the blob it references is in the bucket, and a rename's removal only
after its addition, so the bucket never references a missing blob and never loses a name in
between. Each name's ops go in their order; a name held back holds back no other name
(`committable`: ops on different names commute).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

from .journal import Journal, PendingOp
from .manifest import FileEntry, SymlinkEntry
from .namespace import EMPTY_SHA
from .remote_index import RemoteIndex

FLUSH_HOLD = 1.0  # seconds a kick() keeps the schedule in flush mode
# A rewritten file (its name held content before) is uploaded once it has stayed unchanged
# this long, as rclone's --vfs-write-back does: a file saved again and again (an editor, a
# database reopened for each transaction) uploads its last version, not every one. New
# files go at once; someone waiting (flush mode) waits for nothing.
WRITEBACK_DELAY = 5.0


class UploadSchedule:
    """When each journaled op was first seen, flush mode, and the rules built on them."""

    def __init__(self, journal: Journal, remote: RemoteIndex, *, commit_delay: float,
                 quiet: float, writeback_delay: float = WRITEBACK_DELAY) -> None:
        self.journal = journal
        self.remote = remote
        self.writeback_delay = writeback_delay
        self.commit_delay = commit_delay
        self.quiet = quiet
        self._seen: dict[int, float] = {}  # seq -> when the schedule first saw the op
        self._last_commit: dict[str, float] = {}  # dir_id -> when its last commit started
        # pending_blobs() as last worked out, kept while the journal is unchanged (the
        # uploads that finish are taken out: `uploaded`): the loop looks at it after every
        # upload, and working it out costs what the journal holds
        self._pending_for: object = None
        self._pending: dict[str, int] = {}
        self._dirs_of: dict[str, set[str]] = {}  # blob -> directories whose ops need it
        self._waiting: Counter[str] = Counter()  # directory -> its blobs in `_pending`
        self._flush_until = 0.0  # flush mode (no batching) lasts while waiters keep kicking
        self.next_due = math.inf  # when the earliest batch held back becomes due

    # -- flush mode -------------------------------------------------------------------------
    def kick(self) -> None:
        """Someone waits for the journal to drain: commit without batching delays. Waiters
        kick at least every FLUSH_HOLD seconds; once they stop (or the queue drained),
        batching resumes, so writes that start right after a wait are batched again."""
        self._flush_until = time.monotonic() + FLUSH_HOLD

    def drained(self) -> None:
        """A waiter saw the queue empty and leaves: writes that follow are batched again."""
        self._flush_until = 0.0

    @property
    def flushing(self) -> bool:
        return time.monotonic() < self._flush_until

    # -- seeing ops -------------------------------------------------------------------------
    def left_by_earlier_run(self) -> None:
        """Ops already journaled when the uploader starts are due at once."""
        for seq in self.journal.by_seq:
            self._seen.setdefault(seq, -math.inf)

    def observe(self, now: float) -> None:
        """Note the ops journaled since the last look; start a new round of `next_due`."""
        for seq in self.journal.by_seq:
            self._seen.setdefault(seq, now)
        self.next_due = math.inf
        if len(self._seen) > 2 * len(self.journal.by_seq) + 1000:
            self._seen = {s: t for s, t in self._seen.items() if s in self.journal.by_seq}
        if len(self._last_commit) > 2 * len(self.journal.by_dir) + 1000:
            self._last_commit = {d: t for d, t in self._last_commit.items()
                                 if now - t < self.commit_delay}

    # -- blobs ------------------------------------------------------------------------------
    def pending_blobs(self) -> dict[str, int]:
        """Blobs the journal needs that are not yet in the bucket: sha -> size."""
        version = (self.journal.version, len(self.remote.unconfirmed))
        if version != self._pending_for:
            self._pending, self._dirs_of = self._work_out_pending()
            self._waiting = Counter(d for dirs in self._dirs_of.values() for d in dirs)
            self._pending_for = version
        return dict(self._pending)

    def uploaded(self, sha: str) -> None:
        """Blob `sha` is in the bucket now (or given up): no longer pending."""
        self._pending.pop(sha, None)
        for dir_id in self._dirs_of.pop(sha, ()):
            self._waiting[dir_id] -= 1

    def _work_out_pending(self) -> tuple[dict[str, int], dict[str, set[str]]]:
        out: dict[str, int] = {}
        dirs_of: dict[str, set[str]] = {}
        needs_upload = self.remote.needs_upload
        for dir_id, ops in self.journal.by_dir.items():
            last = {p.op.name: p for p in ops}
            # A superseded entry is never written, unless what supersedes it must wait for
            # another commit (a rename's removal, or an op after one: `_held_after_a_gap`):
            # then the name's ops before that wait are committed first, and they write their
            # own last entry of the name. Worked out as `committable` does, every blob taken
            # to be there: a blob left out here is never sent, and a batch needing it would
            # wait for ever (a file written, then removed after a folder's move that waits
            # for another folder's commit, which waits for this one).
            ready = {p.op.name: p for p in self._batch(ops, lambda p: False)}
            for p in ops:
                e = p.op.entry
                if isinstance(e, FileEntry) and e.chunks is None and needs_upload(e.sha256) \
                        and (last[p.op.name] is p or ready.get(p.op.name) is p):
                    out[e.sha256] = e.size
                    dirs_of.setdefault(e.sha256, set()).add(dir_id)
        return out, dirs_of

    def settling(self, now: float) -> dict[str, float]:
        """Blobs of rewritten files not yet unchanged for `writeback_delay`: sha -> when
        their upload is due (nothing in flush mode)."""
        if self.flushing or self.writeback_delay <= 0:
            return {}
        out: dict[str, float] = {}
        for ops in self.journal.by_dir.values():
            for p in {p.op.name: p for p in ops}.values():
                e, base = p.op.entry, p.op.base
                if isinstance(e, FileEntry) and isinstance(base, FileEntry) \
                        and base.sha256 != EMPTY_SHA:
                    due = self._seen.get(p.seq, now) + self.writeback_delay
                    if due > now:
                        out[e.sha256] = min(due, out.get(e.sha256, due))
        return out

    def empty_wanted(self, now: float) -> bool:
        """A new file is journaled empty at create and replaced at close: upload the empty
        blob only for a file that stayed empty (its op is due), not for every create."""
        if self.flushing:
            return True
        for ops in self.journal.by_dir.values():
            for p in {p.op.name: p for p in ops}.values():
                e = p.op.entry
                if isinstance(e, FileEntry) and e.sha256 == EMPTY_SHA \
                        and self._seen[p.seq] + self.quiet <= now:
                    return True
        return False

    # -- commits ----------------------------------------------------------------------------
    def committable(self, dir_id: str) -> list[PendingOp]:
        """The directory's ops that can go now, in journal order: of each name, the longest
        run of its ops from its first that can go. Ops on different names commute (a
        manifest write applies each name's ops in their order and touches no other name),
        so a file held back (its blob still on its way, a rename's removal waiting for its
        addition) holds back no other file: files closed together, one of them stuck, do
        not wait for it. Only a file's or symlink's put goes past an op held back, though
        (`_held_after_a_gap`). An op whose blob is not in the bucket yet can go only with
        a later op on its name that replaces it (a file created empty, then written: its
        empty version is never uploaded)."""
        return self._batch(self.journal.by_dir.get(dir_id, []), self._needs_blob)

    def _batch(self, ops: list[PendingOp],
               needs_blob: Callable[[PendingOp], bool]) -> list[PendingOp]:
        """`committable` of these ops, `needs_blob` saying which still wait for theirs."""
        runs = self._runs(ops)
        while True:
            chosen: set[int] = set()
            for run in runs.values():
                while run and needs_blob(run[-1]):  # the batch writes a name's last op
                    run.pop()
                chosen.update(p.seq for p in run)
            cut = self._held_after_a_gap(ops, chosen)
            if cut is None:
                return [p for p in ops if p.seq in chosen]
            run = runs[cut.op.name]
            del run[run.index(cut):]

    @staticmethod
    def _held_after_a_gap(ops: list[PendingOp], chosen: set[int]) -> PendingOp | None:
        """The first chosen op after an op left out that is not a file's or a symlink's
        put: it waits too, with its name's later ops. A rename within a folder is two ops
        that nothing but their order ties (put the new name, remove the old): a removal
        after a gap may be the second half of one whose first half waits, and must not
        go first (the bucket would lose the file in between); a folder's put may be the
        first half of one whose removal waits (the folder listed twice meanwhile)."""
        gap = False
        for p in ops:
            if p.seq not in chosen:
                gap = True
            elif gap and not isinstance(p.op.entry, FileEntry | SymlinkEntry):
                return p
        return None

    def _runs(self, ops: list[PendingOp]) -> dict[bytes, list[PendingOp]]:
        """Each name's ops that nothing holds back: up to its first op that waits for
        another (`requires`, until that one is committed). An op not written to the local
        database yet, and every later one, is not ours to send."""
        runs: dict[bytes, list[PendingOp]] = {}
        held: set[bytes] = set()
        for p in ops:
            if not p.written:
                break
            name = p.op.name
            if name in held:
                continue
            if p.requires is not None and p.requires in self.journal.by_seq:
                held.add(name)
                continue
            runs.setdefault(name, []).append(p)
        return runs

    def _needs_blob(self, p: PendingOp) -> bool:
        """Whether the op's content must reach the bucket first. An entry that carries a
        chunk list came from a manifest (a rename, a restore): its chunks are there."""
        e = p.op.entry
        return isinstance(e, FileEntry) and e.chunks is None \
            and self.remote.needs_upload(e.sha256)

    def held_back(self, dir_id: str, now: float) -> bool:
        """Whether the directory's next commit can wait without a look at its ops: blobs
        it needs are still pending (after `pending_blobs`), so its batch would leave ops
        behind, and its last commit started less than `commit_delay` ago (see `due`)."""
        again = self._last_commit.get(dir_id, -math.inf) + self.commit_delay
        if self._waiting[dir_id] <= 0 or now >= again:
            return False
        self.next_due = min(self.next_due, again)
        return True

    def commit_started(self, dir_id: str) -> None:
        """A commit of the directory starts now: its next partial batch waits (`due`)."""
        self._last_commit[dir_id] = time.monotonic()

    def due(self, dir_id: str, batch: list[PendingOp], coming: set[str] | dict[str, int]) -> bool:
        """Whether `batch` (`committable`) of a directory's ops should be committed now
        (`coming`: the blobs on their way to the bucket or queued for it)."""
        now = time.monotonic()
        ops = self.journal.by_dir[dir_id]
        whole = len(batch) == len(ops)
        # A batch leaving ops behind goes at most once per commit_delay per directory.
        spaced = -math.inf if whole else \
            self._last_commit.get(dir_id, -math.inf) + self.commit_delay
        if self.flushing:
            # Someone waits: go as soon as the whole directory is ready, or nothing it
            # still needs is coming, or the batch has waited long enough.
            if whole:
                return True
            chosen = {p.seq for p in batch}
            waiting_for = {p.op.entry.sha256 for p in ops
                           if p.seq not in chosen and isinstance(p.op.entry, FileEntry)}
            if waiting_for.isdisjoint(coming):
                return True
            due = max(self._seen.get(ops[0].seq, now) + self.commit_delay, spaced)
        else:
            seen = [self._seen[p.seq] for p in ops]
            oldest = min(self._seen[p.seq] for p in batch)
            due = max(min(max(seen) + self.quiet, oldest + self.commit_delay), spaced)
        if due <= now:
            return True
        self.next_due = min(self.next_due, due)
        return False
