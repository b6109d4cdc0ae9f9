"""systemd's readiness protocol (`Type=notify`): one datagram to $NOTIFY_SOCKET per state.

A few lines of our own rather than a dependency: READY=1 once the mount serves, STOPPING=1
when it unmounts. Without $NOTIFY_SOCKET (not started by systemd) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not address.startswith(("/", "@")):
        return False
    if address.startswith("@"):  # an abstract socket: a NUL byte first
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("systemd notification %r not sent: %s", state, exc)
        return False
    return True
