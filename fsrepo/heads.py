"""Change records in the bucket: which directories each writer changed lately.

    heads/<writer-id>.json   one per writer (a local state dir), written only by it:
                             {"writer", "host", "seq", "forgotten", "changes": [[seq, dir_id]]}
    heads-touched.json       rewritten (new content, new etag) after every head write

A writer numbers each round of manifest commits (`seq`) and keeps the last RING_SIZE changed
directories with the seq that last changed them; `forgotten` is the newest seq whose
directories may have dropped out of the ring. A reader that last applied seq S of a writer
revalidates the directories with a seq above S, or everything if `forgotten` > S. Writers
never contend (each writes its own key, unconditionally); readers poll `heads-touched.json`
with one conditional GET per interval and read the heads only when it changed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .manifest import is_valid_dir_id

HEADS_PREFIX = "heads/"
TOUCH_KEY = "heads-touched.json"
RING_SIZE = 4096  # directories a head names: the changes a reader may fall behind by
_WRITER_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")  # fullmatch (`$` would accept a "\n")


def head_key(writer: str) -> str:
    return f"{HEADS_PREFIX}{writer}.json"


def writer_of(key: str) -> str | None:
    """The writer id a head's key names; None for a key that is not a head."""
    if not key.startswith(HEADS_PREFIX) or not key.endswith(".json"):
        return None
    writer = key[len(HEADS_PREFIX):-len(".json")]
    return writer if _WRITER_RE.fullmatch(writer) else None


class HeadError(ValueError):
    """A head object that cannot be read (damaged, or from a newer imgrepo)."""


@dataclass(frozen=True)
class Head:
    writer: str
    host: str
    seq: int
    forgotten: int
    changes: tuple[tuple[int, str], ...]  # (seq, dir_id), newest first

    def changed_since(self, seen: int) -> set[str] | None:
        """The directories changed after seq `seen`; None when the ring no longer reaches
        back that far (changes were missed: revalidate everything)."""
        if self.forgotten > seen:
            return None
        return {dir_id for seq, dir_id in self.changes if seq > seen}


def serialise_head(head: Head) -> bytes:
    return json.dumps({"writer": head.writer, "host": head.host, "seq": head.seq,
                       "forgotten": head.forgotten,
                       "changes": [[s, d] for s, d in head.changes]},
                      separators=(",", ":")).encode()


def parse_head(data: bytes, key: str) -> Head:
    try:
        raw = json.loads(data)
        changes = tuple((int(s), str(d)) for s, d in raw["changes"])
        head = Head(str(raw["writer"]), str(raw.get("host", "")), int(raw["seq"]),
                    int(raw.get("forgotten", 0)), changes)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError):
        raise HeadError(f"{key}: not a readable change record") from None
    if head.seq < 0 or any(s > head.seq for s, _ in changes):
        raise HeadError(f"{key}: change record with impossible sequence numbers")
    if not _WRITER_RE.fullmatch(head.writer) or not all(is_valid_dir_id(d) for _, d in changes):
        raise HeadError(f"{key}: change record with a malformed writer or directory id")
    return head
