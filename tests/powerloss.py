"""A simulated power loss for the core: a `Disk` (fsrepo/group_commit.py) that does the real
syncs and remembers, for every file under the local state folder, its content as of the
last sync that covered it. `image` writes that out as a new state folder: what a disk that
kept nothing unsynced would hold after the power came back (the strictest case; a real
disk may keep more, never less). SQLite's shared-memory index is left out, as a reboot
loses it; SQLite rebuilds it from the WAL.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fsrepo.group_commit import LocalDisk

SKIPPED = ("state.db-shm", "lock")


class PowerLossDisk(LocalDisk):
    def __init__(self, root: Path) -> None:
        self.root = root  # the local state folder
        self.synced: dict[str, bytes] = {}  # path relative to the root -> content
        self.filesystem_syncs = 0
        self.file_syncs = 0

    def sync_filesystem(self, root: Path) -> None:
        super().sync_filesystem(root)
        assert root == self.root
        self.filesystem_syncs += 1
        self.synced = {}
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name not in SKIPPED:
                try:
                    self.synced[path.relative_to(root).as_posix()] = path.read_bytes()
                except FileNotFoundError:
                    pass  # removed meanwhile

    def sync_files(self, paths: Iterable[Path]) -> None:
        paths = list(paths)
        super().sync_files(paths)
        self._synced(paths)

    def sync_data(self, paths: Iterable[Path]) -> None:
        paths = list(paths)
        super().sync_data(paths)
        self._synced(paths)

    def _synced(self, paths: list[Path]) -> None:
        self.file_syncs += 1
        for path in paths:
            rel = path.relative_to(self.root).as_posix()
            try:
                self.synced[rel] = path.read_bytes()
            except FileNotFoundError:
                self.synced.pop(rel, None)

    def image(self, state_dir: Path) -> None:
        """Write what survived the power loss as the state folder `state_dir`."""
        state_dir.mkdir(parents=True, exist_ok=True)
        for rel, data in self.synced.items():
            target = state_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
