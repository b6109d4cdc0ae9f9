"""Names as a user would type them: a directory id or a (directory, name) pair shown as a
path under the mountpoint, for logs and status answers (never b'...' or a bare id)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .inodes import ROOT_INO, InodeTable

MAX_DEPTH = 4096  # a loop in a corrupt table must not hang a log line


def show_name(name: bytes) -> str:
    """One name as text: undecodable bytes come back as the shell would show them."""
    return name.decode("utf-8", "backslashreplace")


def dir_path(inodes: InodeTable, dir_id: str) -> str | None:
    """The directory's path from the root ("/" for the root), or None while the table does
    not know where it is (no inode: the kernel never looked it up or forgot it)."""
    node = inodes.of_dir(dir_id)
    parts: list[str] = []
    for _ in range(MAX_DEPTH):
        if node is None or node.parent == 0:
            return None
        if node.ino == ROOT_INO:
            return "/" + "/".join(reversed(parts))
        parts.append(show_name(node.name))
        node = inodes.get(node.parent)
    return None


def entry_path(inodes: InodeTable, dir_id: str, name: bytes | None = None) -> str:
    """A path for a log line or a status answer: the full path when the directory is known,
    else the name with its folder's id (still findable with --status, never silent)."""
    where = dir_path(inodes, dir_id)
    if name is None:
        return where if where is not None else f"(folder {dir_id})"
    if where is None:
        return f"{show_name(name)} (in folder {dir_id})"
    return where.rstrip("/") + "/" + show_name(name)


def blob_path(by_dir: Mapping[str, Iterable[Any]], inodes: InodeTable, sha: str) -> str:
    """A path the journal gives content `sha` (for a log line about its upload), or the
    content's short id when no pending change names it any more."""
    for dir_id, ops in by_dir.items():
        for p in ops:
            entry = p.op.entry
            if getattr(entry, "sha256", None) == sha:
                return entry_path(inodes, dir_id, p.op.name)
    return f"content {sha[:12]}"
