"""The benchmark's S3 server answers like S3 where the benchmark relies on it: multipart
objects are kept as their parts, so every read that crosses a part boundary must still give
the object's bytes in order."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from testservers.net import free_port, wait_listening

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "testservers.s3lite", "--port", str(port), "--warm-mib", "32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    try:
        wait_listening(port, proc, what="s3lite", timeout=30)
        client = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"max_attempts": 1}))
        client.create_bucket(Bucket="b")
        yield client
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _multipart(s3: Any, key: str, parts: list[bytes]) -> dict:
    up = s3.create_multipart_upload(Bucket="b", Key=key, ChecksumAlgorithm="SHA256")
    done = []
    for number, body in enumerate(parts, start=1):
        r = s3.upload_part(Bucket="b", Key=key, UploadId=up["UploadId"], PartNumber=number,
                           Body=body, ChecksumAlgorithm="SHA256")
        done.append({"PartNumber": number, "ETag": r["ETag"],
                     "ChecksumSHA256": r["ChecksumSHA256"]})
    return s3.complete_multipart_upload(Bucket="b", Key=key, UploadId=up["UploadId"],
                                        MultipartUpload={"Parts": done})


def test_multipart_object_reads_across_its_parts(s3: Any) -> None:
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(MiB + 7)]
    whole = b"".join(parts)
    result = _multipart(s3, "big", parts)
    assert result["ETag"].strip('"').endswith("-3")

    assert s3.get_object(Bucket="b", Key="big")["Body"].read() == whole
    assert s3.head_object(Bucket="b", Key="big")["ContentLength"] == len(whole)
    for first, last in [(0, 0), (5 * MiB - 3, 5 * MiB + 2), (MiB, 10 * MiB + 5),
                        (10 * MiB, len(whole) - 1), (len(whole) - 1, len(whole) + 99)]:
        got = s3.get_object(Bucket="b", Key="big", Range=f"bytes={first}-{last}")
        assert got["Body"].read() == whole[first:last + 1], (first, last)
        assert got["ContentRange"] == f"bytes {first}-{min(last, len(whole) - 1)}/{len(whole)}"
    tail = s3.get_object(Bucket="b", Key="big", Range="bytes=-10")["Body"].read()
    assert tail == whole[-10:]
    listed = s3.list_objects_v2(Bucket="b", Prefix="big")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listed] == [("big", len(whole))]


def test_copies_of_a_multipart_object_hold_its_bytes(s3: Any) -> None:
    parts = [os.urandom(5 * MiB), os.urandom(3 * MiB)]
    whole = b"".join(parts)
    _multipart(s3, "src", parts)

    s3.copy_object(Bucket="b", Key="copy", CopySource={"Bucket": "b", "Key": "src"})
    assert s3.get_object(Bucket="b", Key="copy")["Body"].read() == whole

    up = s3.create_multipart_upload(Bucket="b", Key="ranged")
    first, last = 5 * MiB - 100, 6 * MiB  # a range that spans both source parts
    r = s3.upload_part_copy(Bucket="b", Key="ranged", UploadId=up["UploadId"], PartNumber=1,
                            CopySource={"Bucket": "b", "Key": "src"},
                            CopySourceRange=f"bytes={first}-{last}")
    s3.complete_multipart_upload(
        Bucket="b", Key="ranged", UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": r["CopyPartResult"]["ETag"]}]})
    assert s3.get_object(Bucket="b", Key="ranged")["Body"].read() == whole[first:last + 1]


def test_small_and_empty_objects(s3: Any) -> None:
    s3.put_object(Bucket="b", Key="empty", Body=b"")
    assert s3.get_object(Bucket="b", Key="empty")["Body"].read() == b""
    assert s3.head_object(Bucket="b", Key="empty")["ContentLength"] == 0
    body = os.urandom(300 * 1024)  # above the size sent with the headers in one write
    s3.put_object(Bucket="b", Key="small", Body=body)
    assert s3.get_object(Bucket="b", Key="small")["Body"].read() == body
    got = s3.get_object(Bucket="b", Key="small", Range="bytes=100-199")["Body"].read()
    assert got == body[100:200]
