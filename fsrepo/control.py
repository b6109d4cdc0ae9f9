"""The control channel between a running mount and the imgrepo-mount commands.

A mount listens on a Unix socket in the user's runtime dir (0700), named after its
mountpoint. Requests and replies are JSON lines: a request is one object with "cmd";
the mount answers with zero or more progress objects and a final object with "done": true
(and "error" when it failed). A client keeps the connection open until the final object:
closing it early cancels the request (that is how Ctrl-C stops a --sync or a --wait).
Both ends check the other's uid (SO_PEERCRED) before trusting it: the socket's folder is
private, but the kernel's word on who is at the other end does not depend on that. A request
is bounded (MAX_REQUEST bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import runtime_dir
from .errors import ImgrepoError

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # a request is a small JSON object; more is refused unread
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[dict[str, Any], Callable[[dict[str, Any]], Awaitable[None]]],
                   Awaitable[dict[str, Any]]]


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket, as the kernel
    recorded it when the connection was made."""
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    return uid


def socket_path(mountpoint: str | Path) -> Path:
    real = os.path.realpath(mountpoint)
    return runtime_dir() / (hashlib.sha256(real.encode()).hexdigest()[:20] + ".sock")


async def serve(path: Path, handler: Handler, task_status: Any) -> None:
    """Accept connections forever; each request is handled in its own task (start it with
    nursery.start). trio is imported here, not above: the client side below is what every
    command uses, and it needs none of it."""
    import trio

    path.unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one, stream, handler)
    finally:
        path.unlink(missing_ok=True)


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    import trio

    async with stream:
        uid = peer_uid(stream.socket)  # type: ignore[arg-type]
        if uid != os.getuid():
            log.warning("control socket: refused a connection from uid %d", uid)
            return
        buf = b""
        while b"\n" not in buf:
            if len(buf) > MAX_REQUEST:
                log.warning("control socket: refused a request over %d bytes", MAX_REQUEST)
                return
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
        try:
            request = json.loads(buf.split(b"\n", 1)[0])
        except ValueError:
            return

        async def send(obj: dict[str, Any]) -> None:
            await stream.send_all(json.dumps(obj).encode() + b"\n")

        async def watch_hangup(scope: trio.CancelScope) -> None:
            # The client sends nothing after its request: end of stream means it went away
            # (Ctrl-C, killed), and whatever it asked for (a sync, a wait) stops with it.
            try:
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            scope.cancel()

        final: dict[str, Any] | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_hangup, nursery.cancel_scope)
            try:
                final = await handler(request, send)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except ImgrepoError as exc:
                final = {"error": str(exc)}
            except Exception as exc:  # a bug in one request must not take the mount down
                log.exception("control request %r failed",
                              request.get("cmd") if isinstance(request, dict) else request)
                final = {"error": f"internal error ({type(exc).__name__}); see the mount's log"}
            nursery.cancel_scope.cancel()
        if final is None:
            return
        try:
            await send({**final, "done": True})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def request(mountpoint: str | Path, cmd: dict[str, Any], timeout: float | None = None
            ) -> Iterator[dict[str, Any]]:
    """Client side (blocking): yields each reply object; the last has "done"."""
    path = socket_path(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ImgrepoError(f"{mountpoint} is not a running imgrepo mount") from None
    uid = peer_uid(sock)
    if uid != os.getuid():
        sock.close()
        raise ImgrepoError(f"the control socket of {mountpoint} ({path}) is served by another "
                           f"user (uid {uid}), not by a mount of yours: refusing to trust it")
    sock.settimeout(timeout)
    try:
        sock.sendall(json.dumps(cmd).encode() + b"\n")
        with sock.makefile("rb") as fh:
            for line in fh:
                reply = json.loads(line)
                yield reply
                if reply.get("done"):
                    return
        raise ImgrepoError(f"the mount at {mountpoint} stopped answering")
    finally:
        sock.close()


def is_running(mountpoint: str | Path) -> bool:
    try:
        for _ in request(mountpoint, {"cmd": "ping"}, timeout=5):
            pass
        return True
    except (ImgrepoError, OSError, ValueError):
        return False


