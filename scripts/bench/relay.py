"""The relay between every tool and the S3 server: a process of its own, pinned with the
server, which counts the bytes each way (so what a tool sends is measured outside it) and,
with a round-trip time, delays every chunk by half of it in each direction.

    python -m scripts.bench.relay LISTEN_PORT UPSTREAM_PORT COUNTER_FILE CORE [RTT_MS]

Without a delay it forwards with splice(2) in threads, which costs next to no CPU. With one
(this kernel has no netem) it runs an asyncio loop: each direction of a connection is a
queue of (due time, chunk), read as fast as the sender sends and written in order once due,
so latency is added without limiting throughput beyond the queue's bound. Its CPU is part
of what the benchmark reports, since it shares the server's core.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import signal
import socket
import struct
import sys
import threading

MiB = 1 << 20
CHUNK = 256 * 1024  # the most one read takes from a socket in the delaying relay
QUEUED_CHUNKS = 256  # per direction: at most 64 MiB in flight before the reader waits


class Counters:
    """Bytes relayed each way (0: client->server, 1: server->client), kept in a 16-byte file
    that the benchmark reads through mmap."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(fd, 16)
        os.close(fd)
        self._totals = [0, 0]
        self._lock = threading.Lock()

    def add(self, direction: int, n: int) -> None:
        with self._lock:
            self._totals[direction] += n
            struct.pack_into("<Q", self._map, direction * 8, self._totals[direction])


def relay_main(listen_port: int, upstream_port: int, counter_path: str, core: int,
               rtt_ms: float = 0.0) -> None:
    """Forward every TCP connection on listen_port to upstream_port until killed."""
    if core >= 0:
        os.sched_setaffinity(0, {core})
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    counters = Counters(counter_path)
    if rtt_ms > 0:
        asyncio.run(serve_delayed(listen_port, upstream_port, counters, rtt_ms / 2000))
    else:
        serve_spliced(listen_port, upstream_port, counters)


def serve_spliced(listen_port: int, upstream_port: int, counters: Counters) -> None:
    """No added delay: two threads per connection move the bytes with splice(2)."""
    add = counters.add

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


async def serve_delayed(listen_port: int, upstream_port: int, counters: Counters,
                        one_way_s: float) -> None:
    """Every chunk reaches the other side `one_way_s` after the relay received it."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port, limit=MiB)
        except OSError:
            client_w.close()
            return
        for w in (client_w, up_w):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_delayed_pump(client_r, up_w, 0, one_way_s, counters))
                group.create_task(_delayed_pump(up_r, client_w, 1, one_way_s, counters))
        except* OSError:
            pass  # a reset on either side ends the connection on both
        finally:
            for w in (client_w, up_w):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, backlog=256,
                                        limit=MiB)
    async with server:
        await server.serve_forever()


async def _delayed_pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: int,
                        one_way_s: float, counters: Counters) -> None:
    """Copy src to dst, each chunk held until `one_way_s` after it arrived, in order; pass
    the end of the stream on the same way."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)

    async def receive() -> None:
        while True:
            data = await src.read(CHUNK)
            counters.add(direction, len(data))
            await queue.put((loop.time() + one_way_s, data))
            if not data:
                return

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if dst.can_write_eof():
                    dst.write_eof()
                return
            dst.write(data)
            await dst.drain()

    async with asyncio.TaskGroup() as group:
        group.create_task(receive())
        group.create_task(send())


if __name__ == "__main__":
    relay_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
               float(sys.argv[5]) if len(sys.argv) > 5 else 0.0)
