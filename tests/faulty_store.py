"""A `Store` wrapper that fails chosen calls, deterministically, for crash and retry tests.

    faulty = FaultyStore(store, on_crash=scope.cancel)
    faulty.arm(Fault("put_file", nth=1, effect=CRASH, when=AFTER))

fails the first `put_file` made after `arm` in the way asked:

- `UNAVAILABLE` raises StorageUnavailable (the network dropped the request),
- `PRECONDITION` raises PreconditionFailed (another writer won a conditional write),
- `CRASH` calls `on_crash` (the test cancels the engine's scope: the process stops there)
  and never returns;
- `HOLD` keeps the call waiting until the test calls `fault.release()`, then lets it go
  on unharmed: a slow request, so that the test can run other steps while it is in
  flight (`fault.held` is set once one is waiting);

`when` says whether the request reached the storage first (AFTER: it took effect and only
the answer was lost) or not (BEFORE). Calls are numbered per kind, counting only keys that
start with the fault's `prefix`, from the moment the fault is armed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from fsrepo.errors import PreconditionFailed, StorageUnavailable
from fsrepo.store.base import NotModified, ObjectInfo, Store, StoredObject

UNAVAILABLE = "unavailable"
PRECONDITION = "precondition"
CRASH = "crash"
HOLD = "hold"
BEFORE = "before"
AFTER = "after"

KINDS = ("get", "get_range", "download", "put", "put_file", "head", "list", "delete")


@dataclass
class Fault:
    """Fail calls `nth` .. `nth + times - 1` of `kind` on keys under `prefix`."""

    kind: str
    nth: int = 1
    effect: str = UNAVAILABLE
    when: str = BEFORE
    prefix: str = ""
    times: int = 1
    seen: int = 0  # matching calls so far
    fired: int = 0  # calls failed so far
    held: trio.Event = field(default_factory=trio.Event)  # HOLD: a call waits
    released: trio.Event = field(default_factory=trio.Event)  # HOLD: let it go on

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert self.effect in (UNAVAILABLE, PRECONDITION, CRASH, HOLD), self.effect
        assert self.when in (BEFORE, AFTER), self.when

    def release(self) -> None:
        self.released.set()

    def matches(self, kind: str, key: str) -> bool:
        """Count this call; whether it is one to fail."""
        if kind != self.kind or not key.startswith(self.prefix):
            return False
        self.seen += 1
        return self.nth <= self.seen < self.nth + self.times


class FaultyStore(Store):
    """Forwards every call to `inner`, failing the ones armed faults pick."""

    def __init__(self, inner: Store, on_crash: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self.url = inner.url
        self.on_crash = on_crash
        self.faults: list[Fault] = []
        self.crashed = False

    def arm(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    @property
    def fired(self) -> int:
        return sum(f.fired for f in self.faults)

    async def _fail(self, fault: Fault, kind: str, key: str) -> None:
        fault.fired += 1
        if fault.effect == HOLD:
            fault.held.set()
            await fault.released.wait()
            return
        if fault.effect == CRASH:
            assert self.on_crash is not None, "a CRASH fault needs on_crash"
            self.crashed = True
            self.on_crash()
            await trio.sleep_forever()  # cancelled by on_crash: nothing after this runs
        if fault.effect == PRECONDITION:
            raise PreconditionFailed(f"injected: {kind} {key} lost a conditional write")
        raise StorageUnavailable(f"injected: {kind} {key}: the storage did not answer")

    async def _call(self, kind: str, key: str, fn: Callable[..., Any], *args: Any,
                    **kwargs: Any) -> Any:
        fault = next((f for f in self.faults if f.matches(kind, key)), None)
        if fault is not None and fault.when == BEFORE:
            await self._fail(fault, kind, key)
        result = await fn(*args, **kwargs)
        if fault is not None and fault.when == AFTER:
            await self._fail(fault, kind, key)
        return result

    # -- the Store interface --------------------------------------------------------------
    @property
    def online(self) -> bool:
        return self.inner.online

    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject | NotModified:
        return await self._call("get", key, self.inner.get, key, if_none_match)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self._call("get_range", key, self.inner.get_range, key, start, end)

    async def download(self, key: str, dest: Path, start: int = 0,
                       on_chunk: Callable[[int], None] | None = None) -> None:
        await self._call("download", key, self.inner.download, key, dest, start, on_chunk)

    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: bool = False) -> str:
        return await self._call("put", key, self.inner.put, key, data, if_match=if_match,
                                if_none_match=if_none_match)

    async def put_file(self, key: str, path: Path, sha256_hex: str) -> bool:
        return await self._call("put_file", key, self.inner.put_file, key, path, sha256_hex)

    async def head(self, key: str) -> int | None:
        return await self._call("head", key, self.inner.head, key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        fault = next((f for f in self.faults if f.matches("list", prefix)), None)
        if fault is not None and fault.when == BEFORE:
            await self._fail(fault, "list", prefix)
        async for info in self.inner.list(prefix):
            yield info
        if fault is not None:
            await self._fail(fault, "list", prefix)

    async def delete(self, key: str) -> None:
        await self._call("delete", key, self.inner.delete, key)

    async def aclose(self) -> None:
        await self.inner.aclose()
