"""The repository format in the store (format version 3): where things live, the descriptor.

    imgrepo.json                    descriptor: format, version, hash, created, repo_id
    blobs/sha256/<h[0:2]>/<h>       file contents, immutable, named by their SHA-256
    dirs/<dir-id>.json              one manifest per directory; the root's id is "root"
    heads/<writer-id>.json          each writer's record of the directories it changed
    heads-touched.json              rewritten after every head write (see heads.py)
    snapshots/, snapshot-dirs/      snapshots and the manifest copies they name (snapshots.py)

Version 2 added the heads: a mount of version 1 does not write them, so other machines would
not see its changes; it refuses a version-2 repository ("upgrade imgrepo"). A writable mount
of this version upgrades a version-1 repository in place when it opens it.

Version 3 added snapshots: a version-2 imgrepo's --gc would delete blobs that only a
snapshot still names, so it refuses a version-3 repository; a writable mount upgrades a
version-2 one in place (the change is additive: nothing else moves).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

import trio

from .errors import ObjectNotFound, PreconditionFailed, RepositoryFormatError, StorageError
from .lease import LEASE_KEY
from .serverprobe import PROBE_PREFIX
from .store.base import Store, StoredObject

log = logging.getLogger(__name__)

DESCRIPTOR_KEY = "imgrepo.json"
FORMAT_NAME = "imgrepo"
FORMAT_VERSION = 3
HEADS_VERSION = 2  # the first format whose writers all write change records


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def manifest_key(dir_id: str) -> str:
    return f"dirs/{dir_id}.json"


@dataclass(frozen=True)
class Descriptor:
    repo_id: str
    version: int
    created: str


def parse_descriptor(data: bytes, where: str) -> Descriptor:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RepositoryFormatError(f"{where}: {DESCRIPTOR_KEY} is not valid JSON; "
                                    "this is not an imgrepo repository") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise RepositoryFormatError(f"{where}: {DESCRIPTOR_KEY} does not describe an imgrepo "
                                    "repository")
    version = raw.get("version")
    if type(version) is not int or version < 1:
        raise RepositoryFormatError(f"{where}: bad repository format version {version!r}")
    if version > FORMAT_VERSION:
        raise RepositoryFormatError(
            f"{where}: repository format {version} was written by a newer imgrepo "
            f"(this one reads format {FORMAT_VERSION}); upgrade imgrepo")
    if raw.get("hash") != "sha256" or not isinstance(raw.get("repo_id"), str):
        raise RepositoryFormatError(f"{where}: {DESCRIPTOR_KEY} is incomplete")
    return Descriptor(raw["repo_id"], version, str(raw.get("created", "")))


async def open_repository(store: Store, create: bool = True, settle: float = 0.0) -> Descriptor:
    """Read the descriptor; create the repository if the location is empty.

    A location that holds other data, or a newer format, is refused and left untouched.
    `settle` > 0 (servers without conditional writes): wait that long after writing a new
    descriptor and adopt whatever descriptor is there then, so two creations at once end
    with one repository id (see lease.py for why a short wait is enough)."""
    where = store.url
    try:
        obj = await store.get(DESCRIPTOR_KEY)
        assert isinstance(obj, StoredObject)
        desc = parse_descriptor(obj.data, where)
        if desc.version < FORMAT_VERSION and create:
            return await _upgrade(store, obj, desc)
        return desc
    except ObjectNotFound:
        pass
    if not create:
        raise RepositoryFormatError(f"{where}: no imgrepo repository here")
    async for info in store.list(""):
        if info.key == LEASE_KEY or info.key.startswith(PROBE_PREFIX):
            continue  # written by mounts while they decide how to write
        raise RepositoryFormatError(
            f"{where} already holds data that is not an imgrepo repository "
            f"(found {info.key!r}); use an empty bucket or another prefix")
    descriptor = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "hash": "sha256",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repo_id": uuid.uuid4().hex,
    }
    try:
        await store.put(DESCRIPTOR_KEY, json.dumps(descriptor, indent=1).encode(),
                        if_none_match=True)
        log.info("created a new repository at %s", where)
    except PreconditionFailed:
        pass  # another machine created it at the same moment: use theirs
    await trio.sleep(settle)
    obj = await store.get(DESCRIPTOR_KEY)
    assert isinstance(obj, StoredObject)
    return parse_descriptor(obj.data, where)


async def _upgrade(store: Store, obj: StoredObject, desc: Descriptor) -> Descriptor:
    """Raise the descriptor's version (If-Match: a descriptor changed meanwhile is read
    again). Not possible now (the storage or the write mode refuses): the repository stays
    at its version, and the caller treats it as such."""
    raw = json.loads(obj.data)
    raw["version"] = FORMAT_VERSION
    try:
        await store.put(DESCRIPTOR_KEY, json.dumps(raw, indent=1).encode(), if_match=obj.etag)
    except PreconditionFailed:
        again = await store.get(DESCRIPTOR_KEY)
        assert isinstance(again, StoredObject)
        return parse_descriptor(again.data, store.url)
    except StorageError as exc:
        log.warning("%s: repository format %d not upgraded to %d now: %s", store.url,
                    desc.version, FORMAT_VERSION, exc)
        return desc
    log.info("%s: repository format upgraded from %d to %d (machines running an older "
             "imgrepo must be upgraded to mount it)", store.url, desc.version, FORMAT_VERSION)
    return Descriptor(desc.repo_id, FORMAT_VERSION, desc.created)
