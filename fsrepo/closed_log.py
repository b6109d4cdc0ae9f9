"""The closed-file log: what close() records instead of hashing and journaling a file.

close() appends one line, "staging copy X is the content of this name", with one write()
and no fsync: the page cache keeps it through a `kill -9` of the mount, as it keeps the
copy itself. The group commit names the copy (hash, blob, journal entry) before it syncs,
and the line is dead once its copy is gone from the staging folder.

After a power loss the copy may be torn, and unlike a blob it has no name to be checked
against: each line carries the boot id it was written under, and recovery trusts a line
only under the same boot id (a crash of the process). A line from an earlier boot was not
covered by any group commit (that would have named its copy), so its content is absent, as
the contract says of what a power loss catches uncommitted.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .manifest import entry_from_json, entry_to_json
from .state import SyncedCopy

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
LOG_NAME = "closed.log"  # in the repository's state folder, beside the staging folder


def current_boot_id() -> str:
    """This boot's id (changes at every boot: a power loss, a kernel crash)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"  # (no procfs: lines are then trusted only by this boot's runs)


@dataclass(frozen=True)
class ClosedCopy:
    """One line of the log: a closed file's content, still a staging copy."""

    boot_id: str
    copy: SyncedCopy  # (its mtime_ns is the file's at close, or a later utimens)


class ClosedLog:
    """Append-only, one line per close() or attribute change of a closed copy."""

    def __init__(self, path: Path, boot_id: str | None = None) -> None:
        self.path = path
        self.boot_id = boot_id or current_boot_id()
        self._fd: int | None = None
        self.appended = 0  # lines written since the log was last emptied
        self._torn = False  # a write fell short: the next line starts on a line of its own

    def _line(self, copy: SyncedCopy) -> bytes:
        return (json.dumps([self.boot_id, copy.path, copy.dir_id, copy.name.hex(),
                            None if copy.base is None else entry_to_json(copy.base),
                            copy.mode, copy.mtime_ns], separators=(",", ":")) + "\n").encode()

    def append(self, copy: SyncedCopy) -> None:
        """Record a closed copy: one write(), no fsync."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        data = (b"\n" if self._torn else b"") + self._line(copy)
        self.appended += 1
        if os.write(self._fd, data) < len(data):  # (a full disk): the caller names it now
            self._torn = True
            raise OSError(errno.ENOSPC, "short write to the closed-file log")
        self._torn = False

    def clear(self, keep: Collection[SyncedCopy] = ()) -> None:
        """Every copy recorded is named (or gone) but those in `keep`: the log starts
        again, with only their lines (written beside it and renamed over it, so that a
        failure leaves the log as it was)."""
        if self.appended <= len(keep):
            return  # (nothing but their lines since the last time)
        if keep:
            fresh = self.path.with_name(self.path.name + ".new")
            fresh.write_bytes(b"".join(self._line(copy) for copy in keep))
            os.replace(fresh, self.path)
            self.close()  # (the next line goes to the new file)
        elif self._fd is not None:
            os.ftruncate(self._fd, 0)
        self.appended = len(keep)
        self._torn = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self) -> list[ClosedCopy]:
        """The log's lines, the last per copy (a later line of a copy replaces an earlier
        one), in the order of their last line; a torn or unreadable line is skipped."""
        try:
            text = self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return []
        found: dict[str, ClosedCopy] = {}
        for line in text.splitlines():
            if not line:
                continue  # (after a torn line: see `append`)
            try:
                boot, path, dir_id, name, base, mode, mtime = json.loads(line)
                copy = SyncedCopy(str(path), str(dir_id), bytes.fromhex(name),
                                  None if base is None else entry_from_json(base),
                                  int(mode), int(mtime))
            except (ValueError, TypeError):
                log.info("a torn line of %s skipped", self.path.name)
                continue
            found.pop(copy.path, None)
            found[copy.path] = ClosedCopy(str(boot), copy)
        return list(found.values())

    def trusted(self) -> list[SyncedCopy]:
        """What recovery may take as closed content: the lines of this boot. Those of an
        earlier boot are dropped (logged): a power loss came between."""
        kept = []
        for line in self.read():
            if line.boot_id == self.boot_id:
                kept.append(line.copy)
            else:
                log.info("%r was closed but not committed before the machine restarted: "
                         "its content is absent", line.copy.name)
        return kept

    def remove(self) -> None:
        """After recovery: the lines are done with."""
        self.close()
        self.path.unlink(missing_ok=True)
        self.appended = 0
