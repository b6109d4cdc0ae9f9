"""The endpoint rule: https, or plain http to this machine only, whatever set the endpoint.

An endpoint can come from `--endpoint-url`, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, or
an `endpoint_url` in the AWS config file (a profile's own, or its `services` section): boto3
reads the last three by itself, so the store asks botocore which one applies
(`configured_endpoint`) and holds it to the same rule as a flag (`check_endpoint`).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError


def check_endpoint(endpoint_url: str | None, source: str = "the endpoint") -> None:
    """https (certificates verified, as botocore does by default), or plain http to this
    machine only: anywhere else the requests, signed headers and session tokens included,
    would cross the network unencrypted. IMGREPO_ALLOW_HTTP=1 allows it on a trusted network.
    `source` names where the endpoint was set, for the error."""
    if not endpoint_url:
        return
    split = urlsplit(endpoint_url.strip())
    if split.scheme not in ("http", "https") or not split.hostname:
        raise ConfigError(f"{source} must be an https:// URL, not {endpoint_url!r}")
    if split.scheme == "https":
        return
    host = split.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and os.environ.get("IMGREPO_ALLOW_HTTP") != "1":
        raise ConfigError(
            f"refusing plain http to {host} ({source}): requests and their credentials would "
            "cross the network unencrypted; use an https:// endpoint (or set "
            "IMGREPO_ALLOW_HTTP=1 if the network is trusted)")


def configured_endpoint(session: Any) -> str | None:
    """The endpoint boto3 would use for S3 when none is passed to it: the environment's or
    the AWS config file's (unless `ignore_configured_endpoint_urls` is set), None for AWS's
    own. Asked of botocore itself, so that what is checked is what will be used."""
    from botocore.configprovider import ConfiguredEndpointProvider

    core = session._session
    if core.get_config_variable("ignore_configured_endpoint_urls"):
        return None
    found = ConfiguredEndpointProvider(full_config=core.full_config,
                                       scoped_config=core.get_scoped_config(),
                                       client_name="s3").provide()
    return str(found) if found else None
