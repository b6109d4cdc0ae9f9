"""What verify and gc share: opening the repository in the bucket, listing its blobs and
its directory manifests, and running requests a bounded number at a time."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import trio

from ..config import Settings
from ..dir_listing import listed_manifests
from ..manifest import ROOT_ID
from ..paths import show_name
from ..repository import open_repository
from ..store import open_store
from ..store.base import Store
from .blobtable import BlobTable

PARALLEL = 16
_BLOB_KEY = re.compile(r"blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})")  # fullmatch: no "\n"

T = TypeVar("T")


async def open_checked(settings: Settings) -> Store:
    """The store, checked to hold a repository (nothing is created)."""
    if settings.storage.startswith("s3://"):
        from ..auth.commands import apply_login_environment
        apply_login_environment(settings)
    store = open_store(settings.storage, settings.endpoint_url, settings.region,
                       create=False)
    try:
        check = getattr(store, "check", None)
        if check is not None:
            await check()
        await open_repository(store, create=False)
    except BaseException:
        await store.aclose()
        raise
    return store


async def gather(items: Iterable[T], fn: Callable[[T], Awaitable[None]],
                 parallel: int) -> None:
    """Run `await fn(item)` for every item, `parallel` at a time (that many tasks, however
    many items: a million blobs are not a million tasks); the first error wins."""
    todo = iter(items)

    async def worker() -> None:
        for item in todo:  # shared: each item is taken by one worker
            await fn(item)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(parallel):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        from ..store.threads import first_error
        first = first_error(group)
        if first is group:
            raise
        raise first from None


async def list_blobs(store: Store, notes: list[dict[str, Any]]) -> BlobTable:
    """Every blob in the bucket with its size and mtime; odd keys are noted."""
    blobs = BlobTable()
    async for info in store.list("blobs/"):
        m = _BLOB_KEY.fullmatch(info.key)
        if m is None or m.group(1) != m.group(2)[:2]:
            notes.append({"kind": "unexpected-object", "key": info.key,
                          "message": f"{info.key!r}: not a blob key (ignored)"})
            continue
        blobs.add(m.group(2), info.size, info.mtime)
    return blobs.seal()


async def list_manifests(store: Store, notes: list[dict[str, Any]] | None) -> list[str]:
    """The directory ids of every manifest in the bucket; odd keys are noted (if `notes`)."""

    def odd(key: str) -> None:
        if notes is not None:
            notes.append({"kind": "unexpected-object", "key": key,
                          "message": f"{key!r}: not a manifest key (ignored)"})

    return list(await listed_manifests(store, odd))


def path_in(parents: Mapping[str, tuple[str, bytes] | None], dir_id: str,
            name: bytes | None = None) -> str:
    """A folder's path (or an entry's in it) from `parents` (directory id -> (parent id,
    name)); where they do not reach the root, the path starts at "(folder ID)"."""
    parts: list[str] = [] if name is None else [show_name(name)]
    seen: set[str] = set()
    current = dir_id
    while current != ROOT_ID:
        link = parents.get(current)
        if link is None or current in seen:
            parts.append(f"(folder {current})")
            break
        seen.add(current)
        parts.append(show_name(link[1]))
        current = link[0]
    return "/" + "/".join(reversed(parts))
