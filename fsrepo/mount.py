"""One running mount: assembles store, local state, cache, namespace, uploader and the FUSE
binding, and runs them in one trio loop until unmounted.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import control
from .config import Settings
from .connectivity import GuardedStore
from .engine import Engine
from .errors import ImgrepoError
from .fs import KernelInvalidator
from .head_watcher import HeadWatcher
from .manifest import ROOT_ID
from .readonly import GatedOperations
from .store import open_store
from .store.base import Store
from .writemode import READ_ONLY, WriteGate, WriteMode

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0  # seconds in-flight storage calls get after unmounting


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise ImgrepoError(f"mountpoint {mountpoint} does not exist (create it with mkdir)")
    if not mountpoint.is_dir():
        raise ImgrepoError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise ImgrepoError(f"{mountpoint} is already a mount point")
    if any(mountpoint.iterdir()):
        raise ImgrepoError(f"mountpoint {mountpoint} is not empty")
    if not os.path.exists("/dev/fuse"):
        raise ImgrepoError("FUSE is not available on this machine (/dev/fuse is missing; "
                           "install fuse3 and load the fuse module)")


class Mount(Engine):
    """The engine (store, state, journal, cache, namespace, uploader: see engine.py) plus the
    kernel binding, control socket and background tasks."""

    def __init__(self, settings: Settings, mountpoint: Path, store: Store,
                 read_only: bool = False) -> None:
        # Everything talks to the storage through the guard: offline, calls fail fast
        # instead of waiting out the retries, and the queue drains when it is back.
        guard = store if isinstance(store, GuardedStore) else GuardedStore(store)
        guard.on_online.append(self._back_online)
        # Bucket writes pass the write mode's gate (conditional / single writer / read-only).
        mode = WriteMode(guard, settings, socket.gethostname() or "unknown", read_only)
        super().__init__(settings, WriteGate(guard, mode.refusal),
                         invalidator=KernelInvalidator())
        self.guard = guard
        self.mode = mode
        mode.on_ready.append(self._back_online)
        self.watcher = HeadWatcher(self.store, self.db, self.ns.views, settings.refresh)
        self.mountpoint = mountpoint
        self.ops = GatedOperations(self.ns, self.files, str(self.state_dir),
                                   mode.local_refusal)
        self.token_refresher: Any = None  # keeps a web-identity token valid, if one is used
        if settings.storage.startswith("s3://") and os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            from .auth import TokenRefresher
            self.token_refresher = TokenRefresher()

    # -- control requests -----------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        up = self.uploader.status
        pending = self.uploader.pending_summary()
        counters = await self.db.run(self.db.state.counters)
        return {
            "mountpoint": str(self.mountpoint),
            "storage": self.settings.storage,
            "pid": os.getpid(),
            "pending_ops": pending["ops"],
            "pending_files": pending["blobs"],
            "pending_bytes": pending["bytes"],
            "uploads_in_flight": len(up.uploads_in_flight),
            "uploaded_files": up.uploaded_blobs,
            "uploaded_bytes": up.uploaded_bytes,
            "conflicts": up.conflicts,
            "last_error": up.last_error,
            "last_error_at": up.last_error_at,
            "last_success_at": up.last_success_at,
            "login_required": up.login_required,
            "cache_used": self.cache.used,
            "cache_limit": self.cache.limit,
            "dedup_saved_bytes": counters.get("dedup_bytes", 0),
            "started": self.started,
            **self.guard.status(),
            **self.mode.status(),
            "downloads_in_flight": len(self.cache.downloads),
            "syncs_running": self.syncer.running,
            "log_file": str(self.state_dir / "imgrepo.log"),
            "credentials": self._credentials(),
        }

    def _credentials(self) -> dict[str, Any] | None:
        """The device-flow login as the running mount sees it (no secrets)."""
        if self.token_refresher is None:
            return None
        st = self.token_refresher.state()
        return {"status": st.status, "message": st.message, "identity": st.identity,
                "id_token_expires_at": st.id_token_expires_at,
                "last_refresh_at": st.last_refresh_at, "login_required": st.login_required}

    def _back_online(self) -> None:
        """The storage answers again: drain the queue now, not after the retry backoff."""
        self.uploader.retry_now()
        self.ns.views.storage_back()
        self.watcher.wake()

    async def _resume_after_login(self) -> None:
        """A new login while uploads wait for credentials: drain the queue now, not after
        the retry backoff that grew while the login was dead."""
        was_required = False
        while True:
            await trio.sleep(0.5)
            required = self.token_refresher.state().login_required
            if was_required and not required:
                self._back_online()
            was_required = required

    async def handle(self, req: dict[str, Any], send: Any) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"pid": os.getpid()}
        if cmd == "status":
            status = await self.status()
            if req.get("repository"):
                status.update(await self.syncer.last_totals())
            return status
        if cmd == "wait":
            sent, sent_at, summed_at = None, -math.inf, -math.inf
            while True:
                if not (len(self.journal) or self.uploader.status.uploads_in_flight
                        or self.uploader.heads.busy):
                    self.uploader.drained()
                    return await self.status()
                now = time.monotonic()
                # The summary walks the whole journal: a few times a second, not at every
                # upload (that slowed the uploads down). At least every 0.5 s a message
                # goes out, even without progress: the client times outages by them.
                if now - summed_at >= 0.25:
                    pending, summed_at = self.uploader.pending_summary(), now
                    if pending != sent or now - sent_at >= 0.5:
                        await send({"progress": pending, "online": self.guard.online,
                                    "last_error": self.uploader.status.last_error})
                        sent, sent_at = pending, now
                self.uploader.kick()
                with trio.move_on_after(0.25):
                    await self.uploader.progressed.wait()
        if cmd == "sync":
            return await self.syncer.run(req.get("paths") or [], send,
                                         parallel=int(req.get("parallel", 8)))
        raise ImgrepoError(f"unknown request {cmd!r}")

    # -- running --------------------------------------------------------------------------
    async def run(self, ready: Any = None) -> None:
        await self.mode.start()  # LeaseHeld: another machine writes; refuse the mount
        try:
            await self.check_repository(create=self.mode.kind != READ_ONLY,
                                        settle=self.mode.settle)
        except BaseException:
            await self.mode.release()
            raise
        await self.db.run(self.load_state)
        await self._first_poll()
        try:  # every use starts at the root: it is kept now, to work offline from the start
            await self.ns.views.fetch_ahead(ROOT_ID)
        except ImgrepoError as exc:
            log.debug("the root's manifest was not fetched ahead: %s", exc)
        # Anything that touches the mountpoint must happen before init: afterwards our own
        # FUSE requests would wait for the loop this very call is blocking.
        sock_path = control.socket_path(self.mountpoint)
        options = set(pyfuse3.default_options)
        options |= {"fsname=imgrepo", "subtype=imgrepo", "noatime"}
        try:
            pyfuse3.init(self.ops, str(self.mountpoint), options)
        except RuntimeError as exc:
            raise ImgrepoError(f"cannot mount {self.mountpoint}: {exc}") from None
        try:
            async with trio.open_nursery() as nursery:
                self.invalidator.nursery = nursery
                self.cache.nursery = nursery
                await nursery.start(control.serve, sock_path, self.handle)
                nursery.start_soon(self.uploader.run)
                nursery.start_soon(self.journal.write_behind)
                nursery.start_soon(self.watcher.run)
                nursery.start_soon(self.ns.prefetcher.run)
                nursery.start_soon(self.ns.release_when_idle)
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(self._signals)
                nursery.start_soon(self.mode.run)
                if self.token_refresher is not None:
                    nursery.start_soon(self.token_refresher.run)
                    nursery.start_soon(self._resume_after_login)
                nursery.start_soon(trio.to_thread.run_sync, self._tune_readahead)
                if ready is not None:
                    ready()
                log.info("mounted %s at %s", self.settings.storage, self.mountpoint)
                await pyfuse3.main(min_tasks=4, max_tasks=64)
                self._close_fuse()
                _exit_if_stuck(SHUTDOWN_GRACE)
                nursery.cancel_scope.cancel()
        finally:
            self._close_fuse()
            await self.cache.flush_atimes()
            with trio.move_on_after(SHUTDOWN_GRACE, shield=True):
                await self.mode.release()
            pending = len(self.journal)
            if pending:
                log.info("unmounted with %d operations still to upload; they continue at "
                         "the next mount", pending)
            else:
                log.info("unmounted %s", self.mountpoint)

    def _close_fuse(self) -> None:
        if getattr(self, "_fuse_closed", False):
            return
        self._fuse_closed = True
        try:
            pyfuse3.close(unmount=True)
        except Exception as exc:  # already unmounted from outside
            log.debug("close: %s", exc)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for _ in sigs:
                log.info("signal received: unmounting")
                pyfuse3.terminate()
                return

    async def _first_poll(self) -> None:
        """Before anything is served: mark what other machines changed while this mount
        was away (the rest of the cache is trusted without a request). Offline, the
        watcher polls as soon as the storage answers."""
        try:
            await self.watcher.poll()
        except (ImgrepoError, OSError) as exc:
            log.info("change records not read at start (read when the storage answers): %s",
                     exc)

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(5)
            await self.cache.flush_atimes()

    def _tune_readahead(self) -> None:
        """Cached reads arrive as 128 KiB requests unless the mount's read-ahead is raised
        (FACTS.md); 1 MiB requests cost far less per byte."""
        try:
            dev = os.stat(self.mountpoint).st_dev
            path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
            with open(path, "w") as fh:
                fh.write("1024")
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOENT):
                log.debug("read-ahead not raised: %s", exc)


def _exit_if_stuck(grace: float) -> None:
    """Once unmounted, storage calls still running in worker threads (botocore may retry
    one for a minute or more) must not keep the process alive: what they carried stays in
    the journal and goes at the next mount, exactly as after a crash."""
    def leave() -> None:
        log.warning("storage requests still running %.0f s after unmounting: exiting without "
                    "them; the journal keeps their work for the next mount", grace)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(grace, leave)
    timer.daemon = True
    timer.start()


async def run_mount(settings: Settings, mountpoint: Path, ready: Any = None,
                    read_only: bool = False) -> None:
    store = open_store(settings.storage, settings.endpoint_url, settings.region)
    try:
        await Mount(settings, mountpoint, store, read_only).run(ready)
    finally:
        await store.aclose()
