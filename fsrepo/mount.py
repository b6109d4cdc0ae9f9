"""One running mount: assembles store, local state, cache, namespace, uploader and the FUSE
binding, and runs them in one trio loop until unmounted.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import control, sdnotify
from .auto_snapshots import CHECK_EVERY, AutoSnapshots, changes_seen
from .config import Settings
from .connectivity import GuardedStore
from .endpoint_check import not_s3_reason
from .engine import Engine
from .errors import ImgrepoError, ObjectNotFound, PreconditionFailed
from .fdlimit import raise_open_files_limit
from .fs import KernelInvalidator
from .head_watcher import HeadWatcher
from .maintenance.duplicates import duplicate_groups
from .manifest import ROOT_ID
from .pending_list import pending_files
from .snapshot_ops import SnapshotOperations
from .snapshot_policy import AUTO_PREFIX, parse_policy
from .snapshots import check_snapshot_name, default_name
from .store import open_store
from .store.base import Store
from .sync import report_walk
from .tree_walk import WalkCounts
from .upload_log import final_line, log_uploads
from .writemode import READ_ONLY, WriteGate, WriteMode

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0  # seconds in-flight storage calls get after unmounting


def check_fuse_options(options: Iterable[str], fuse_conf: Path = Path("/etc/fuse.conf")) -> None:
    """allow_other/allow_root as other FUSE filesystems have them: root may, a user only
    where the administrator allowed it; say so before mounting, in one line."""
    wanted = sorted(set(options) & {"allow_other", "allow_root"})
    if not wanted or os.geteuid() == 0:
        return
    try:
        allowed = any(line.strip() == "user_allow_other"
                      for line in fuse_conf.read_text(errors="replace").splitlines())
    except OSError:
        allowed = False
    if not allowed:
        raise ImgrepoError(f"-o {wanted[0]} needs root, or the line user_allow_other in "
                           f"{fuse_conf}")


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise ImgrepoError(f"mountpoint {mountpoint} does not exist (create it with mkdir)")
    if not mountpoint.is_dir():
        raise ImgrepoError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise ImgrepoError(f"{mountpoint} is already a mount point")
    if any(mountpoint.iterdir()):
        raise ImgrepoError(f"mountpoint {mountpoint} is not empty")
    check_fuse()


def check_fuse(device: str = "/dev/fuse") -> None:
    """FUSE must be usable before anything is created, in the bucket or locally: the
    reason it is not is the one line the user sees."""
    if not os.path.exists(device):
        raise ImgrepoError(f"FUSE is not available on this machine ({device} is missing: "
                           "install fuse3 and load the module with `modprobe fuse`; in a "
                           "container, pass --device /dev/fuse)")
    if os.geteuid() != 0:
        # A user's mount goes through the setuid fusermount3, which opens the device itself.
        helper = shutil.which("fusermount3") or shutil.which("fusermount")
        if helper is None:
            raise ImgrepoError("FUSE is not usable: fusermount3 is not installed (install "
                               "the fuse3 package)")
        if not os.stat(helper).st_mode & stat.S_ISUID:
            raise ImgrepoError(f"FUSE is not usable: {helper} is not setuid root (reinstall "
                               "the fuse3 package, or mount as root)")
        return
    try:
        os.close(os.open(device, os.O_RDWR))
    except OSError as exc:
        hint = ("is a container missing --device /dev/fuse?"
                if exc.errno in (errno.EACCES, errno.EPERM) else "check the fuse module")
        raise ImgrepoError(f"FUSE is not usable: cannot open {device}: {exc.strerror} "
                           f"({hint})") from None


class Mount(Engine):
    """The engine (store, state, journal, cache, namespace, uploader: see engine.py) plus the
    kernel binding, control socket and background tasks."""

    def __init__(self, settings: Settings, mountpoint: Path, store: Store,
                 read_only: bool = False, fuse_options: Iterable[str] = ()) -> None:
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
        # The kernel refuses changes to a read-only mount itself (EROFS), as `mount` shows.
        self.fuse_options = frozenset(fuse_options) | ({"ro"} if read_only else set())
        self.ops = SnapshotOperations(self.ns, self.files, str(self.state_dir),
                                      mode.local_refusal, self.snapshot_tree)
        policy = parse_policy(settings.auto_snapshots)
        self.auto_snapshots = None if policy is None else AutoSnapshots(
            self.snapshots, self.take_snapshot, policy, lambda: mode.refusal() is None,
            seen=lambda: changes_seen(self.db, lambda: self.uploader.status.commits))
        self.token_refresher: Any = None  # keeps a web-identity token valid, if one is used
        if settings.storage.startswith("s3://") and os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            from .auth import TokenRefresher
            self.token_refresher = TokenRefresher()

    # -- control requests -----------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        up = self.uploader.status
        pending = self.uploader.pending_summary()
        copies = self.uploader.manifests.conflict_copies
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
            "conflict_copies": [{"path": path, "copy": copy} for path, copy in copies],
            **self._current_error(),
            "last_success_at": max(up.last_success_at or 0.0,
                                   self.guard.last_success_at or 0.0) or None,
            "endpoint_url": self.settings.endpoint_url,
            "region": self.settings.region,
            "login_required": up.login_required,
            "cache_used": self.cache.used,
            "cache_limit": self.cache.limit,
            "dedup_saved_bytes": counters.get("dedup_bytes", 0),
            "disk_commits": self.durable.commits,
            "last_disk_commit_at": self.durable.last_commit_at,
            "started": self.started,
            **self.guard.status(),
            **self.mode.status(),
            "downloads_in_flight": len(self.cache.downloads),
            "read_ahead_files": self.files.ahead.started,
            "read_ahead_bytes": self.files.ahead.started_bytes,
            "syncs_running": self.syncer.running,
            "log_file": str(self.state_dir / "imgrepo.log"),
            "credentials": self._credentials(),
            "auto_snapshots": "off" if self.auto_snapshots is None else
            str(self.auto_snapshots.policy),
        }

    def _current_error(self) -> dict[str, Any]:
        """The uploads' last error while it is still a problem: not once a later upload
        worked, nor an outage's error once the storage answers again."""
        up = self.uploader.status
        stale = (up.last_error is None
                 or (up.last_success_at or 0.0) >= (up.last_error_at or 0.0)
                 or (up.last_error_offline and self.guard.online))
        if stale:
            return {"last_error": None, "last_error_at": None}
        return {"last_error": up.last_error, "last_error_at": up.last_error_at}

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
            # Files closed in the last interval are named first (exact pending figures,
            # duplicates found): at most one interval's closes, work due anyway.
            await self.files.name_closed()
            status = await self.status()
            if req.get("repository"):
                status.update(await self.syncer.last_totals())
            if req.get("pending"):
                status["pending"] = pending_files(self.journal, self.uploader)
            return status
        if cmd == "duplicates":
            await self.files.name_closed()  # (their hashes are what the groups compare)
            return await self._duplicates(str(req.get("path") or ""), send)
        if cmd == "wait":
            await self.files.name_closed()  # closed files not named yet are pending too
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
                                    "last_error": self._current_error()["last_error"]})
                        sent, sent_at = pending, now
                self.uploader.kick()
                with trio.move_on_after(0.25):
                    await self.uploader.progressed.wait()
        if cmd == "snapshot":
            return await self._snapshot(str(req.get("name") or default_name(time.time())),
                                        send)
        if cmd == "snapshots":
            return {"snapshots": await self.snapshot_rows()}
        if cmd == "sync":
            return await self.syncer.run(req.get("paths") or [], send,
                                         parallel=int(req.get("parallel", 8)))
        raise ImgrepoError(f"unknown request {cmd!r}")

    async def _duplicates(self, relpath: str, send: Any) -> dict[str, Any]:
        """Files with identical content under a folder of the mount, from the manifests."""
        root = await self.syncer.resolve(relpath)
        if not isinstance(root, str):
            raise ImgrepoError(f"{relpath} is a file: give a folder")
        counts, began = WalkCounts(), time.monotonic()
        async with trio.open_nursery() as walking:
            walking.start_soon(report_walk, send, counts, began)
            found = await self.syncer.walk(root, "/" + relpath.strip("/"), counts=counts)
            walking.cancel_scope.cancel()
        groups = duplicate_groups(found)
        return {"path": "/" + relpath.strip("/"), "files": len(found), "folders": counts.folders,
                "groups": groups, "saved": sum(g["saved"] for g in groups)}
    async def _snapshot(self, name: str, send: Any) -> dict[str, Any]:
        """--snapshot: this machine's pending changes land first (as --status --wait), then
        the bucket's tree is recorded."""
        check_snapshot_name(name)
        if name.startswith(AUTO_PREFIX):
            raise ImgrepoError(f"snapshot names starting with {AUTO_PREFIX} are for the "
                               "automatic snapshots (which expire); choose another")
        why = self.mode.local_refusal()
        if why is not None:
            raise ImgrepoError(f"this mount does not write to the storage ({why}): "
                               "no snapshot taken")
        await self.handle({"cmd": "wait"}, send)
        try:
            snap = await self.take_snapshot(name)
        except PreconditionFailed:
            raise ImgrepoError(f"a snapshot named {name} exists already") from None
        assert snap is not None  # (only automatic ones are skipped when nothing changed)
        return {"name": snap.name, "created": snap.created, "dirs": len(snap.dirs)}

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
        given = {option.partition("=")[0] for option in self.fuse_options}
        options |= {option for option in ("fsname=imgrepo", "subtype=imgrepo", "noatime")
                    if option.partition("=")[0] not in given} | self.fuse_options
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
                nursery.start_soon(self.durable.run)
                nursery.start_soon(self.watcher.run)
                nursery.start_soon(self.ns.prefetcher.run)
                nursery.start_soon(self.ns.release_when_idle)
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(log_uploads, self.uploader.status,
                                   self.uploader.pending_summary)
                nursery.start_soon(self._signals)
                nursery.start_soon(self.mode.run)
                if self.auto_snapshots is not None:
                    nursery.start_soon(self._auto_snapshots, self.auto_snapshots)
                if self.token_refresher is not None:
                    nursery.start_soon(self.token_refresher.run)
                    nursery.start_soon(self._resume_after_login)
                nursery.start_soon(trio.to_thread.run_sync, self._tune_readahead)
                if ready is not None:
                    ready()
                log.info("mounted %s at %s", self.settings.storage, self.mountpoint)
                sdnotify.notify("READY=1")
                await pyfuse3.main(min_tasks=4, max_tasks=64)
                sdnotify.notify("STOPPING=1")
                self._close_fuse()
                _exit_if_stuck(SHUTDOWN_GRACE)
                nursery.cancel_scope.cancel()
        finally:
            self._close_fuse()
            with trio.move_on_after(SHUTDOWN_GRACE, shield=True):
                try:  # whatever was closed last is on the disk before we go
                    await self.durable.commit()
                except OSError as exc:
                    log.error("cannot commit to the local disk at unmount: %s", exc)
            await self.cache.flush_atimes()
            with trio.move_on_after(SHUTDOWN_GRACE, shield=True):
                await self.mode.release()
            session = final_line(self.uploader.status, self.uploader.pending_summary())
            if session:
                log.info("%s", session)
            pending = len(self.journal)
            if pending:
                log.info("unmounted with %d operations still to upload; they continue at "
                         "the next mount", pending)
            else:
                log.info("unmounted %s", self.mountpoint)

    @staticmethod
    async def _auto_snapshots(auto: AutoSnapshots) -> None:
        await trio.sleep(CHECK_EVERY)  # the mount settles first (and short runs take none)
        await auto.run()

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
        if self.format_version is not None:  # read already: not asked again
            self.watcher.know_format(self.format_version)
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
                    read_only: bool = False, fuse_options: Iterable[str] = ()) -> None:
    raise_open_files_limit()  # (closed copies keep descriptors until named: fdlimit.py)
    store = open_store(settings.storage, settings.endpoint_url, settings.region)
    started = False

    def now_ready() -> None:
        nonlocal started
        started = True
        if ready is not None:
            ready()

    try:
        await Mount(settings, mountpoint, store, read_only, fuse_options).run(now_ready)
    except ObjectNotFound as exc:
        if started or not settings.endpoint_url or not settings.storage.startswith("s3://"):
            raise
        bucket = settings.storage[len("s3://"):].split("/", 1)[0]
        reason = await trio.to_thread.run_sync(not_s3_reason, settings.endpoint_url, bucket)
        if reason is None:
            raise
        raise ImgrepoError(f"the endpoint {settings.endpoint_url} does not speak S3: {reason}; "
                           "check --endpoint-url (host and port of the S3 server)") from exc
    finally:
        await store.aclose()
