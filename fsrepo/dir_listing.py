"""The folder manifests the bucket holds now: one listing of `dirs/` (each manifest's id
with its size, time and etag), and one manifest read at the version listed. Snapshots
(record, diff), --verify, --gc and the removal marks' collection all read the tree this way.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from .errors import ObjectNotFound
from .repository import manifest_key
from .store.base import ObjectInfo, Store, StoredObject

_DIR_KEY = re.compile(r"dirs/([0-9A-Za-z_-]{1,64})\.json")  # fullmatch: no "\n" after

# This machine's copy of a manifest if it is the version with that etag (None: it is not).
ManifestSource = Callable[[str, str | None], Awaitable[bytes | None]]


async def listed_manifests(store: Store, odd: Callable[[str], None] | None = None, *,
                           prefix: str = "") -> dict[str, ObjectInfo]:
    """Every manifest in the bucket by directory id (only the ids starting with `prefix`);
    `odd` hears every other key."""
    out: dict[str, ObjectInfo] = {}
    async for info in store.list("dirs/" + prefix):
        m = _DIR_KEY.fullmatch(info.key)
        if m is None:
            if odd is not None:
                odd(info.key)
            continue
        out[m.group(1)] = info
    return out


async def manifest_now(store: Store, dir_id: str, etag: str | None,
                       cached: ManifestSource) -> bytes | None:
    """A listed manifest's bytes: this machine's copy if it is the listed version, else the
    bucket's; None if it was deleted since the listing."""
    data = await cached(dir_id, etag)
    if data is not None:
        return data
    try:
        got = await store.get(manifest_key(dir_id))
    except ObjectNotFound:
        return None
    assert isinstance(got, StoredObject)
    return got.data
