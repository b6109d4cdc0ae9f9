"""The boto3 client an `S3Store` makes its requests with, configured once.

One client is shared by all worker threads (clients are thread-safe, sessions are not); its
connection pool is larger than the store's concurrency limit so urllib3 never throws
connections away. botocore's own retries are the store layer's REQUEST policy. The endpoint
is settled before the client is made, whatever set it (a flag, the environment, the AWS
config file): it must pass the endpoint rule, and the S3-compatible settings follow it.
"""

from __future__ import annotations

from typing import Any

import boto3
import botocore.exceptions as bx
from botocore.config import Config

from ..errors import ConfigError
from ..retry import Backoff
from .endpoint import check_endpoint, configured_endpoint
from .s3errors import THROTTLE_CODES, note_retry


def plain_http(endpoint_url: str | None) -> bool:
    return bool(endpoint_url) and endpoint_url.lower().startswith("http://")  # type: ignore[union-attr]


def new_client(session: boto3.session.Session, url: str, endpoint_url: str | None,
               region: str | None, *, policy: Backoff, max_concurrency: int,
               connect_timeout: float, read_timeout: float) -> Any:
    """An S3 client for `url` (named in the error if the settings cannot work)."""
    source = "the endpoint"
    if not endpoint_url:
        try:
            endpoint_url = configured_endpoint(session)
        except (ValueError, bx.BotoCoreError) as exc:
            raise ConfigError(f"cannot read the AWS configuration for {url}: {exc}") from exc
        source = "the endpoint_url of the AWS configuration (AWS_ENDPOINT_URL*, ~/.aws/config)"
    check_endpoint(endpoint_url, source)
    config = Config(
        max_pool_connections=max_concurrency + 4,
        retries={"mode": "adaptive", "total_max_attempts": policy.attempts or 1},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # Custom endpoints (MinIO, moto, ...) rarely have wildcard DNS for virtual hosts,
        # and several S3-compatible servers reject botocore's default CRC32 checksums and
        # aws-chunked trailers: there, send only the checksums we add ourselves (SHA-256
        # of blobs and parts), which every server that supports checksums accepts.
        s3={"addressing_style": "path" if endpoint_url else "auto",
            # Over https botocore already sends bodies that carry our SHA-256 checksum
            # unsigned (S3 verifies the checksum); over plain http (loopback only) it
            # would hash every body once more just for the signature.
            "payload_signing_enabled": False if plain_http(endpoint_url) else None},
        request_checksum_calculation="when_required" if endpoint_url else "when_supported",
        response_checksum_validation="when_required" if endpoint_url else "when_supported",
    )
    try:
        client = session.client("s3", endpoint_url=endpoint_url, region_name=region,
                                config=config)
    except (ValueError, bx.BotoCoreError) as exc:
        raise ConfigError(f"cannot set up S3 access for {url}: {exc}") from exc
    check_endpoint(client.meta.endpoint_url, "the endpoint boto3 chose")  # belt and braces
    client.meta.events.register("needs-retry.s3", _log_retry)
    return client


def _log_retry(response: Any = None, operation: Any = None, attempts: int = 0,
               caught_exception: Exception | None = None, request_dict: Any = None,
               **_: Any) -> None:
    """botocore's needs-retry hook: say in the log what went wrong before botocore retries it
    (silently otherwise), so that an error storm that was ridden out still leaves a trace.
    Returns None: the retry decision stays botocore's."""
    what = ""
    if caught_exception is not None:
        what = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None:
        status = getattr(response[0], "status_code", 0)
        code = str(((response[1] or {}).get("Error") or {}).get("Code") or "")
        if status >= 500 or status == 429 or code in THROTTLE_CODES:
            what = f"{status} {code}".strip()
    if what:
        note_retry(getattr(operation, "name", "?"), str((request_dict or {}).get("url", "")),
                   attempts, what)
