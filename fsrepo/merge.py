"""Applying namespace operations to a directory's entries: the three-way merge.

Every local change is recorded as an `Op`: "name should become `entry` (None: be removed);
when I decided that, it was `base`". Applying an op to a manifest that someone else changed
meanwhile is then a three-way merge per name:

- the name still holds `base` (or already holds `entry`): the op applies as is;
- a removal meets a changed entry: the other writer's version wins (an edit beats a delete);
- a write meets a removed entry: the write wins (it recreates the name);
- a write meets a different version: both are kept, ours under a conflict name
  ``<stem> (conflict <host> <YYYY-MM-DD HHMMSS>)<suffix>``;
- a new directory meets another directory under its name: the name keeps theirs, and ours
  is *merged into* it (`merged` reports it; `dir_merge` moves our directory's content and
  pending ops into theirs, where the same rules apply name by name, so same-named
  subdirectories merge too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .manifest import MAX_NAME, DirEntry, Entry, FileEntry


@dataclass(frozen=True)
class Op:
    name: bytes
    entry: Entry | None
    base: Entry | None
    # States this machine's own earlier ops on the name passed through (set by `coalesce`):
    # finding one of them in the bucket means those ops already landed there (a crash
    # between a manifest write and retiring its ops), so it counts as the base.
    passed: tuple[Entry | None, ...] = ()


def conflict_name(name: bytes, host: str, when: float, taken: set[bytes] | dict) -> bytes:
    """A visible, unique sibling name for the losing side of a conflict."""
    dot = name.rfind(b".")
    stem, suffix = (name[:dot], name[dot:]) if dot > 0 and len(name) - dot <= 16 else (name, b"")
    stamp = time.strftime("%Y-%m-%d %H%M%S", time.gmtime(when))
    host_b = host.encode("utf-8", "replace")[:40] or b"unknown"
    for n in range(1, 1000):
        tag = b" (conflict " + host_b + b" " + stamp.encode() + (b"" if n == 1 else b" %d" % n) + b")"
        room = MAX_NAME - len(tag) - len(suffix)
        candidate = _cut(stem, room) + tag + suffix
        if candidate not in taken:
            return candidate
    raise RuntimeError("no free conflict name")  # 999 conflicts in one second on one name


def _cut(name: bytes, room: int) -> bytes:
    """The first `room` bytes of a name, not splitting a UTF-8 character in two."""
    cut = name[:room]
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return cut  # not UTF-8 anyway
    return cut.decode("utf-8", "ignore").encode("utf-8")


def same_content(a: Entry | None, b: Entry | None) -> bool:
    if isinstance(a, FileEntry) and isinstance(b, FileEntry):
        return a.sha256 == b.sha256
    if isinstance(a, DirEntry) and isinstance(b, DirEntry):
        return a.id == b.id
    return a == b


def same_object(a: Entry | None, b: Entry | None) -> bool:
    """Whether two entries denote the same inode: same directory id, or both non-dirs of
    one kind."""
    if a is None or b is None:
        return False
    if isinstance(a, DirEntry) or isinstance(b, DirEntry):
        return isinstance(a, DirEntry) and isinstance(b, DirEntry) and a.id == b.id
    return type(a) is type(b)


def coalesce(ops: list[Op]) -> list[Op]:
    """Fold successive ops on one name into one (first base, last entry), keeping order."""
    out: dict[bytes, Op] = {}
    for op in ops:
        prev = out.pop(op.name, None)
        if prev is None:
            out[op.name] = op
        else:
            out[op.name] = Op(op.name, op.entry, prev.base,
                              prev.passed + (prev.entry, op.base, *op.passed))
    return list(out.values())


def merges_into(current: Entry | None, op: Op) -> DirEntry | None:
    """The directory a new directory of ours merges into: theirs under the same name."""
    if isinstance(op.entry, DirEntry) and op.base is None and isinstance(current, DirEntry) \
            and current.id != op.entry.id and current not in op.passed:
        return current
    return None


def apply_op(entries: dict[bytes, Entry], op: Op, host: str, now: float,
             merged: dict[str, str] | None = None,
             moved: frozenset[str] | set[str] = frozenset()) -> bytes | None:
    """Apply one op in place; returns the conflict name if ours was diverted to one.
    With `merged` given, a new directory meeting theirs leaves theirs in place and is
    noted there (our id -> theirs); a directory `moved` here by a rename is not new (other
    machines know it) and goes to a conflict name instead."""
    current = entries.get(op.name)
    if current == op.entry:
        return None
    if current == op.base or same_content(current, op.base) or same_content(current, op.entry) \
            or current in op.passed:
        if op.entry is None:
            entries.pop(op.name, None)
        else:
            entries[op.name] = op.entry
        return None
    # Someone else changed this name since we saw it.
    if op.entry is None:
        return None  # their edit (or their delete) beats our delete
    if current is None:
        entries[op.name] = op.entry  # our write recreates what they deleted
        return None
    into = merges_into(current, op)
    if into is not None and merged is not None and isinstance(op.entry, DirEntry) \
            and op.entry.id not in moved:
        merged[op.entry.id] = into.id
        return None
    diverted = conflict_name(op.name, host, now, entries)
    entries[diverted] = op.entry
    return diverted


def apply_ops(entries: dict[bytes, Entry], ops: list[Op], host: str,
              now: float | None = None, merged: dict[str, str] | None = None,
              moved: frozenset[str] | set[str] = frozenset()) -> dict[bytes, bytes]:
    """Apply ops in order; returns {name: conflict name} for diverted writes. With
    `merged` given, new directories meeting theirs are merged (see `apply_op`)."""
    now = time.time() if now is None else now
    diverted: dict[bytes, bytes] = {}
    for op in coalesce(ops):
        if op.name in diverted and op.entry is not None:
            op = Op(diverted[op.name], op.entry, None)
        where = apply_op(entries, op, host, now, merged, moved)
        if where is not None:
            diverted[op.name] = where
    return diverted


def later(a: int | None, b: int | None) -> int | None:
    """A directory's names-changed time after merging two writers' changes: the later one
    (None: unknown, from a manifest written before the time was kept)."""
    if a is None or b is None:
        return b if a is None else a
    return max(a, b)


def moved_dirs(ops: list[Op]) -> set[str]:
    """Directories these ops remove from a name: a put of one of them is a rename (the
    directory exists elsewhere), not a new directory."""
    return {op.base.id for op in ops if op.entry is None and isinstance(op.base, DirEntry)}
