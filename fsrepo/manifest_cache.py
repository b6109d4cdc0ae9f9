"""The manifests this machine last wrote, kept parsed and serialised entry by entry while
commits to their folders are frequent.

A `cp -r` of 1,000 files into one folder commits it batch by batch; re-reading, parsing
and serialising the folder's whole manifest for each batch made a commit cost what the
folder holds. With the folder's last written version kept here (its ETag and body too, to
know it is still the local state's copy), a commit applies its batch to it and encodes
only the entries that changed: the body is the kept fragments joined, byte for byte what
`manifest.serialise_manifest` writes.
"""

from __future__ import annotations

import base64
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .manifest import FORMAT, Entry, Manifest, entry_to_json, manifest_tail

KEPT_FOLDERS = 32  # folders whose last written manifest stays in memory
KEPT_FOR = 60.0  # seconds after its last commit a folder's manifest is dropped

_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# name -> (the entry encoded, `"name":{...}`, whether the name is UTF-8: "entries", else
# "raw_entries" under its base64)
Fragments = dict[bytes, tuple[Entry, str, bool]]


@dataclass
class _Written:
    etag: str
    body: bytes
    manifest: Manifest
    fragments: Fragments
    at: float


class WrittenManifests:
    """The last manifest written per folder (a bounded, short-lived cache: a folder not
    committed for `kept_for` seconds, or beyond the `kept` most recent, is read again from
    the local state)."""

    def __init__(self, kept: int = KEPT_FOLDERS, kept_for: float = KEPT_FOR,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kept = kept
        self.kept_for = kept_for
        self.clock = clock
        self._by_dir: OrderedDict[str, _Written] = OrderedDict()
        self.hits = 0  # commits that found their folder's manifest here

    def get(self, dir_id: str, etag: str | None, body: bytes | None) -> Manifest | None:
        """The kept manifest if it is the version the local state holds (same ETag and
        body), else None (and it is dropped). The caller must not change it."""
        written = self._by_dir.get(dir_id)
        if written is None:
            return None
        if etag != written.etag or body is None or (body is not written.body
                                                     and body != written.body):
            del self._by_dir[dir_id]
            return None
        self.hits += 1
        return written.manifest

    def forget(self, dir_id: str) -> None:
        """The folder's manifest was written (or deleted) some other way."""
        self._by_dir.pop(dir_id, None)

    def serialise(self, dir_id: str, manifest: Manifest) -> tuple[bytes, Fragments]:
        """The manifest's body, encoding only the entries that are not the very objects
        the folder's kept version encoded; with the fragments for `keep`."""
        written = self._by_dir.get(dir_id)
        before: Fragments = written.fragments if written is not None else {}
        fragments: Fragments = {}
        plain: list[str] = []
        encoded: list[str] = []
        for name in sorted(manifest.entries):
            entry = manifest.entries[name]
            kept = before.get(name)
            if kept is None or kept[0] is not entry:
                kept = _fragment(name, entry)
            fragments[name] = kept
            (plain if kept[2] else encoded).append(kept[1])
        parts = ['{"imgrepo_manifest":', _ENCODE(FORMAT), ',"dir_id":', _ENCODE(manifest.dir_id),
                 ',"entries":{', ",".join(plain), "}"]
        if encoded:
            parts += [',"raw_entries":{', ",".join(encoded), "}"]
        tail = manifest_tail(manifest)
        if tail:
            parts += [",", _ENCODE(tail)[1:-1]]
        parts.append("}")
        return "".join(parts).encode("utf-8"), fragments

    def keep(self, dir_id: str, etag: str, body: bytes, manifest: Manifest,
             fragments: Fragments) -> None:
        """`body` (from `serialise`) was written with this ETag."""
        now = self.clock()
        self._by_dir[dir_id] = _Written(etag, body, manifest, fragments, now)
        self._by_dir.move_to_end(dir_id)
        while len(self._by_dir) > self.kept:
            self._by_dir.popitem(last=False)
        for old_id, old in list(self._by_dir.items()):
            if now - old.at <= self.kept_for:
                break
            del self._by_dir[old_id]

    def __len__(self) -> int:
        return len(self._by_dir)


def _fragment(name: bytes, entry: Entry) -> tuple[Entry, str, bool]:
    value = _ENCODE(entry_to_json(entry))
    try:
        return entry, _ENCODE(name.decode("utf-8")) + ":" + value, True
    except UnicodeDecodeError:
        return entry, _ENCODE(base64.b64encode(name).decode()) + ":" + value, False


