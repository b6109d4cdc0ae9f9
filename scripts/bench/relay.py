"""The byte-counting relay: a process of its own, pinned with the S3 server, through which
every tool reaches the server, so the bytes each tool sends are counted outside it.

    python -m scripts.bench.relay LISTEN_PORT UPSTREAM_PORT COUNTER_FILE CORE
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import struct
import sys
import threading

MiB = 1 << 20


def relay_main(listen_port: int, upstream_port: int, counter_path: str, core: int) -> None:
    """Forward every TCP connection to the upstream port; count the bytes each way in a
    16-byte file (client->server, server->client) that the benchmark reads through mmap."""
    if core >= 0:
        os.sched_setaffinity(0, {core})
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    fd = os.open(counter_path, os.O_RDWR)
    counters = mmap.mmap(fd, 16)
    totals = [0, 0]
    lock = threading.Lock()

    def add(direction: int, n: int) -> None:
        with lock:
            totals[direction] += n
            struct.pack_into("<Q", counters, direction * 8, totals[direction])

    def pump(src: socket.socket, dst: socket.socket, direction: int) -> None:
        r, w = os.pipe()
        try:
            try:
                import fcntl
                fcntl.fcntl(w, 1031, MiB)  # F_SETPIPE_SZ
            except OSError:
                pass
            while True:
                n = os.splice(src.fileno(), w, MiB)
                if n == 0:
                    break
                add(direction, n)
                while n:
                    n -= os.splice(r, dst.fileno(), n)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            os.close(r)
            os.close(w)

    def handle(client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", upstream_port))
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=pump, args=(upstream, client, 1), daemon=True)
        back.start()
        pump(client, upstream, 0)
        back.join()
        client.close()
        upstream.close()

    server = socket.create_server(("127.0.0.1", listen_port), backlog=256)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()



if __name__ == "__main__":
    relay_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
