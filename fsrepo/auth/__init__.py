"""Logging in with an OpenID Connect provider (RFC 8628 device flow) and keeping the AWS
credentials that come from it (STS AssumeRoleWithWebIdentity) fresh while a mount runs.

Entry points for the CLI and the mount:

    run_login(settings, *, no_browser, out=sys.stdout) -> int
    run_logout(settings, *, out=sys.stdout) -> int
    run_status(settings) -> dict          format_status(dict) -> str
    aws_environment(settings) -> dict[str, str]
    TokenRefresher(settings)              await .run() in the mount's nursery; .state()
    TokenRedactingFilter                  a logging.Filter for the mount's log handlers
"""

from .commands import aws_environment, format_status, run_login, run_logout, run_status
from .oidc import PollTiming
from .redact import TokenRedactingFilter
from .refresher import RefresherState, TokenRefresher
from .store import TokenStore

__all__ = [
    "PollTiming",
    "RefresherState",
    "TokenRedactingFilter",
    "TokenRefresher",
    "TokenStore",
    "aws_environment",
    "format_status",
    "run_login",
    "run_logout",
    "run_status",
]
