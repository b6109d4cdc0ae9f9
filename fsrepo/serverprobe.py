"""Does the server honour conditional writes? Asked once, remembered for a day.

Every cross-machine guarantee rests on `If-None-Match: *` and `If-Match: <etag>` PUTs
failing with 412 when their condition does not hold. AWS S3, MinIO, R2 and moto honour
them; some S3-compatible servers (s3rver, `rclone serve s3`, ...) accept the headers and
ignore them, so two machines overwrite each other without an error. The probe writes one
object under the repository's prefix, tries both conditions on it, and deletes it again:
four requests. The answer is kept in the local cache root (never in the bucket), per
endpoint and bucket, for `REMEMBER_FOR` seconds.

`file://` repositories are never probed: the local backend implements both conditions
itself (`os.link` publishes only new names, an `flock` serialises If-Match writes).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import ObjectNotFound, PreconditionFailed
from .store.base import Store

log = logging.getLogger(__name__)

PROBE_PREFIX = "probe/"
REMEMBER_FOR = 24 * 3600.0
WRONG_ETAG = '"00000000000000000000000000000000"'


@dataclass(frozen=True)
class ProbeResult:
    """What the server did with the two conditions (None: it honoured both)."""

    conditional: bool
    ignored: str | None  # the header the server ignored, for messages
    checked: float
    requests: int  # how many requests the probe cost (0 when remembered)


async def probe_conditional_writes(store: Store) -> ProbeResult:
    """Write a probe object, overwrite it with both failing conditions, delete it."""
    key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    requests = 1
    etag = await store.put(key, b"imgrepo conditional-write probe\n")
    ignored: str | None = None
    try:
        requests += 1
        try:
            await store.put(key, b"If-None-Match was ignored\n", if_none_match=True)
            ignored = "If-None-Match"
        except PreconditionFailed:
            pass
        requests += 1
        try:
            await store.put(key, b"If-Match was ignored\n", if_match=WRONG_ETAG)
            ignored = ignored or "If-Match"
        except (PreconditionFailed, ObjectNotFound):
            pass
    finally:
        requests += 1
        await store.delete(key)
    if ignored:
        log.warning("%s ignores %s on PUT (etag %s was overwritten): single-writer mode",
                    store.url, ignored, etag)
    return ProbeResult(ignored is None, ignored, time.time(), requests)


def server_key(settings: Settings) -> str | None:
    """Endpoint + bucket of an s3:// storage URL; None for file:// (nothing to probe)."""
    if not settings.storage.startswith("s3://"):
        return None
    bucket = settings.storage[len("s3://"):].split("/", 1)[0]
    return f"{settings.endpoint_url or 'aws'} {bucket}"


class ProbeMemory:
    """Probe answers per endpoint+bucket, in `<cache root>/servers.json`."""

    def __init__(self, path: Path, remember_for: float = REMEMBER_FOR) -> None:
        self.path = path
        self.remember_for = remember_for

    def _load(self) -> dict[str, dict]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def recall(self, key: str, now: float | None = None) -> ProbeResult | None:
        row = self._load().get(key)
        now = time.time() if now is None else now
        if not isinstance(row, dict) or not isinstance(row.get("checked"), int | float):
            return None
        if now - row["checked"] > self.remember_for:
            return None
        return ProbeResult(bool(row.get("conditional")), row.get("ignored"), row["checked"], 0)

    def remember(self, key: str, result: ProbeResult) -> None:
        rows = self._load()
        rows[key] = {"conditional": result.conditional, "ignored": result.ignored,
                     "checked": result.checked}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rows, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


async def server_honours_conditions(store: Store, settings: Settings) -> ProbeResult:
    """The remembered answer for this endpoint+bucket, or a fresh probe (then remembered)."""
    key = server_key(settings)
    if key is None:
        return ProbeResult(True, None, time.time(), 0)
    memory = ProbeMemory(settings.cache_root / "servers.json")
    known = memory.recall(key)
    if known is not None:
        return known
    result = await probe_conditional_writes(store)
    memory.remember(key, result)
    return result
