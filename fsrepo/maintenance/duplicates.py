"""`--duplicates`: groups of files with identical content under a folder, found from the
manifests alone (every file entry carries its SHA-256; no file is downloaded).

Runs inside the mount, over the same directory views the mount shows (pending changes
included), walked as --sync walks them (tree_walk.py). Deleting a copy is then an ordinary
`rm`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..manifest import FileEntry


def duplicate_groups(files: Iterable[tuple[str, FileEntry]]) -> list[dict[str, Any]]:
    """Files grouped by content, groups of two or more only, the most space first: each
    {"sha256", "size", "count", "paths", "space_without_dedup", "saved"}."""
    by_sha: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for path, entry in files:
        by_sha.setdefault(entry.sha256, []).append(path)
        sizes[entry.sha256] = entry.size
    groups = []
    for sha, paths in by_sha.items():
        if len(paths) < 2 or sizes[sha] == 0:
            continue  # empty files are all "identical" and cost nothing
        size = sizes[sha]
        groups.append({"sha256": sha, "size": size, "count": len(paths),
                       "paths": sorted(paths), "space_without_dedup": size * len(paths),
                       "saved": size * (len(paths) - 1)})
    groups.sort(key=lambda g: (-g["saved"], g["paths"][0]))
    return groups
