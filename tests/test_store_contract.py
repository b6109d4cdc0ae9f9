"""The storage contract (fsrepo/store/base.py), run on both backends, plus the parts that
only one backend has (multipart and error mapping for S3, cross-process locking for file://).

Tests are sync functions that run their async body with `trio.run`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
import trio

from fsrepo.errors import (
    ConfigError,
    IntegrityError,
    NoSuchBucket,
    ObjectNotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageUnavailable,
)
from fsrepo.retry import REQUEST
from fsrepo.store import NOT_MODIFIED, Store, StoredObject, open_store
from fsrepo.store.base import FileRange
from fsrepo.store.local import LOCK_DIR, TMP_PREFIX, LocalStore
from fsrepo.store.s3 import S3Store
from testservers.moto import MotoServer
from testservers.net import closed_port
from testservers.s3proxy import S3Proxy

from .targets import S3Target

MiB = 1 << 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def read(store: Store, key: str) -> StoredObject:
    obj = await store.get(key)
    assert isinstance(obj, StoredObject)
    return obj


def s3_store(target: S3Target, endpoint_url: str | None = None, **options: object) -> S3Store:
    return S3Store(
        target.bucket,
        target.prefix,
        endpoint_url=endpoint_url or target.endpoint_url,
        **options,  # type: ignore[arg-type]
    )


# -- the contract, on both backends ---------------------------------------------------------


def test_put_get_roundtrip(store: Store) -> None:
    async def main() -> None:
        etag = await store.put("dirs/root.json", b'{"a": 1}')
        obj = await read(store, "dirs/root.json")
        assert obj == StoredObject(b'{"a": 1}', etag)
        await store.put("empty", b"")
        assert (await read(store, "empty")).data == b""
        with pytest.raises(ObjectNotFound):
            await store.get("dirs/missing.json")
        with pytest.raises(ObjectNotFound):
            await store.get("nowhere/at/all")

    trio.run(main)


def test_etag_changes_on_write(store: Store) -> None:
    async def main() -> None:
        first = await store.put("k", b"one")
        second = await store.put("k", b"two")
        assert first != second
        assert (await read(store, "k")).etag == second
        assert await store.put("k", b"one") != second

    trio.run(main)


def test_if_none_match_creates_once(store: Store) -> None:
    async def main() -> None:
        etag = await store.put("imgrepo.json", b"first", if_none_match=True)
        with pytest.raises(PreconditionFailed):
            await store.put("imgrepo.json", b"second", if_none_match=True)
        assert await read(store, "imgrepo.json") == StoredObject(b"first", etag)

    trio.run(main)


def test_if_match(store: Store) -> None:
    async def main() -> None:
        old = await store.put("dirs/d.json", b"v1")
        new = await store.put("dirs/d.json", b"v2", if_match=old)
        assert await read(store, "dirs/d.json") == StoredObject(b"v2", new)
        with pytest.raises(PreconditionFailed):
            await store.put("dirs/d.json", b"v3", if_match=old)  # stale etag
        assert (await read(store, "dirs/d.json")).data == b"v2"
        with pytest.raises(ObjectNotFound):
            await store.put("dirs/nothing.json", b"v1", if_match=old)
        with pytest.raises(ObjectNotFound):
            await store.get("dirs/nothing.json")

    trio.run(main)


def test_racing_creates_have_one_winner(store: Store) -> None:
    winners: list[int] = []

    async def contender(i: int) -> None:
        try:
            await store.put("race.json", f"writer {i}".encode(), if_none_match=True)
        except PreconditionFailed:
            return
        winners.append(i)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(contender, i)
        assert len(winners) == 1
        assert (await read(store, "race.json")).data == f"writer {winners[0]}".encode()

    trio.run(main)


def test_compare_and_swap_counter_loses_no_update(store: Store) -> None:
    tasks, increments = 6, 5

    async def bump() -> None:
        for _ in range(increments):
            while True:
                obj = await read(store, "counter")
                try:
                    await store.put("counter", b"%d" % (int(obj.data) + 1), if_match=obj.etag)
                    break
                except PreconditionFailed:
                    await trio.sleep(0)

    async def main() -> None:
        await store.put("counter", b"0", if_none_match=True)
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(bump)
        assert int((await read(store, "counter")).data) == tasks * increments

    trio.run(main)


def test_conditional_get(store: Store) -> None:
    async def main() -> None:
        etag = await store.put("dirs/x.json", b"v1")
        assert await store.get("dirs/x.json", if_none_match=etag) is NOT_MODIFIED
        new = await store.put("dirs/x.json", b"v2")
        assert await store.get("dirs/x.json", if_none_match=etag) == StoredObject(b"v2", new)
        with pytest.raises(ObjectNotFound):
            await store.get("dirs/gone.json", if_none_match=etag)

    trio.run(main)


def test_get_range(store: Store) -> None:
    data = bytes(range(256)) * 40

    async def main() -> None:
        await store.put("blob", data)
        assert await store.get_range("blob", 0, 10) == data[:10]
        assert await store.get_range("blob", 1000, 5000) == data[1000:5000]
        assert await store.get_range("blob", len(data) - 5, len(data) + 100) == data[-5:]
        assert await store.get_range("blob", len(data), len(data) + 10) == b""
        assert await store.get_range("blob", 7, 7) == b""
        with pytest.raises(ObjectNotFound):
            await store.get_range("missing", 0, 10)

    trio.run(main)


def test_download_from_offset(store: Store, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 12345)
    seen: list[int] = []

    async def main() -> None:
        await store.put("blobs/big", data)
        whole = tmp_path / "whole"
        await store.download("blobs/big", whole, on_chunk=seen.append)
        assert whole.read_bytes() == data
        assert seen == sorted(seen) and seen[-1] == len(data) and len(seen) >= 3

        # resume: the first bytes are already there and must be kept as they are
        part = tmp_path / "part"
        part.write_bytes(b"\xff" * 1000)
        seen.clear()
        await store.download("blobs/big", part, start=1000, on_chunk=seen.append)
        content = part.read_bytes()
        assert content[:1000] == b"\xff" * 1000 and content[1000:] == data[1000:]
        assert seen[-1] == len(data) and seen[0] > 1000

        empty = tmp_path / "empty"
        await store.put("blobs/empty", b"")
        await store.download("blobs/empty", empty)
        assert empty.read_bytes() == b""

        with pytest.raises(ObjectNotFound):
            await store.download("blobs/missing", tmp_path / "never")
        assert not (tmp_path / "never").exists()

    trio.run(main)


def test_download_stops_soon_when_cancelled(store: Store, tmp_path: Path) -> None:
    data = os.urandom(16 * MiB)
    dest = tmp_path / "partial"

    def slow_reader(_: int) -> None:
        time.sleep(0.05)  # 16 chunks: a whole download takes at least 0.8 s

    async def main() -> None:
        await store.put("blobs/big", data)
        started = time.monotonic()
        with trio.move_on_after(0.15) as scope:
            await store.download("blobs/big", dest, on_chunk=slow_reader)
        assert scope.cancelled_caught
        assert time.monotonic() - started < 0.5
        assert dest.stat().st_size < len(data)

    trio.run(main)


def test_put_file_creates_once(store: Store, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    src = tmp_path / "photo.jpg"
    src.write_bytes(data)
    key = f"blobs/sha256/{sha256(data)[:2]}/{sha256(data)}"

    async def main() -> None:
        assert await store.head(key) is None
        assert await store.put_file(key, src, sha256(data)) is True
        assert await store.put_file(key, src, sha256(data)) is False
        assert await store.head(key) == len(data)
        assert (await read(store, key)).data == data

    trio.run(main)


def test_put_file_sends_a_range_of_an_open_file(store: Store, tmp_path: Path) -> None:
    """A chunk goes up straight from its byte range of the file holding it (no copy of
    its own); file:// refuses a range that does not hash to its name (S3 does too, by the
    checksum sent with it; moto, the test server, does not check it)."""
    data = os.urandom(300_000)
    src = tmp_path / "video.mov"
    src.write_bytes(data)
    piece = data[100_000:250_000]
    key = f"blobs/sha256/{sha256(piece)[:2]}/{sha256(piece)}"

    async def main() -> None:
        fd = os.open(src, os.O_RDONLY)
        try:
            assert await store.put_file(key, FileRange(fd, 100_000, 150_000),
                                        sha256(piece)) is True
            assert await store.head(key) == len(piece)
            assert (await read(store, key)).data == piece
            if isinstance(store, LocalStore):
                with pytest.raises(IntegrityError):
                    await store.put_file("blobs/other", FileRange(fd, 0, 150_000),
                                         sha256(piece))
                assert await store.head("blobs/other") is None
        finally:
            os.close(fd)

    trio.run(main)


def test_list_is_ordered_and_filtered(store: Store) -> None:
    keys = ["a-b", "a/b", "a/c/d", "a0", "b", "blobs/sha256/ab/ab12", "blobs/sha256/ac/ac34"]
    keys += [f"dirs/{i:03d}.json" for i in range(25)]

    async def main() -> None:
        for key in reversed(keys):
            await store.put(key, key.encode())
        listed = [info async for info in store.list("")]
        assert [info.key for info in listed] == sorted(keys)
        assert all(info.size == len(info.key) for info in listed)
        assert all(abs(info.mtime - time.time()) < 300 for info in listed)
        assert [i.key async for i in store.list("dirs/")] == [k for k in keys if k[:5] == "dirs/"]
        assert [i.key async for i in store.list("blobs/sha256/a")] == keys[5:7]
        assert [i.key async for i in store.list("a")] == ["a-b", "a/b", "a/c/d", "a0"]
        assert [i.key async for i in store.list("a/")] == ["a/b", "a/c/d"]
        assert [i.key async for i in store.list("nothing/")] == []

    trio.run(main)


def test_delete(store: Store) -> None:
    async def main() -> None:
        await store.put("dirs/a.json", b"x")
        await store.delete("dirs/a.json")
        assert await store.head("dirs/a.json") is None
        with pytest.raises(ObjectNotFound):
            await store.get("dirs/a.json")
        await store.delete("dirs/a.json")  # no error the second time
        await store.put("dirs/a.json", b"y", if_none_match=True)  # and it can come back

    trio.run(main)


# -- file:// only ----------------------------------------------------------------------------


def test_local_put_file_checks_sha256(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "repo")
    src = tmp_path / "src"
    src.write_bytes(b"the real content")

    async def main() -> None:
        with pytest.raises(IntegrityError):
            await store.put_file("blobs/x", src, sha256(b"something else"))
        assert await store.head("blobs/x") is None
        with pytest.raises(FileNotFoundError):  # the caller's file: not a storage error
            await store.put_file("blobs/y", tmp_path / "no-such-file", sha256(b""))

    trio.run(main)
    leftovers = [p.name for p in (tmp_path / "repo").rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert leftovers == []


def test_local_zero_config_and_private_files(tmp_path: Path) -> None:
    root = tmp_path / "does" / "not" / "exist" / "yet"
    store = open_store(f"file://{root}")
    assert isinstance(store, LocalStore) and root.is_dir()

    async def main() -> None:
        etag = await store.put("dirs/a.json", b"x")
        (root / "dirs" / (TMP_PREFIX + "crashed")).write_bytes(b"half a manifest")
        assert [i.key async for i in store.list("")] == ["dirs/a.json"]
        assert (root / LOCK_DIR).is_dir()
        # etags are content hashes: the same in another process, and after a restart
        assert (await read(LocalStore(root), "dirs/a.json")).etag == etag
        for bad in ("", "/abs", "a//b", "../up", "a/./b", "x/", f"{LOCK_DIR}/k"):
            with pytest.raises(ValueError):
                await store.put(bad, b"x")

    trio.run(main)


WORKER = r"""
import sys, time, trio
from pathlib import Path
from fsrepo.errors import PreconditionFailed
from fsrepo.store.local import LocalStore

