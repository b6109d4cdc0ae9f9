"""The direct HEAD/PUT path for blobs (fsrepo/store/s3direct.py), against moto's server and
the fault-injecting proxy on 127.0.0.1: same answers as boto3, requests really made, its
fallbacks taken, and its failures translated like boto3's."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from fsrepo.errors import IntegrityError, StorageAccessDenied, StorageError
from fsrepo.retry import REQUEST, SharedThrottle
from fsrepo.store import s3 as s3_module
from fsrepo.store.base import ObjectTooLarge
from fsrepo.store.s3 import S3Store
from fsrepo.store.s3blobs import Boto3Blobs, LatchedBlobs
from fsrepo.store.s3direct import EXPECT_ABOVE, DirectBlobs
from testservers.s3proxy import S3Proxy
from testservers.tlsfront import TLSFront, make_certificate

from .mountutil import poll

ONE_TRY = replace(REQUEST, attempts=1)


def blob(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def test_put_head_and_412_through_the_direct_path(s3_proxy, s3_bucket, tmp_path):
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)
    data = os.urandom(300 * 1024)
    path, sha = blob(tmp_path, data)

    async def main():
        assert await store.head("blobs/x") is None
        assert await store.put_file("blobs/x", path, sha) is True
        assert await store.put_file("blobs/x", path, sha) is False  # exists: 412
        assert await store.head("blobs/x") == len(data)
        got = await store.get("blobs/x")
        await store.aclose()
        return got

    got = trio.run(main)
    assert got.data == data
    puts = [r for r in s3_proxy.requests if r.method == "PUT"]
    assert [r.status for r in puts] == [200, 412]
    # The direct path signs the payload with the blob's own SHA-256 (no re-hash) and sends
    # its checksum: both are what the server can verify the body against.
    assert all(r.headers.get("x-amz-content-sha256") == sha for r in puts)
    assert all(r.headers.get("x-amz-checksum-sha256") == b64(sha) for r in puts)
    assert all("boto3" not in r.headers.get("user-agent", "") for r in puts)


def test_keys_that_need_escaping_go_through_boto3(s3_proxy, s3_bucket, tmp_path):
    store = S3Store(s3_bucket.bucket, "my photos+raw", endpoint_url=s3_proxy.url)
    data = os.urandom(2 * 1024 * 1024 + 5)
    path, sha = blob(tmp_path, data)
    dest = tmp_path / "got"

    async def main():
        assert await store.put_file("blobs/y", path, sha) is True
        assert await store.head("blobs/y") == len(data)
        s3_proxy.inject(method="GET", drop="midway", times=1)  # boto3's resume, too
        await store.download("blobs/y", dest)
        await store.aclose()

    trio.run(main)
    assert dest.read_bytes() == data
    assert all("Boto3" in r.headers.get("user-agent", "") for r in s3_proxy.requests
               if r.method in ("PUT", "HEAD", "GET")), [r.headers.get("user-agent")
                                                        for r in s3_proxy.requests]
    assert s3_proxy.count("GET") == 2
    assert isinstance(store.blobs, Boto3Blobs)  # chosen at construction, for this prefix


def test_a_proxy_setting_turns_the_direct_path_off(s3_bucket, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_bucket.endpoint_url)
    assert isinstance(store.blobs, Boto3Blobs)


def test_retries_then_translates_failures_like_boto3(s3_proxy, s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)
    path, sha = blob(tmp_path, os.urandom(4096))
    s3_proxy.inject(method="PUT", status=503, times=2)
    s3_proxy.inject(method="PUT", drop="before", times=1)

    async def ok():
        return await store.put_file("blobs/r", path, sha)

    assert trio.run(ok) is True  # two 503s and a dropped connection ridden out
    assert "PutObject" in caplog.text and "failed (attempt 3)" in caplog.text

    s3_proxy.inject(method="PUT", status=403, times=1)
    with pytest.raises(StorageAccessDenied):
        trio.run(lambda: store.put_file("blobs/s", path, sha))
    s3_proxy.inject(method="PUT", status=400, code="BadDigest", times=1)
    with pytest.raises(IntegrityError):
        trio.run(lambda: store.put_file("blobs/t", path, sha))
    s3_proxy.inject(method="HEAD", status=500, times=None)
    with pytest.raises(StorageError, match="kept failing"):
        trio.run(lambda: store.head("blobs/r"))
    trio.run(store.aclose)


def test_the_direct_path_verifies_tls_certificates(tls_server, monkeypatch):
    url, cert = tls_server
    store = S3Store("bucket", endpoint_url=url, retries=ONE_TRY)
    with pytest.raises(StorageError, match="(?i)certificate verify failed"):
        trio.run(store.head, "blobs/a")
    # Control: trusting that certificate gets past TLS, to the server's 404 (a HEAD has no
    # body, so it reads as "no such object", as with boto3).
    monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
    trusted = S3Store("bucket", endpoint_url=url, retries=ONE_TRY)
    assert trio.run(trusted.head, "blobs/a") is None
    # it was the direct path that answered
    assert isinstance(trusted.blobs, LatchedBlobs)
    assert isinstance(trusted.blobs.serving, DirectBlobs) and trusted.blobs.serving.tls is not None


def test_downloads_stream_directly_and_resume_where_they_broke(s3_proxy, s3_bucket, tmp_path):
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)
    data = os.urandom(3 * 1024 * 1024 + 17)
    path, sha = blob(tmp_path, data)
    dest = tmp_path / "got"
    seen: list[int] = []

    async def main():
        await store.put_file("blobs/d", path, sha)
        s3_proxy.reset_counts()
        s3_proxy.inject(method="GET", drop="midway", times=1)
        await store.download("blobs/d", dest, on_chunk=seen.append)
        await store.aclose()

    trio.run(main)
    assert dest.read_bytes() == data
    gets = [r for r in s3_proxy.requests if r.method == "GET"]
    assert len(gets) == 2 and gets[0].status is None  # the first one was cut off
    first_range, second = gets[0].headers["range"], gets[1].headers
    assert first_range == "bytes=0-"
    resumed_at = int(second["range"].removeprefix("bytes=").rstrip("-"))
    # From the last byte written before the cut (0 if the reset beat every byte to us),
    # pinned to the same object.
    assert resumed_at < len(data) and (resumed_at == 0 or resumed_at in seen)
    assert second.get("if-match")
    assert all("boto3" not in r.headers.get("user-agent", "").lower() for r in gets)
    assert seen[-1] == len(data)


def test_a_redirect_hands_the_store_to_boto3_for_good(s3_proxy, s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)
    path, sha = blob(tmp_path, os.urandom(4096))
    s3_proxy.inject(method="PUT", status=301, code="PermanentRedirect", times=1)

    async def main():
        assert await store.put_file("blobs/m", path, sha) is True  # boto3 made it after all
        assert await store.head("blobs/m") == 4096
        assert await store.head("blobs/n") is None
        await store.aclose()

    trio.run(main)
    assert isinstance(store.blobs, LatchedBlobs) and isinstance(store.blobs.serving, Boto3Blobs)
    seen = [(r.method, r.status, "Boto3" in r.headers.get("user-agent", ""))
            for r in s3_proxy.requests if r.method in ("PUT", "HEAD")]
    assert seen == [("PUT", 301, False), ("PUT", 200, True), ("HEAD", 200, True),
                    ("HEAD", 404, True)]
    assert caplog.text.count("go through boto3 from now on") == 1


# -- against real-world S3 behaviour ---------------------------------------------------------
def _direct(store: S3Store) -> DirectBlobs:
    assert isinstance(store.blobs, LatchedBlobs) and isinstance(store.blobs.serving, DirectBlobs)
    return store.blobs.serving


def test_a_region_error_on_head_is_followed_and_remembered(moto_server, s3_bucket, tmp_path,
                                                           caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    path, sha = blob(tmp_path, os.urandom(4096))
    with S3Proxy(moto_server.url, region="eu-west-1") as proxy:
        store = S3Store(s3_bucket.bucket, "repo", endpoint_url=proxy.url, region="us-east-1")

        async def main():
            # A HEAD's region error has no body: only its x-amz-bucket-region says it.
            assert await store.head("blobs/w") is None
            assert await store.put_file("blobs/w", path, sha) is True
            assert await store.head("blobs/w") == 4096
            await store.aclose()

        trio.run(main)
        seen = [(r.method, r.status) for r in proxy.requests]
    assert seen == [("HEAD", 400), ("HEAD", 404), ("PUT", 200), ("HEAD", 200)]
    assert _direct(store)._region == "eu-west-1"  # remembered: one region error in all
    assert caplog.text.count("is in region eu-west-1") == 1


def test_idle_connections_the_server_closed_are_not_reused(moto_server, s3_bucket, caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    with S3Proxy(moto_server.url, idle_timeout=0.2) as proxy:
        store = S3Store(s3_bucket.bucket, "repo", endpoint_url=proxy.url)
        assert trio.run(store.head, "blobs/i") is None
        poll(lambda: proxy.idle_closed >= 1, what="the proxy to close the idle connection")
        assert trio.run(store.head, "blobs/i") is None
        trio.run(store.aclose)
        assert [r.status for r in proxy.requests] == [404, 404]
    assert "failed (attempt" not in caplog.text  # no try was lost on the dead connection


def test_a_tls_connection_cut_without_its_close_is_a_dropped_connection(
        s3_proxy, s3_bucket, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    cert, key = make_certificate(tmp_path)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
    data = os.urandom(2 * 1024 * 1024)
    path, sha = blob(tmp_path, data)
    with TLSFront(s3_proxy.url, cert, key) as front:
        store = S3Store(s3_bucket.bucket, "repo", endpoint_url=front.url)
        front.cut("handshake")
        front.cut("request", after=256 * 1024)  # mid-body

        async def main():
            assert await store.put_file("blobs/t", path, sha) is True
            assert await store.head("blobs/t") == len(data)
            await store.aclose()

        trio.run(main)
        assert front.cuts_made == 2
    assert "SSLEOFError" in caplog.text and "validation failed" not in caplog.text
    assert isinstance(_direct(store), DirectBlobs)


@pytest.mark.expected_logs(r"S3 at .* kept failing", reason="the HEAD is throttled for good")
def test_throttling_is_retried_with_backoff(s3_proxy, s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url,
                    retries=replace(REQUEST, cap=0.2))
    path, sha = blob(tmp_path, os.urandom(4096))
    s3_proxy.inject(method="PUT", status=429, times=2)
    s3_proxy.inject(method="PUT", status=503, code="SlowDown", times=1)
    assert trio.run(store.put_file, "blobs/s", path, sha) is True
    assert [r.status for r in s3_proxy.requests if r.method == "PUT"] == [429, 429, 503, 200]
    assert caplog.text.count("all blob requests wait") == 3
    s3_proxy.inject(method="HEAD", status=429, times=None)
    with pytest.raises(StorageError, match="kept failing"):
        trio.run(store.head, "blobs/s")
    assert s3_proxy.count("HEAD") == REQUEST.attempts
    trio.run(store.aclose)


def test_the_throttle_pause_is_shared_and_shrinks_with_successes():
    now = [100.0]
    throttle = SharedThrottle(replace(REQUEST, jitter=0.0), clock=lambda: now[0])
    assert throttle.pause() == 0.0
    first = throttle.throttled()
    second = throttle.throttled()
    assert second == pytest.approx(2 * first)
    assert throttle.pause() == pytest.approx(second)  # every caller waits it out
    now[0] += second
    assert throttle.pause() == 0.0
    throttle.succeeded()
    assert throttle.throttled() == pytest.approx(second)  # one success took one step back


def test_large_puts_wait_for_100_continue(s3_proxy, s3_bucket, tmp_path):
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)
    big_path, big_sha = blob(tmp_path, os.urandom(EXPECT_ABOVE + 1))
    small = tmp_path / "small"
    small.write_bytes(b"small")
    small_sha = hashlib.sha256(b"small").hexdigest()
    s3_proxy.inject(method="PUT", status=412, times=1)  # "there already", before the body

    async def main():
        assert await store.put_file("blobs/e", big_path, big_sha) is False
        assert await store.put_file("blobs/e", big_path, big_sha) is True
        assert await store.put_file("blobs/f", small, small_sha) is True
        assert await store.head("blobs/e") == EXPECT_ABOVE + 1
        await store.aclose()

    trio.run(main)
    puts = [r for r in s3_proxy.requests if r.method == "PUT"]
    assert [(r.status, r.body_size) for r in puts] == [(412, 0), (200, EXPECT_ABOVE + 1),
                                                      (200, 5)]
    assert [r.headers.get("expect") for r in puts] == ["100-continue", "100-continue", None]


def test_a_server_that_sends_no_etag_gets_a_clear_error(moto_server, s3_bucket, tmp_path):
    path, sha = blob(tmp_path, os.urandom(4096))
    direct = S3Store(s3_bucket.bucket, "repo", endpoint_url=moto_server.url)
    assert trio.run(direct.put_file, "blobs/g", path, sha) is True
    trio.run(direct.aclose)
    with S3Proxy(moto_server.url, drop_headers=("etag",)) as proxy:
        store = S3Store(s3_bucket.bucket, "repo", endpoint_url=proxy.url)
        for call in (lambda: store.get("blobs/g"), lambda: store.put("k", b"x"),
                     lambda: store.download("blobs/g", tmp_path / "got")):
            with pytest.raises(StorageError, match="without an ETag"):
                trio.run(call)
        trio.run(store.aclose)


def test_get_refuses_an_object_over_the_limit_unread(s3_proxy, s3_bucket, monkeypatch):
    monkeypatch.setattr(s3_module, "GET_LIMIT", 1000)  # the real limit, met sooner
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)

    async def main():
        await store.put("dirs/small.json", b"s" * 1000)
        await store.put("dirs/big.json", b"b" * 1001)
        assert (await store.get("dirs/small.json")).data == b"s" * 1000
        with pytest.raises(ObjectTooLarge, match="that imgrepo reads whole"):
            await store.get("dirs/big.json")
        await store.aclose()

    trio.run(main)


def test_many_blobs_meeting_a_redirect_at_once_latch_to_boto3_once(s3_proxy, s3_bucket,
                                                                  tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fsrepo")
    store = S3Store(s3_bucket.bucket, "repo", endpoint_url=s3_proxy.url)
    blobs = []
    for i in range(8):
        data = os.urandom(1000 + i)
        path = tmp_path / f"b{i}"
        path.write_bytes(data)
        blobs.append((f"blobs/c{i}", path, hashlib.sha256(data).hexdigest()))
        s3_proxy.inject(method="PUT", path=f"/blobs/c{i}$", status=301,
                        code="PermanentRedirect", times=1)  # each blob's first PUT
    results: list[bool] = []

    async def main():
        async with trio.open_nursery() as nursery:
            for key, path, sha in blobs:
                async def one(key=key, path=path, sha=sha):
                    results.append(await store.put_file(key, path, sha))
                nursery.start_soon(one)
        for key, _path, _sha in blobs:  # every blob request from now on: boto3's
            assert await store.head(key) is not None
        await store.aclose()

    trio.run(main)
    assert results == [True] * 8
    assert caplog.text.count("go through boto3 from now on") == 1
    heads = [r for r in s3_proxy.requests if r.method == "HEAD" and "/blobs/" in r.path]
    assert len(heads) == 8 and all("Boto3" in r.headers.get("user-agent", "") for r in heads)
