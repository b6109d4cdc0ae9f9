"""A logging filter that removes tokens from log records.

imgrepo's own code never logs a token. This is a second line of defence for other libraries'
debug output: botocore at DEBUG level logs request bodies (the WebIdentityToken sent to STS)
and response bodies (the temporary credentials). Add it to the mount's log handlers:

    handler.addFilter(TokenRedactingFilter())
"""

from __future__ import annotations

import logging
import re

_PATTERNS = [
    # JWTs (ID tokens, JWT access tokens): three base64url parts, the first starting {"
    re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"),
    # name=value / "name": "value" / <Name>value</Name> for the secret fields we know of
    re.compile(
        r"(?i)((?:refresh_token|access_token|id_token|device_code|WebIdentityToken|"
        r"SecretAccessKey|SessionToken|aws_secret_access_key|aws_session_token|"
        r"X-Amz-Security-Token)"
        r"""(?:['"]?\s*[:=]\s*['"]?|>))([^'"&<\s,}]{8,})"""
    ),
]


def redact(text: str) -> str:
    text = _PATTERNS[0].sub("[REDACTED]", text)
    return _PATTERNS[1].sub(lambda m: m.group(1) + "[REDACTED]", text)


class TokenRedactingFilter(logging.Filter):
    """Rewrites each record's message with tokens replaced by [REDACTED]. Attach it to
    handlers (a filter on a logger does not see records of its child loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave the record to the handler
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True