root, mode, ident, count, start_at = sys.argv[1:6]
store = LocalStore(Path(root))

async def main():
    time.sleep(max(0.0, float(start_at) - time.time()))  # all processes start together
    if mode == "create":
        try:
            await store.put("race.json", ident.encode(), if_none_match=True)
            print("won")
        except PreconditionFailed:
            print("lost")
        return
    for _ in range(int(count)):
        while True:
            obj = await store.get("counter")
            try:
                await store.put("counter", b"%d" % (int(obj.data) + 1), if_match=obj.etag)
                break
            except PreconditionFailed:
                pass

trio.run(main)
"""


def _run_workers(root: Path, mode: str, processes: int, count: int) -> list[str]:
    start_at = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), mode, str(i), str(count), str(start_at)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    return outputs


def test_local_conditional_writes_are_atomic_across_processes(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    store = LocalStore(root)
    trio.run(store.put, "counter", b"0")
    outputs = _run_workers(root, "create", processes=8, count=0)
    assert sorted(outputs) == ["lost"] * 7 + ["won"]
    _run_workers(root, "cas", processes=4, count=25)
    assert trio.run(read, store, "counter").data == b"100"


# -- s3:// only ------------------------------------------------------------------------------


def test_s3_keys_live_under_the_prefix(s3_bucket: S3Target, moto_server: MotoServer) -> None:
    store = s3_store(s3_bucket)
    trio.run(store.put, "dirs/root.json", b"{}")
    client = moto_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket.bucket)["Contents"]]
    assert keys == ["repo/dirs/root.json"]
    client.put_object(Bucket=s3_bucket.bucket, Key="repository/other", Body=b"not ours")
    assert trio.run(_keys, store, "") == ["dirs/root.json"]


async def _keys(store: Store, prefix: str) -> list[str]:
    return [info.key async for info in store.list(prefix)]


def test_s3_multipart_put_file(
    s3_bucket: S3Target, s3_proxy: S3Proxy, moto_server: MotoServer, tmp_path: Path
) -> None:
    store = s3_store(
        s3_bucket, s3_proxy.url, multipart_threshold=6 * MiB, part_size=5 * MiB, part_concurrency=3
    )
    data = os.urandom(11 * MiB + 17)
    src = tmp_path / "video.mp4"
    src.write_bytes(data)
    client = moto_server.client()

    async def main() -> None:
        assert await store.put_file("blobs/v", src, sha256(data)) is True
        assert s3_proxy.count("PUT", query="partNumber") == 3
        assert s3_proxy.count("POST", query="uploadId") == 1  # CompleteMultipartUpload
        assert await store.put_file("blobs/v", src, sha256(data)) is False
        assert await store.head("blobs/v") == len(data)
        assert (await read(store, "blobs/v")).data == data
        # a file that does not match its name is refused, and the upload is aborted
        with pytest.raises(IntegrityError):
            await store.put_file("blobs/w", src, sha256(b"other"))
        assert await store.head("blobs/w") is None
        assert not client.list_multipart_uploads(Bucket=s3_bucket.bucket).get("Uploads")
        # below the threshold: one PUT that carries the SHA-256 checksum
        small = tmp_path / "small"
        small.write_bytes(b"x" * 1000)
        s3_proxy.reset_counts()
        assert await store.put_file("blobs/s", small, sha256(b"x" * 1000)) is True
        assert [(r.method, r.status) for r in s3_proxy.requests] == [("PUT", 200)]

    trio.run(main)
    head = client.head_object(Bucket=s3_bucket.bucket, Key="repo/blobs/s", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(b"x" * 1000).digest()).decode()


def test_s3_list_paginates(s3_bucket: S3Target, s3_proxy: S3Proxy) -> None:
    store = s3_store(s3_bucket, s3_proxy.url, list_page_size=3)
    keys = [f"dirs/{i:02d}.json" for i in range(10)]

    async def main() -> None:
        for key in keys:
            await store.put(key, b"{}")
        s3_proxy.reset_counts()
        assert await _keys(store, "dirs/") == keys
        assert s3_proxy.count("GET", query="list-type=2") == 4

    trio.run(main)


def test_s3_missing_bucket(moto_server: MotoServer) -> None:
    store = S3Store("imgrepo-no-such-bucket", "repo", endpoint_url=moto_server.url)

    async def main() -> None:
        for attempt in (store.get("k"), store.put("k", b"x"), _keys(store, ""), store.check()):
            with pytest.raises(NoSuchBucket, match="imgrepo-no-such-bucket"):
                await attempt

    trio.run(main)


def test_s3_unreachable_endpoint_fails_fast() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    store = S3Store("bucket", endpoint_url=endpoint, retries=replace(REQUEST, attempts=2), connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=endpoint):
        trio.run(store.get, "dirs/root.json")
    assert time.monotonic() - started < 5


def test_s3_wrong_credentials(private_moto_server: MotoServer) -> None:
    private_moto_server.create_bucket("imgrepo-auth")
    private_moto_server.enable_auth()  # from now on, only IAM users' keys are accepted
    session = boto3.session.Session(
        aws_access_key_id="AKIAWRONGWRONGWRONG0", aws_secret_access_key="wrong-secret-value"
    )
    store = S3Store("imgrepo-auth", endpoint_url=private_moto_server.url, session=session)
    with pytest.raises(StorageAccessDenied) as info:
        trio.run(store.get, "dirs/root.json")
    assert "wrong-secret-value" not in str(info.value)
    assert "AKIAWRONG" not in str(info.value)


def test_s3_no_credentials(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3Store("bucket", endpoint_url=moto_server.url)
    with pytest.raises(StorageAccessDenied, match="no AWS credentials found"):
        trio.run(store.get, "k")


def test_s3_conditional_conflict_is_retried(s3_bucket: S3Target, s3_proxy: S3Proxy) -> None:
    store = s3_store(s3_bucket, s3_proxy.url, retries=replace(REQUEST, attempts=4))

    async def main() -> None:
        fault = s3_proxy.inject(method="PUT", status=409, times=2)
        etag = await store.put("dirs/a.json", b"v1", if_none_match=True)
        assert fault.hits == 2
        s3_proxy.inject(method="PUT", status=409, times=None)
        with pytest.raises(PreconditionFailed, match="409"):
            await store.put("dirs/a.json", b"v2", if_match=etag)
        s3_proxy.clear_faults()
        assert (await read(store, "dirs/a.json")).data == b"v1"

    trio.run(main)


def test_s3_transient_faults_are_retried(
    s3_bucket: S3Target, s3_proxy: S3Proxy, tmp_path: Path
) -> None:
    store = s3_store(s3_bucket, s3_proxy.url)
    data = os.urandom(2 * MiB)

    async def main() -> None:
        s3_proxy.inject(method="PUT", status=503)  # SlowDown: botocore retries it
        s3_proxy.inject(method="PUT", drop="before")  # connection reset: retried as well
        await store.put("blobs/b", data)
        assert s3_proxy.count("PUT") == 3
        # a body cut off half way: get() retries, download() resumes where it broke
        s3_proxy.inject(method="GET", drop="midway")
        assert (await read(store, "blobs/b")).data == data
        s3_proxy.reset_counts()
        s3_proxy.inject(method="GET", drop="midway")
        await store.download("blobs/b", tmp_path / "b")
        assert (tmp_path / "b").read_bytes() == data
        assert s3_proxy.count("GET") == 2

    trio.run(main)


def test_s3_outage_then_recovery(s3_bucket: S3Target, s3_proxy: S3Proxy) -> None:
    store = s3_store(s3_bucket, s3_proxy.url, retries=replace(REQUEST, attempts=2), connect_timeout=1)

    async def main() -> None:
        await store.put("k", b"kept")
        s3_proxy.pause()
        with pytest.raises(StorageUnavailable):
            await store.get("k")
        s3_proxy.resume()
        assert (await read(store, "k")).data == b"kept"

    trio.run(main)


# -- open_store ------------------------------------------------------------------------------


def test_open_store_urls(tmp_path: Path) -> None:
    local = open_store(f"file://{tmp_path}/r")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "r"
    assert isinstance(open_store(str(tmp_path / "bare")), LocalStore)
    s3 = open_store("s3://my-bucket/some/prefix/", endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.url) == (
        "my-bucket",
        "some/prefix",
        "s3://my-bucket/some/prefix",
    )
    assert open_store("s3://my-bucket").url == "s3://my-bucket"
    for bad in (
        "http://example.com/x",
        "file://relative/path",
        "s3://",
        "s3:///prefix",
        "s3://a",
        "s3://bad bucket/x",
        "s3://key:secret@bucket/x",
        "s3://bucket/a/../b",
        "~/repo",
    ):
        with pytest.raises(ConfigError):
            open_store(bad)
