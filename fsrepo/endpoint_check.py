"""Whether an endpoint that answered "not found" speaks S3 at all: a plain web server (a
wrong port, a proxy's landing page) answers every request with 404 and HTML, and "the
repository does not exist" would then send the user looking in the wrong place.

One unsigned GET of the bucket's listing: any S3 server answers it with XML (the listing,
or an error such as AccessDenied) or at least its own headers; anything else is not S3."""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import quote

TIMEOUT = 5.0
S3_HEADERS = ("x-amz-request-id", "x-amz-id-2", "x-minio-error-code")


def not_s3_reason(endpoint: str, bucket: str) -> str | None:
    """Why the endpoint is not an S3 server ("answers 404 with text/html"), or None when it
    looks like one (or cannot be asked: then the original error stands)."""
    url = f"{endpoint.rstrip('/')}/{quote(bucket)}?list-type=2&max-keys=1"
    request = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:  # noqa: S310
            status, headers, body = resp.status, resp.headers, resp.read(4096)
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, exc.headers, exc.read(4096)
    except (OSError, ValueError):
        return None
    if any(h in headers for h in S3_HEADERS):
        return None
    text = body.lstrip()
    if text.startswith(b"<?xml") or text.startswith(b"<ListBucketResult") \
            or text.startswith(b"<Error"):
        return None
    kind = (headers.get("Content-Type") or "no content type").split(";")[0]
    server = headers.get("Server")
    return (f"it answers HTTP {status} with {kind}" + (f" (server: {server})" if server else "")
            + ", not an S3 response")
