"""The repository format in the store (format version 4): where things live, the descriptor.

    imgrepo.json                    descriptor: format, version, hash, created, repo_id,
                                    chunk_size (version 4)
    blobs/sha256/<h[0:2]>/<h>       file contents, immutable, named by their SHA-256
    dirs/<dir-id>.json              one manifest per directory; the root's id is "root"
    heads/<writer-id>.json          each writer's record of the directories it changed
    heads-touched.json              rewritten after every head write (see heads.py)
    snapshots/, snapshot-dirs/      snapshots and the manifest copies they name (snapshots.py)

Version 2 added the heads: a mount of version 1 does not write them, so other machines would
not see its changes; it refuses a version-2 repository ("upgrade imgrepo"). A writable mount
of this version upgrades an older repository in place when it opens it.

Version 3 added snapshots: a version-2 imgrepo's --gc would delete blobs that only a
snapshot still names, so it refuses a version-3 repository; a writable mount upgrades a
version-2 one in place (the change is additive: nothing else moves).

Version 4 added chunked files: a file larger than the descriptor's `chunk_size` is stored as
blobs of that size, each named by its own SHA-256, listed in its manifest entry next to the
whole file's SHA-256 (manifest.Chunks). A version-3 mount would look for a whole-file blob
that does not exist, so it refuses version 4; whole-file blobs stay valid in version 4.
The chunk size is the repository's, not each machine's: every machine cuts the same content
at the same places, so chunks deduplicate across machines.
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
from .manifest import MAX_CHUNK, MIN_CHUNK
from .serverprobe import PROBE_PREFIX
from .store.base import Store, StoredObject

log = logging.getLogger(__name__)

DESCRIPTOR_KEY = "imgrepo.json"
FORMAT_NAME = "imgrepo"
FORMAT_VERSION = 4
HEADS_VERSION = 2  # the first format whose writers all write change records
CHUNKS_VERSION = 4  # the first format whose files may be stored as chunks
# Fixed-size chunks: a file appended to or re-saved with a new end (video, a re-exported
# archive) re-sends only its last chunks, which is where photo and video files change; an
# edit that shifts every byte re-encodes the whole file anyway, so content-defined cut
# points would buy little here. 8 MiB: a 1 GiB file is 128 chunks (8 KB of chunk list), a
# cold random read waits for at most 8 MiB, and a chunk is one S3 request.
DEFAULT_CHUNK_SIZE = 8 << 20


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def manifest_key(dir_id: str) -> str:
    return f"dirs/{dir_id}.json"


@dataclass(frozen=True)
class Descriptor:
    repo_id: str
    version: int
    created: str
    chunk_size: int | None = None  # where files are cut into chunks; None: never (before 4)


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
    chunk_size = None
    if version >= CHUNKS_VERSION:
        chunk_size = raw.get("chunk_size", DEFAULT_CHUNK_SIZE)
        if type(chunk_size) is not int or not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise RepositoryFormatError(f"{where}: bad chunk size {chunk_size!r}")
    return Descriptor(raw["repo_id"], version, str(raw.get("created", "")), chunk_size)


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
        "chunk_size": DEFAULT_CHUNK_SIZE,
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
    raw.setdefault("chunk_size", DEFAULT_CHUNK_SIZE)
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
    return parse_descriptor(json.dumps(raw).encode(), store.url)
