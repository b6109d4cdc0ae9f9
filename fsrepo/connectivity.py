"""Knowing when the storage is unreachable, and failing fast while it is.

A mount must keep working with the network gone: browse what it has seen, read what it has
cached, queue what is written. What it must not do is make every request that needs the
storage wait out botocore's retries (tens of seconds per request, minutes with a black-holed
route). `GuardedStore` wraps the mount's store:

- a call that fails with `StorageUnavailable` while the endpoint does not even accept a TCP
  connection (or, for `file://`, the folder is gone) turns the guard *offline*;
- a read that is still running after `patience` seconds has the endpoint checked the same
  way, every few seconds; if it is unreachable the guard goes offline and the caller gets
  `StorageOffline` at once (the abandoned call finishes, or fails, in the background, and its
  result is thrown away: reads have no effects);
- while offline, every call fails at once with `StorageOffline`, and a prober checks the
  endpoint every `probe_every` seconds; when a real request (a HEAD of the descriptor)
  succeeds, the guard is *online* again and tells whoever registered in `on_online` (the
  uploader, which then drains its queue without waiting out its backoff).

Any successful call also means online. Errors other than unreachability (access denied, a
503 storm, a missing key) pass through unchanged and do not make the guard offline.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import trio

from .errors import StorageError, StorageOffline, StorageUnavailable
from .store.base import NotModified, ObjectInfo, Store, StoredObject

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_KEY = "imgrepo.json"


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "?"


class GuardedStore(Store):
    """A `Store` that knows whether its storage can be reached (see the module doc). It
    offers exactly the `Store` interface plus its own state; what is particular to one
    backend is reached through `inner`, the store it guards."""

    def __init__(self, inner: Store, *, patience: float = 1.0, check_every: float = 2.0,
                 probe_every: float = 2.0, connect_timeout: float = 3.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.patience = patience
        self.check_every = check_every
        self.probe_every = probe_every
        self.connect_timeout = connect_timeout
        self._online = True
        self.offline_since: float | None = None
        self.offline_reason: str | None = None
        self.last_online_at: float | None = None  # when it last came back
        self.last_success_at: float | None = None  # when a call last succeeded
        self.held_back = 0  # calls failed fast during the current outage
        self.unreachable_because = ""  # why the last reachability check failed
        self.on_online: list[Callable[[], None]] = []
        self._probing = False
        self._target = _tcp_target(inner)

    def __repr__(self) -> str:
        return f"GuardedStore({self.inner!r}, online={self.online})"

    @property
    def online(self) -> bool:
        return self._online

    # -- state ------------------------------------------------------------------------------
    def offline_error(self) -> StorageOffline:
        return StorageOffline(
            f"the storage {self.url} is unreachable (offline since "
            f"{_clock(self.offline_since)}: {self.offline_reason})")

    def _fail_fast(self) -> None:
        if not self.online:
            self.held_back += 1
            raise self.offline_error()

    def went_offline(self, reason: str) -> None:
        if self.online:
            self._online = False
            self.offline_since = time.time()
            self.offline_reason = reason
            self.held_back = 0
            log.warning("storage %s unreachable, working offline: %s", self.url, reason)
        if not self._probing:
            self._probing = True
            trio.lowlevel.spawn_system_task(self._probe_loop)

    def went_online(self) -> None:
        self.last_success_at = time.time()
        if self.online:
            return
        self._online = True
        self.last_online_at = self.last_success_at
        lasted = self.last_online_at - (self.offline_since or self.last_online_at)
        log.info("storage %s reachable again after %.0fs offline (since %s); %d requests "
                    "held back meanwhile are retried now", self.url, lasted,
                    _clock(self.offline_since), self.held_back)
        self.offline_since = None
        self.offline_reason = None
        for callback in list(self.on_online):
            try:
                callback()
            except Exception:  # noqa: BLE001 - one listener must not stop the others
                log.exception("on_online callback failed")

    def status(self) -> dict[str, Any]:
        return {"online": self.online, "offline_since": self.offline_since,
                "offline_reason": self.offline_reason, "online_again_at": self.last_online_at,
                "storage_success_at": self.last_success_at}

    # -- reachability -----------------------------------------------------------------------
    async def reachable(self) -> bool:
        """Whether the endpoint answers at all (a TCP connect; for file://, the folder)."""
        if isinstance(self._target, tuple):
            host, port = self._target
            with trio.move_on_after(self.connect_timeout):
                try:
                    stream = await trio.open_tcp_stream(host, port)
                except OSError as exc:
                    self.unreachable_because = connect_failure(exc)
                    return False
                await stream.aclose()
                return True
            self.unreachable_because = f"no answer within {self.connect_timeout:.0f}s"
            return False
        if isinstance(self._target, Path):
            path = self._target
            result: list[bool] = []

            async def look() -> None:
                result.append(await trio.to_thread.run_sync(os.path.isdir, path,
                                                            abandon_on_cancel=True))
            with trio.move_on_after(self.connect_timeout):
                await look()
            self.unreachable_because = "the folder is not there"
            return bool(result and result[0])
        return True  # cannot tell: let the calls themselves decide

    async def _failed(self, exc: StorageUnavailable) -> StorageUnavailable:
        """Classify a failure: unreachable means offline."""
        if isinstance(exc, StorageOffline):
            return exc
        if self._target is None or not await self.reachable():
            self.went_offline(f"no connection to {self._describe()}: {self.unreachable_because}"
                              if self._target is not None else str(exc))
            offline = self.offline_error()
            offline.__cause__ = exc
            return offline
        return exc

    async def _probe_loop(self) -> None:
        """While offline: check every few seconds whether a real request works again."""
        try:
            while not self.online:
                await trio.sleep(self.probe_every)
                if not await self.reachable():
                    continue
                try:
                    await self._detached(self.inner.head, PROBE_KEY,
                                         deadline=max(10.0, self.patience))
                except StorageUnavailable as exc:
                    log.debug("storage still unavailable: %s", exc)
                    continue
                except StorageError:
                    pass  # it answered (with an error of another kind): reachable
                self.went_online()
        except trio.Cancelled:
            raise
        except BaseException:  # a system task must never crash the run
            log.exception("connectivity prober failed")
        finally:
            self._probing = False

    # -- calls ------------------------------------------------------------------------------
    async def _detached(self, fn: Callable[..., Awaitable[T]], *args: Any,
                        deadline: float | None = None) -> T:
        """Run `fn(*args)` in a task of its own; wait for it until it ends, the endpoint
        turns out to be unreachable, or `deadline` passes (then StorageUnavailable). When we
        stop waiting, the call is cancelled; a call stuck in a worker thread finishes in the
        background and its result is dropped."""
        box: list[Any] = []
        done = trio.Event()
        scope = trio.CancelScope()

        async def run() -> None:
            try:
                with scope:
                    try:
                        box.append(("ok", await fn(*args)))
                    except Exception as exc:  # noqa: BLE001 - handed to the waiter
                        box.append(("error", exc))
            finally:
                done.set()

        trio.lowlevel.spawn_system_task(run)
        try:
            with trio.move_on_after(deadline if deadline is not None else float("inf")):
                waited = 0.0
                while not done.is_set():
                    step = self.patience if waited == 0.0 else self.check_every
                    with trio.move_on_after(step):
                        await done.wait()
                    if done.is_set():
                        break
                    waited += step
                    if not await self.reachable():
                        self.went_offline(f"no connection to {self._describe()}: "
                                          f"{self.unreachable_because}")
                        raise self.offline_error()
            if not done.is_set():
                raise StorageUnavailable(f"the storage {self.url} did not answer within "
                                         f"{deadline:.0f}s")
        finally:
            if not done.is_set():
                scope.cancel()
        kind, value = box[0] if box else (
            "error", StorageError(f"a request to {self.url} was cancelled"))
        if kind == "error":
            raise value
        return value

    async def _read(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        self._fail_fast()
        try:
            result = await self._detached(fn, *args)
        except StorageUnavailable as exc:
            raise await self._failed(exc) from exc.__cause__
        self.went_online()
        return result

    async def _write(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        # Writes are not abandoned half way (their outcome matters): they fail fast while
        # offline, and otherwise run to their end.
        self._fail_fast()
        try:
            result = await fn(*args, **kwargs)
        except StorageUnavailable as exc:
            raise await self._failed(exc) from exc.__cause__
        self.went_online()
        return result

    def _describe(self) -> str:
        if isinstance(self._target, tuple):
            return f"{self._target[0]}:{self._target[1]}"
        return str(self._target)

    # -- the Store interface ------------------------------------------------------------------
    async def get(self, key: str, if_none_match: str | None = None) -> StoredObject | NotModified:
        return await self._read(self.inner.get, key, if_none_match)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self._read(self.inner.get_range, key, start, end)

    async def download(self, key: str, dest: Path, start: int = 0,
                       on_chunk: Callable[[int], None] | None = None) -> None:
        return await self._read(self.inner.download, key, dest, start, on_chunk)

    async def head(self, key: str) -> int | None:
        return await self._read(self.inner.head, key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        self._fail_fast()
        try:
            async for info in self.inner.list(prefix):
                yield info
        except StorageUnavailable as exc:
            raise await self._failed(exc) from exc.__cause__
        self.went_online()

    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: bool = False) -> str:
        return await self._write(self.inner.put, key, data, if_match=if_match,
                                 if_none_match=if_none_match)

    async def put_file(self, key: str, path: Path, sha256_hex: str) -> bool:
        return await self._write(self.inner.put_file, key, path, sha256_hex)

    async def delete(self, key: str) -> None:
        return await self._write(self.inner.delete, key)

    async def aclose(self) -> None:
        await self.inner.aclose()


def connect_failure(exc: OSError) -> str:
    """Why a TCP connect failed, in the words a user looks for ("connection refused").
    trio raises one OSError whose cause groups the errors of each address tried."""
    cause = exc.__cause__
    errors = list(cause.exceptions) if isinstance(cause, BaseExceptionGroup) else [exc]
    if any(isinstance(e, ConnectionRefusedError) for e in errors):
        return "connection refused"
    first = errors[0]
    if isinstance(first, OSError) and first.strerror:
        return first.strerror.lower()
    return str(exc) or type(exc).__name__


def _tcp_target(store: Store) -> tuple[str, int] | Path | None:
    """What to check for reachability: (host, port) of an HTTP endpoint, or a folder."""
    endpoint = getattr(store, "endpoint", None)
    if isinstance(endpoint, str) and endpoint:
        split = urlsplit(endpoint)
        if split.hostname:
            # Through an HTTP(S) proxy (botocore honours the usual variables), the proxy is
            # what must be reachable: the endpoint itself may not be, directly.
            proxy = getproxies().get(split.scheme)
            if proxy and not proxy_bypass(split.hostname):
                via = urlsplit(proxy if "://" in proxy else "http://" + proxy)
                if via.hostname:
                    return via.hostname, via.port or (443 if via.scheme == "https" else 80)
            port = split.port or (443 if split.scheme == "https" else 80)
            return split.hostname, port
    root = getattr(store, "root", None)
    if isinstance(root, Path):
        return root
    return None
