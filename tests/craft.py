"""Building repositories by hand (file:// layout) for tests of damaged or hostile buckets.

Everything here writes the bucket's objects directly, bypassing imgrepo, so a test can
create exactly the damage it wants to see handled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from fsrepo.repository import FORMAT_VERSION


def new_repo(root: Path) -> Path:
    """An empty repository (descriptor only) in the folder `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "imgrepo.json").write_text(json.dumps({
        "format": "imgrepo", "version": FORMAT_VERSION, "hash": "sha256",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repo_id": uuid.uuid4().hex}))
    return root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / "sha256" / digest[:2] / digest


def put_blob(root: Path, data: bytes, name: str | None = None) -> str:
    """Store `data` as a blob (under its own hash, or under `name` to fake corruption)."""
    digest = name or sha(data)
    path = blob_path(root, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def file_entry(digest: str, size: int, mode: int = 0o644) -> dict[str, Any]:
    return {"type": "file", "sha256": digest, "size": size, "mtime_ns": 1_700_000_000 * 10**9,
            "mode": mode}


def file_of(root: Path, data: bytes) -> dict[str, Any]:
    """Store a blob and return a valid entry for it."""
    return file_entry(put_blob(root, data), len(data))


def dir_entry(dir_id: str) -> dict[str, Any]:
    return {"type": "dir", "id": dir_id, "mtime_ns": 1_700_000_000 * 10**9, "mode": 0o755}


def put_manifest(root: Path, dir_id: str, entries: dict[str, Any] | None = None,
                 raw_entries: dict[bytes, Any] | None = None, *, body: bytes | None = None,
                 **extra: Any) -> Path:
    """Write dirs/<dir_id>.json: a manifest of `entries` (names as JSON keys) and
    `raw_entries` (names base64-encoded), or exactly `body`."""
    if body is None:
        doc: dict[str, Any] = {"imgrepo_manifest": 1, "dir_id": dir_id,
                               "entries": entries or {}}
        if raw_entries:
            doc["raw_entries"] = {base64.b64encode(k).decode(): v
                                  for k, v in raw_entries.items()}
        doc.update(extra)
        body = json.dumps(doc).encode()
    path = root / "dirs" / f"{dir_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under `folder`, to prove nothing changed."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out
