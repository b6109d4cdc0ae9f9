"""Whole-object GETs (manifests: plain and conditional) over the direct path of
fsrepo/store/s3direct.py, against moto's server through the fault-injecting proxy: the same
answers as boto3's (200, 304, 404, errors), requests really made without boto3, a damaged
body read again, the fallback to boto3 for good, and their own limiter (a walk's GETs do
not queue behind blob transfers)."""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
from dataclasses import replace

import pytest
import trio

from fsrepo.errors import ObjectNotFound, StorageAccessDenied, StorageError, StorageUnavailable
from fsrepo.retry import REQUEST
from fsrepo.store.base import NOT_MODIFIED, StoredObject
from fsrepo.store.s3 import S3Store
from fsrepo.store.s3blobs import Boto3Blobs, LatchedBlobs
from fsrepo.store.s3direct import DirectBlobs

ONE_TRY = replace(REQUEST, attempts=1)


def _gets(proxy) -> list[tuple[int | None, bool]]:
    """(status, made by boto3) of every GET the proxy saw."""
    return [(r.status, "Boto3" in r.headers.get("user-agent", ""))
            for r in proxy.requests if r.method == "GET"]


def test_get_304_and_404_go_through_the_direct_path(s3_proxy, s3_bucket):
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)
    data = os.urandom(5000)

    async def main():
        etag = await store.put("dirs/a.json", data)
        got = await store.get("dirs/a.json")
        assert isinstance(got, StoredObject) and got.data == data and got.etag == etag
        assert await store.get("dirs/a.json", if_none_match=etag) is NOT_MODIFIED
        new_etag = await store.put("dirs/a.json", b"v2", if_match=etag)
        again = await store.get("dirs/a.json", if_none_match=etag)  # stale: the new body
        assert isinstance(again, StoredObject)
        assert (again.data, again.etag) == (b"v2", new_etag)
        with pytest.raises(ObjectNotFound, match=r"s3://.*/repo/dirs/none.json does not exist"):
            await store.get("dirs/none.json")
        await store.put("dirs/empty.json", b"")
        assert (await store.get("dirs/empty.json")).data == b""
        await store.aclose()

    trio.run(main)
    assert isinstance(store.blobs, LatchedBlobs) and isinstance(store.blobs.serving, DirectBlobs)
    assert _gets(s3_proxy) == [(200, False), (304, False), (200, False), (404, False),
                               (200, False)]


def test_a_body_cut_short_is_read_again_and_a_damaged_one_fails_clearly(s3_proxy, s3_bucket,
                                                                       caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)
    data = os.urandom(200_000)
    trio.run(lambda: store.put("dirs/b.json", data))
    s3_proxy.inject(method="GET", drop="midway", times=1)
    got = trio.run(lambda: store.get("dirs/b.json"))
    assert isinstance(got, StoredObject) and got.data == data
    assert _gets(s3_proxy) == [(None, False), (200, False)]  # None: cut off
    assert "S3 read" in caplog.text and "broke off" in caplog.text
    trio.run(store.aclose)

    once = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url, retries=ONE_TRY)
    s3_proxy.inject(method="GET", drop="midway", times=None)
    with pytest.raises(StorageUnavailable, match="broke off"):
        trio.run(lambda: once.get("dirs/b.json"))
    s3_proxy.clear_faults()
    assert trio.run(lambda: once.get("dirs/b.json")).data == data  # the pool was not poisoned
    trio.run(once.aclose)


class _ShortBodies(socketserver.StreamRequestHandler):
    """Answers every request with a body shorter than its Content-Length, then closes the
    connection cleanly (FIN, not a reset): http.client alone would return the bytes it got."""

    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: "e"\r\n\r\n'
                         + b"x" * 50)
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_WR)


def test_a_body_that_ends_early_without_a_reset_is_not_taken_for_the_object():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ShortBodies)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = S3Store("short", "repo", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
                        region="us-east-1", retries=ONE_TRY)
        with pytest.raises(StorageUnavailable, match="broke off 50 bytes early"):
            trio.run(lambda: store.get("dirs/g.json"))
        trio.run(store.aclose)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_get_failures_are_retried_and_worded_like_boto3s(s3_proxy, s3_bucket, caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)
    trio.run(lambda: store.put("dirs/c.json", b"{}"))
    s3_proxy.inject(method="GET", status=503, times=1)
    s3_proxy.inject(method="GET", drop="before", times=1)
    s3_proxy.inject(method="GET", status=429, times=1)
    assert trio.run(lambda: store.get("dirs/c.json")).data == b"{}"
    assert "GetObject" in caplog.text and "failed (attempt 3)" in caplog.text
    s3_proxy.inject(method="GET", status=403, times=1)
    with pytest.raises(StorageAccessDenied, match="refused access to s3://.*/dirs/c.json"):
        trio.run(lambda: store.get("dirs/c.json"))
    s3_proxy.inject(method="GET", status=500, times=None)
    with pytest.raises(StorageError, match="kept failing"):
        trio.run(lambda: store.get("dirs/c.json"))
    s3_proxy.clear_faults()
    trio.run(store.aclose)
    assert all(not boto3 for _status, boto3 in _gets(s3_proxy))


def test_a_redirect_on_get_hands_the_store_to_boto3_for_good(s3_proxy, s3_bucket, caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)

    async def main():
        etag = await store.put("dirs/d.json", b"d")
        s3_proxy.inject(method="GET", status=307, code="TemporaryRedirect", times=1)
        assert (await store.get("dirs/d.json")).data == b"d"  # boto3 made it after all
        assert await store.get("dirs/d.json", if_none_match=etag) is NOT_MODIFIED
        with pytest.raises(ObjectNotFound):
            await store.get("dirs/gone.json")
        await store.aclose()

    trio.run(main)
    assert isinstance(store.blobs, LatchedBlobs) and isinstance(store.blobs.serving, Boto3Blobs)
    assert _gets(s3_proxy) == [(307, False), (200, True), (304, True), (404, True)]
    assert caplog.text.count("go through boto3 from now on") == 1


def test_a_key_that_needs_escaping_is_read_by_boto3_without_latching(s3_proxy, s3_bucket):
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)

    async def main():
        await store.put("snapshots/2026-12-06T05:30:00+00:00.json", b"snap")
        await store.put("dirs/f.json", b"f")
        assert (await store.get("snapshots/2026-12-06T05:30:00+00:00.json")).data == b"snap"
        assert (await store.get("dirs/f.json")).data == b"f"
        await store.aclose()

    trio.run(main)
    assert isinstance(store.blobs, LatchedBlobs) and isinstance(store.blobs.serving, DirectBlobs)
    assert _gets(s3_proxy) == [(200, True), (200, False)]


def test_gets_do_not_queue_behind_blob_transfers(s3_proxy, s3_bucket):
    """Every slot of the transfers' limiter taken (16 downloads under way): a walk's GETs
    and HEADs still run, under their own limiter."""
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url, max_concurrency=2,
                    small_concurrency=4)

    async def main():
        await store.put("dirs/e.json", b"e")
        holders = [object(), object()]
        for holder in holders:
            store._limiter.acquire_on_behalf_of_nowait(holder)
        with trio.fail_after(30):  # a deadlock guard, not a speed claim
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(store.get, "dirs/e.json")
                    nursery.start_soon(store.head, "dirs/e.json")
        for holder in holders:
            store._limiter.release_on_behalf_of(holder)
        await store.aclose()

    trio.run(main)
    assert s3_proxy.count("GET") == 8 and s3_proxy.count("HEAD") == 8
