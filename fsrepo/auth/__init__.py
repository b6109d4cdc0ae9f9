"""Logging in with an OpenID Connect provider (RFC 8628 device flow) and keeping the AWS
credentials that come from it (STS AssumeRoleWithWebIdentity) fresh while a mount runs.

Entry points for the CLI and the mount:

    run_login(settings, *, no_browser, out=sys.stdout) -> int
    run_logout(settings, *, out=sys.stdout) -> int
    run_status(settings) -> dict          format_status(dict) -> str
    aws_environment(settings) -> dict[str, str]
    apply_login_environment(settings)     the same, put into os.environ (S3 storage only)
    TokenRefresher()                      await .run() in the mount's nursery; .state()
    TokenRedactingFilter                  a logging.Filter for the mount's log handlers

Names are imported on first use (PEP 562): `imgrepo-mount --status` reads the token store
through `.status` and should not pay for loading an HTTP client and trio to do it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "PollTiming": ".oidc",
    "RefresherState": ".refresher",
    "TokenRedactingFilter": ".redact",
    "TokenRefresher": ".refresher",
    "TokenStore": ".store",
    "apply_login_environment": ".commands",
    "aws_environment": ".commands",
    "format_status": ".status",
    "run_login": ".commands",
    "run_logout": ".commands",
    "run_status": ".status",
}

if TYPE_CHECKING:
    from .commands import apply_login_environment, aws_environment, run_login, run_logout
    from .oidc import PollTiming
    from .redact import TokenRedactingFilter
    from .refresher import RefresherState, TokenRefresher
    from .status import format_status, run_status
    from .store import TokenStore


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "PollTiming",
    "RefresherState",
    "TokenRedactingFilter",
    "TokenRefresher",
    "TokenStore",
    "apply_login_environment",
    "aws_environment",
    "format_status",
    "run_login",
    "run_logout",
    "run_status",
]
