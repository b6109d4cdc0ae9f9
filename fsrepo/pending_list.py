"""Which files are not in the bucket yet, by path: what `--status --pending` lists.

A file is pending while the journal names it with content the bucket is not known to have
(content already there, from this machine or another, is not pending: it costs no upload).
Only each name's last version counts: a file written three times is listed once."""

from __future__ import annotations

from typing import Any

from .journal import Journal
from .manifest import FileEntry
from .paths import entry_path
from .uploader import Uploader

MAX_LISTED = 10_000  # more than anyone reads; the totals still count every file


def pending_files(journal: Journal, uploader: Uploader, limit: int = MAX_LISTED
                  ) -> dict[str, Any]:
    """{"files": [{"path", "size", "sha256"}...] largest first, "total_files",
    "total_bytes", "listed_all"}."""
    blobs = uploader.schedule.pending_blobs()
    inodes = uploader.manifests.ns.inodes
    found: list[dict[str, Any]] = []
    for dir_id, ops in journal.by_dir.items():
        last = {p.op.name: p for p in ops}
        for name, p in last.items():
            e = p.op.entry
            if isinstance(e, FileEntry) and e.sha256 in blobs:
                found.append({"path": entry_path(inodes, dir_id, name), "size": e.size,
                              "sha256": e.sha256})
    found.sort(key=lambda f: (-f["size"], f["path"]))
    return {"files": found[:limit], "total_files": len(found),
            "total_bytes": sum(f["size"] for f in found), "listed_all": len(found) <= limit}
