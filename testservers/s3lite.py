#!/usr/bin/env python3
"""s3lite: a small, fast, in-memory S3-compatible server for the benchmark (127.0.0.1 only).

    python -m testservers.s3lite --port 9000

moto's server mode spends ~3 ms of CPU per request and tops out near 40-60 MB/s of
uploads on one core; with it as the server, a benchmark of S3 clients measures moto. This
server keeps the request path short so the clients are what is measured. It speaks the part
of S3 that imgrepo (boto3), rclone (aws-sdk-go) and s3fs (libcurl) use, with S3's semantics:

- buckets: create, head, delete, location, list (ListObjects v1 and v2: prefix, delimiter,
  marker / continuation-token / start-after, max-keys, encoding-type=url), ListBuckets
- objects: PUT (conditional If-None-Match: * and If-Match: 412 / 404 as on S3; Content-MD5
  checked), GET and HEAD (single byte ranges 206 / 416, If-Match 412, If-None-Match 304),
  DELETE, DeleteObjects, CopyObject (metadata COPY / REPLACE), user metadata, checksums
  (x-amz-checksum-* stored and returned with x-amz-checksum-mode: ENABLED)
- multipart: create, upload part, upload part copy, complete (conditional too), abort, list
- request bodies: Content-Length, Transfer-Encoding: chunked, aws-chunked (with trailers)

No authentication (every signature is accepted), no versioning, no persistence: everything
is lost when it stops. Not for anything but tests and benchmarks on loopback.

Memory is where such a server spends its time: profiled receiving a 1 GiB multipart upload,
two thirds of its CPU went to the kernel zeroing fresh pages (the receive buffers, then the
join of the parts into one object). So a multipart object keeps its parts as received
(`Body`), and the heap is warmed once and never handed back to the kernel (`keep_heap`):
buffers freed when a bucket is deleted are re-used by the next client without page faults,
which also makes the order in which a benchmark runs its clients irrelevant.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import ctypes
import hashlib
import socket
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
CHECKSUMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


class Body:
    """An object's bytes: one buffer, or a multipart upload's parts as received (joining
    them would copy every byte once more into freshly faulted memory)."""

    __slots__ = ("chunks", "starts", "size")

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = [c for c in chunks if c]
        self.starts: list[int] = []
        pos = 0
        for c in self.chunks:
            self.starts.append(pos)
            pos += len(c)
        self.size = pos

    def __len__(self) -> int:
        return self.size

    def views(self, start: int, end: int) -> list[memoryview]:
        """The bytes [start, end) as views into the chunks, no copy."""
        out: list[memoryview] = []
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        while start < end and i < len(self.chunks):
            base = self.starts[i]
            chunk = self.chunks[i]
            lo, hi = start - base, min(end - base, len(chunk))
            if hi > lo:
                out.append(memoryview(chunk)[lo:hi])
                start = base + hi
            i += 1
        return out

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        end = self.size if end is None else min(end, self.size)
        views = self.views(start, end)
        return bytes(views[0]) if len(views) == 1 else b"".join(views)  # b"" if none


@dataclass
class Obj:
    data: Body
    etag: str  # without quotes
    mtime: float
    meta: dict[str, str]
    ctype: str
    checksums: dict[str, str]


@dataclass
class Upload:
    key: str
    meta: dict[str, str]
    ctype: str
    algorithm: str
    parts: dict[int, tuple[bytes, str, str | None]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


@dataclass
class Bucket:
    created: float
    objects: dict[str, Obj] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # sorted
    uploads: dict[str, Upload] = field(default_factory=dict)

    def put(self, key: str, obj: Obj) -> None:
        if key not in self.objects:
            bisect.insort(self.keys, key)
        self.objects[key] = obj

    def delete(self, key: str) -> None:
        if self.objects.pop(key, None) is not None:
            i = bisect.bisect_left(self.keys, key)
            if i < len(self.keys) and self.keys[i] == key:
                del self.keys[i]


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.status, self.code, self.message = status, code, message or code


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: dict[str, Bucket] = {}

    def bucket(self, name: str) -> Bucket:
        b = self.buckets.get(name)
        if b is None:
            raise S3Error(404, "NoSuchBucket", "The specified bucket does not exist")
        return b


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def xml_doc(root: str, body: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{NS}">{body}</{root}>'
            ).encode()


def children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in elem if c.tag.rsplit("}", 1)[-1] == name]


def child_text(elem: ET.Element, name: str) -> str | None:
    found = children(elem, name)
    return found[0].text if found else None


def strip_etag(value: str) -> str:
    return value.strip().strip('"')


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "s3lite"
    sys_version = ""
    state: State  # set on the class by serve()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def setup(self) -> None:
        super().setup()
        # Without this, the last segment of a response waits for the client's delayed ACK
        # (Nagle): ~40 ms per small GET.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- plumbing ------------------------------------------------------------------------
    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def dispatch(self, method: str) -> None:
        self.trailers: dict[str, str] = {}
        try:
            body = self.read_body() if method in ("PUT", "POST") else b""
        except (ValueError, OSError):
            self.close_connection = True
            return
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        path = unquote(url.path)
        bucket, _, key = path.lstrip("/").partition("/")
        try:
            if not bucket:
                if method == "GET":
                    return self.list_buckets()
                raise S3Error(405, "MethodNotAllowed")
            if not key:
                return self.bucket_op(method, bucket, query, body)
            return self.object_op(method, bucket, key, query, body)
        except S3Error as exc:
            self.error(exc, path)

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)
            data = b"".join(parts)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else b""
            if len(data) != length:
                raise ValueError("short body")
        sha = self.headers.get("x-amz-content-sha256", "")
        if sha.startswith("STREAMING-") or "aws-chunked" in self.headers.get(
                "Content-Encoding", ""):
            data = self.decode_aws_chunked(data)
        return data

    def decode_aws_chunked(self, raw: bytes) -> bytes:
        out = []
        pos = 0
        while True:
            eol = raw.index(b"\r\n", pos)
            size = int(raw[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:
                for line in raw[pos:].split(b"\r\n"):
                    if b":" in line:
                        name, value = line.split(b":", 1)
                        self.trailers[name.decode().strip().lower()] = value.decode().strip()
                break
            out.append(raw[pos:pos + size])
            pos += size + 2
        return b"".join(out)

    def respond(self, status: int, headers: dict[str, str] | None = None,
                body: bytes | memoryview | list[memoryview] = b"",
                length: int | None = None) -> None:
        views = body if isinstance(body, list) else [memoryview(body)] if body else []
        size = sum(len(v) for v in views)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(size if length is None else length))
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16])
        send_body = size > 0 and self.command != "HEAD"
        self._headers_buffer.append(b"\r\n")
        if send_body and size <= 256 * 1024:
            self._headers_buffer.extend(bytes(v) for v in views)  # one write for all
            send_body = False
        self.flush_headers()
        if send_body:
            for view in views:
                self.wfile.write(view)

    def error(self, exc: S3Error, resource: str) -> None:
        if self.command == "HEAD" or exc.status == 304:
            self.respond(exc.status, length=0)
            return
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{exc.code}</Code>'
                f"<Message>{esc(exc.message)}</Message><Resource>{esc(resource)}</Resource>"
                f"<RequestId>s3lite</RequestId></Error>").encode()
        self.respond(exc.status, {"Content-Type": "application/xml"}, body)

    def xml(self, root: str, body: str, status: int = 200) -> None:
        self.respond(status, {"Content-Type": "application/xml"}, xml_doc(root, body))

    def meta_from_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.headers.items()
                if k.lower().startswith("x-amz-meta-")}

    def checksums_from_request(self) -> dict[str, str]:
        out = {}
        for alg in CHECKSUMS:
            value = self.trailers.get(f"x-amz-checksum-{alg}") or self.headers.get(
                f"x-amz-checksum-{alg}")
            if value:
                out[alg] = value
        return out

    # -- service and buckets -------------------------------------------------------------
    def list_buckets(self) -> None:
        with self.state.lock:
            items = "".join(f"<Bucket><Name>{esc(n)}</Name><CreationDate>{iso(b.created)}"
                            f"</CreationDate></Bucket>"
                            for n, b in sorted(self.state.buckets.items()))
        self.xml("ListAllMyBucketsResult",
                 f"<Owner><ID>s3lite</ID><DisplayName>s3lite</DisplayName></Owner>"
                 f"<Buckets>{items}</Buckets>")

    def bucket_op(self, method: str, name: str, query: dict[str, str], body: bytes) -> None:
        st = self.state
        if method == "PUT" and not query:
            with st.lock:
                st.buckets.setdefault(name, Bucket(time.time()))
            return self.respond(200, {"Location": f"/{name}"})
        if method == "HEAD":
            with st.lock:
                st.bucket(name)
            return self.respond(200, {"x-amz-bucket-region": "us-east-1"})
        if method == "DELETE" and not query:
            with st.lock:
                b = st.bucket(name)
                if b.objects:
                    raise S3Error(409, "BucketNotEmpty", "The bucket you tried to delete is "
                                  "not empty")
                del st.buckets[name]
            return self.respond(204)
        if method == "POST" and "delete" in query:
            return self.delete_objects(name, body)
        if method != "GET":
            raise S3Error(501, "NotImplemented", f"{method} on a bucket with {sorted(query)}")
        with st.lock:
            b = st.bucket(name)
        if "location" in query:
            return self.xml("LocationConstraint", "")
        if "versioning" in query:
            return self.xml("VersioningConfiguration", "")
        if "uploads" in query:
            return self.list_uploads(name, b)
        if "acl" in query:
            return self.xml("AccessControlPolicy",
                            "<Owner><ID>s3lite</ID></Owner><AccessControlList/>")
        for unsupported in ("policy", "cors", "lifecycle", "tagging", "website", "logging",
                            "notification", "replication", "encryption", "object-lock"):
            if unsupported in query:
                raise S3Error(404, "NoSuchConfiguration", f"no {unsupported} configuration")
        return self.list_objects(name, b, query)

    def list_objects(self, name: str, b: Bucket, q: dict[str, str]) -> None:
        v2 = q.get("list-type") == "2"
        prefix = q.get("prefix", "")
        delim = q.get("delimiter", "")
        max_keys = min(int(q.get("max-keys") or 1000), 1000)
        encode = q.get("encoding-type") == "url"
        if v2:
            token = q.get("continuation-token")
            after = (base64.urlsafe_b64decode(token.encode()).decode() if token
                     else q.get("start-after", ""))
        else:
            after = q.get("marker", "")

        def enc(text: str) -> str:
            return quote(text, safe="/~") if encode else esc(text)

        contents: list[str] = []
        prefixes: list[str] = []
        last = ""
        truncated = False
        with self.state.lock:
            keys = b.keys
            i = bisect.bisect_right(keys, after) if after else 0
            i = max(i, bisect.bisect_left(keys, prefix))
            last_cp = None
            while i < len(keys):
                k = keys[i]
                i += 1
                if not k.startswith(prefix):
                    break
                if delim:
                    d = k.find(delim, len(prefix))
                    if d >= 0:
                        cp = k[:d + len(delim)]
                        if cp == last_cp or (after and cp <= after):
                            continue
                        if len(contents) + len(prefixes) >= max_keys:
                            truncated = True
                            break
                        prefixes.append(cp)
                        last_cp = last = cp
                        continue
                if len(contents) + len(prefixes) >= max_keys:
                    truncated = True
                    break
                o = b.objects[k]
                contents.append(
                    f"<Contents><Key>{enc(k)}</Key><LastModified>{iso(o.mtime)}</LastModified>"
                    f"<ETag>&quot;{o.etag}&quot;</ETag><Size>{len(o.data)}</Size>"
                    f"<Owner><ID>s3lite</ID><DisplayName>s3lite</DisplayName></Owner>"
                    f"<StorageClass>STANDARD</StorageClass></Contents>")
                last = k
        parts = [f"<Name>{esc(name)}</Name><Prefix>{enc(prefix)}</Prefix>",
                 f"<MaxKeys>{max_keys}</MaxKeys>"]
        if delim:
            parts.append(f"<Delimiter>{enc(delim)}</Delimiter>")
        if encode:
            parts.append("<EncodingType>url</EncodingType>")
        parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
        if v2:
            parts.append(f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>")
            if q.get("continuation-token"):
                parts.append(f"<ContinuationToken>{esc(q['continuation-token'])}"
                             f"</ContinuationToken>")
            if q.get("start-after"):
                parts.append(f"<StartAfter>{enc(q['start-after'])}</StartAfter>")
            if truncated:
                token = base64.urlsafe_b64encode(last.encode()).decode()
                parts.append(f"<NextContinuationToken>{token}</NextContinuationToken>")
        else:
            parts.append(f"<Marker>{enc(after)}</Marker>")
            if truncated:
                parts.append(f"<NextMarker>{enc(last)}</NextMarker>")
        parts += contents
        parts += [f"<CommonPrefixes><Prefix>{enc(p)}</Prefix></CommonPrefixes>"
                  for p in prefixes]
        self.xml("ListBucketResult", "".join(parts))

    def list_uploads(self, name: str, b: Bucket) -> None:
        with self.state.lock:
            items = "".join(f"<Upload><Key>{esc(u.key)}</Key><UploadId>{uid}</UploadId>"
                            f"<Initiated>{iso(u.started)}</Initiated></Upload>"
                            for uid, u in b.uploads.items())
        self.xml("ListMultipartUploadsResult",
                 f"<Bucket>{esc(name)}</Bucket><IsTruncated>false</IsTruncated>{items}")

    def delete_objects(self, name: str, body: bytes) -> None:
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            raise S3Error(400, "MalformedXML", "bad Delete document") from None
        quiet = (child_text(root, "Quiet") or "").lower() == "true"
        keys = [child_text(o, "Key") or "" for o in children(root, "Object")]
        with self.state.lock:
            b = self.state.bucket(name)
            for k in keys:
                b.delete(k)
        done = "" if quiet else "".join(f"<Deleted><Key>{esc(k)}</Key></Deleted>" for k in keys)
        self.xml("DeleteResult", done)

    # -- objects -------------------------------------------------------------------------
    def object_op(self, method: str, name: str, key: str, q: dict[str, str],
                  body: bytes) -> None:
        if method in ("GET", "HEAD"):
            if "uploadId" in q:
                raise S3Error(501, "NotImplemented", "ListParts")
            return self.get_object(name, key, head=method == "HEAD")
        if method == "PUT":
            if "uploadId" in q:
                return self.upload_part(name, key, q, body)
            if self.headers.get("x-amz-copy-source"):
                return self.copy_object(name, key)
            if "tagging" in q or "acl" in q:
                return self.respond(200)
            return self.put_object(name, key, body)
        if method == "POST":
            if "uploads" in q:
                return self.create_upload(name, key)
            if "uploadId" in q:
                return self.complete_upload(name, key, q["uploadId"], body)
            raise S3Error(501, "NotImplemented", "POST on an object")
        if method == "DELETE":
            with self.state.lock:
                b = self.state.bucket(name)
                if "uploadId" in q:
                    if b.uploads.pop(q["uploadId"], None) is None:
                        raise S3Error(404, "NoSuchUpload", "The specified upload does not "
                                      "exist")
                else:
                    b.delete(key)
            return self.respond(204)
        raise S3Error(405, "MethodNotAllowed")

    def object_headers(self, o: Obj) -> dict[str, str]:
        h = {"ETag": f'"{o.etag}"', "Last-Modified": formatdate(o.mtime, usegmt=True),
             "Content-Type": o.ctype, "Accept-Ranges": "bytes"}
        h.update(o.meta)
        return h

    def check_conditions(self, o: Obj | None, for_write: bool) -> None:
        if_match = self.headers.get("If-Match")
        if_none = self.headers.get("If-None-Match")
        if if_match is not None:
            if o is None:
                raise S3Error(404, "NoSuchKey", "The specified key does not exist.")
            wanted = {strip_etag(e) for e in if_match.split(",")}
            if "*" not in wanted and o.etag not in wanted:
                raise S3Error(412, "PreconditionFailed", "At least one of the pre-conditions "
                              "you specified did not hold")
        if if_none is not None and o is not None:
            wanted = {strip_etag(e) for e in if_none.split(",")}
            if "*" in wanted or o.etag in wanted:
                if for_write:
                    raise S3Error(412, "PreconditionFailed", "At least one of the "
                                  "pre-conditions you specified did not hold")
                raise S3Error(304, "NotModified")

    def get_object(self, name: str, key: str, head: bool) -> None:
        with self.state.lock:
            o = self.state.bucket(name).objects.get(key)
        if o is None:
            raise S3Error(404, "NoSuchKey", "The specified key does not exist.")
        self.check_conditions(o, for_write=False)
        headers = self.object_headers(o)
        size = len(o.data)
        rng = self.headers.get("Range")
        start, end = 0, size - 1
        status = 200
        if rng and rng.startswith("bytes=") and "," not in rng:
            first, _, last = rng[6:].strip().partition("-")
            try:
                if first:
                    start = int(first)
                    end = min(int(last), size - 1) if last else size - 1
                    satisfiable = start < size
                    use = satisfiable and (not last or int(last) >= start)
                else:
                    tail_len = int(last)
                    start, end = max(0, size - tail_len), size - 1
                    satisfiable = tail_len > 0 and size > 0
                    use = satisfiable
            except ValueError:
                satisfiable, use = True, False  # unparsable: S3 ignores the header
            if not satisfiable:
                headers = {"Content-Range": f"bytes */{size}"}
                if head:
                    return self.respond(416, headers, length=0)
                exc = S3Error(416, "InvalidRange", "The requested range is not satisfiable")
                return self.error(exc, f"/{name}/{key}")
            if use:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            else:
                start, end = 0, size - 1
        if status == 200 and self.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED":
            for alg, value in o.checksums.items():
                headers[f"x-amz-checksum-{alg}"] = value
        if head:
            return self.respond(status, headers, length=end + 1 - start)
        self.respond(status, headers, o.data.views(start, end + 1))

    def new_obj(self, data: Body, etag: str | None = None,
                checksums: dict[str, str] | None = None) -> Obj:
        ctype = self.headers.get("Content-Type") or "binary/octet-stream"
        if etag is None:
            md5 = hashlib.md5()
            for chunk in data.chunks:
                md5.update(chunk)
            etag = md5.hexdigest()
        return Obj(data, etag, time.time(),
                   self.meta_from_headers(), ctype,
                   self.checksums_from_request() if checksums is None else checksums)

    def check_md5(self, data: bytes, etag: str) -> None:
        given = self.headers.get("Content-MD5")
        if given:
            try:
                ok = base64.b64decode(given) == binascii.unhexlify(etag)
            except (binascii.Error, ValueError):
                ok = False
            if not ok:
                raise S3Error(400, "BadDigest", "The Content-MD5 you specified did not match "
                              "what we received.")

    def put_object(self, name: str, key: str, body: bytes) -> None:
        obj = self.new_obj(Body([body]))
        self.check_md5(body, obj.etag)
        with self.state.lock:
            b = self.state.bucket(name)
            self.check_conditions(b.objects.get(key), for_write=True)
            b.put(key, obj)
        headers = {"ETag": f'"{obj.etag}"'}
        headers.update({f"x-amz-checksum-{a}": v for a, v in obj.checksums.items()})
        self.respond(200, headers)

    def copy_source(self) -> tuple[Obj, str]:
        source = unquote(self.headers["x-amz-copy-source"].split("?", 1)[0]).lstrip("/")
        sb, _, sk = source.partition("/")
        with self.state.lock:
            o = self.state.bucket(sb).objects.get(sk)
        if o is None:
            raise S3Error(404, "NoSuchKey", "The specified key does not exist.")
        return o, source

    def copy_object(self, name: str, key: str) -> None:
        src, _ = self.copy_source()
        if self.headers.get("x-amz-metadata-directive", "COPY").upper() == "REPLACE":
            obj = self.new_obj(src.data, src.etag, dict(src.checksums))
        else:
            obj = Obj(src.data, src.etag, time.time(), dict(src.meta), src.ctype,
                      dict(src.checksums))
        with self.state.lock:
            b = self.state.bucket(name)
            self.check_conditions(b.objects.get(key), for_write=True)
            b.put(key, obj)
        self.xml("CopyObjectResult", f"<LastModified>{iso(obj.mtime)}</LastModified>"
                                     f"<ETag>&quot;{obj.etag}&quot;</ETag>")

    def create_upload(self, name: str, key: str) -> None:
        uid = uuid.uuid4().hex
        upload = Upload(key, self.meta_from_headers(),
                        self.headers.get("Content-Type") or "binary/octet-stream",
                        (self.headers.get("x-amz-checksum-algorithm") or "").lower())
        with self.state.lock:
            self.state.bucket(name).uploads[uid] = upload
        self.xml("InitiateMultipartUploadResult",
                 f"<Bucket>{esc(name)}</Bucket><Key>{esc(key)}</Key><UploadId>{uid}</UploadId>")

    def _upload(self, name: str, uid: str) -> Upload:
        with self.state.lock:
            upload = self.state.bucket(name).uploads.get(uid)
        if upload is None:
            raise S3Error(404, "NoSuchUpload", "The specified upload does not exist")
        return upload

    def upload_part(self, name: str, key: str, q: dict[str, str], body: bytes) -> None:
        upload = self._upload(name, q["uploadId"])
        number = int(q.get("partNumber") or 0)
        if not 1 <= number <= 10000:
            raise S3Error(400, "InvalidArgument", "bad partNumber")
        if self.headers.get("x-amz-copy-source"):
            src, _ = self.copy_source()
            rng = self.headers.get("x-amz-copy-source-range", "")
            if rng.startswith("bytes="):
                first, _, last = rng[6:].partition("-")
                body = src.data.read(int(first), int(last) + 1)
            else:
                body = src.data.read()
        etag = hashlib.md5(body).hexdigest()
        self.check_md5(body, etag)
        checksum = None
        if upload.algorithm:
            checksum = self.checksums_from_request().get(upload.algorithm)
        with self.state.lock:
            upload.parts[number] = (body, etag, checksum)
        if self.headers.get("x-amz-copy-source"):
            return self.xml("CopyPartResult", f"<LastModified>{iso(time.time())}"
                                              f"</LastModified><ETag>&quot;{etag}&quot;</ETag>")
        headers = {"ETag": f'"{etag}"'}
        if checksum:
            headers[f"x-amz-checksum-{upload.algorithm}"] = checksum
        self.respond(200, headers)

    def complete_upload(self, name: str, key: str, uid: str, body: bytes) -> None:
        upload = self._upload(name, uid)
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            raise S3Error(400, "MalformedXML", "bad CompleteMultipartUpload") from None
        wanted = [(int(child_text(p, "PartNumber") or 0), strip_etag(child_text(p, "ETag")
                                                                       or ""))
                  for p in children(root, "Part")]
        if not wanted:
            raise S3Error(400, "MalformedXML", "no parts")
        chunks, digests, sums = [], [], []
        for number, etag in wanted:
            part = upload.parts.get(number)
            if part is None or part[1] != etag:
                raise S3Error(400, "InvalidPart", f"part {number} was not uploaded")
            chunks.append(part[0])
            digests.append(binascii.unhexlify(part[1]))
            sums.append(part[2])
        data = Body(chunks)
        etag = f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(wanted)}"
        checksums = {}
        if upload.algorithm in ("sha256", "sha1", "crc32", "crc32c") and all(sums):
            raw = b"".join(base64.b64decode(s) for s in sums if s)
            combined = hashlib.new(upload.algorithm, raw).digest() if upload.algorithm in (
                "sha256", "sha1") else None
            if combined is not None:
                checksums[upload.algorithm] = (base64.b64encode(combined).decode()
                                               + f"-{len(wanted)}")
        obj = Obj(data, etag, time.time(), upload.meta, upload.ctype, checksums)
        with self.state.lock:
            b = self.state.bucket(name)
            self.check_conditions(b.objects.get(key), for_write=True)
            b.put(key, obj)
            b.uploads.pop(uid, None)
        self.xml("CompleteMultipartUploadResult",
                 f"<Location>/{esc(name)}/{esc(key)}</Location><Bucket>{esc(name)}</Bucket>"
                 f"<Key>{esc(key)}</Key><ETag>&quot;{etag}&quot;</ETag>")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def keep_heap(warm_mib: int) -> None:
    """Serve every buffer from one heap that is never given back to the kernel, and touch
    `warm_mib` of it now: a page the kernel must fault in and zero costs more here than
    receiving the bytes into it (glibc only; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, 1)  # one arena: what one request thread frees, the next re-uses
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum; parts are at most 32 MiB here
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    chunk = 8 << 20
    warm = [bytearray(chunk) for _ in range(warm_mib * (1 << 20) // chunk)]
    for buf in warm:  # bytearray(n) may come from calloc'd pages never touched
        buf[::4096] = b"\1" * len(range(0, chunk, 4096))
    del warm


def serve(port: int, host: str = "127.0.0.1") -> None:
    handler = type("BoundHandler", (Handler,), {"state": State()})
    with Server((host, port), handler) as httpd:
        httpd.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="in-memory S3-compatible server for benchmarks")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (keep it loopback)")
    p.add_argument("--warm-mib", type=int, default=0, metavar="MIB",
                   help="touch this much heap at start, kept for the objects to come "
                        "(default 0)")
    args = p.parse_args(argv)
    keep_heap(max(args.warm_mib, 0))
    try:
        serve(args.port, args.host)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"s3lite: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
