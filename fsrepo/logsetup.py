"""Logging to the mount's log file (and stderr in the foreground); secrets never logged."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path

_SECRET_RE = re.compile(
    r"(?i)(aws_secret_access_key|aws_session_token|x-amz-security-token|authorization|"
    r"refresh_token|access_token|id_token|client_secret|password)(['\"]?\s*[:=]\s*['\"]?)"
    r"([^\s'\",}]+)")


class RedactingFilter(logging.Filter):
    """Belt and braces: whatever reaches a log line, known secret fields are masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _SECRET_RE.search(message):
            record.msg = _SECRET_RE.sub(lambda m: m.group(1) + m.group(2) + "***", message)
            record.args = ()
        return True


class OneLineFilter(logging.Filter):
    """botocore logs a failed credential refresh (an expired or revoked login) with its
    traceback: keep the log to one clear line, the exception's message appended."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {record.exc_info[1]}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


class JournalFormatter(logging.Formatter):
    """For a stderr that is systemd's journal: the journal stamps the time itself, and a
    `<N>` prefix gives each line its syslog priority (journalctl -p warning ...)."""

    PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
                  logging.INFO: 6, logging.DEBUG: 7}

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>" + super().format(record).replace("\n", "\n" + f"<{priority}>")


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=device:inode of the stream it connected to stderr."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose every file is created 0600 (the first and each one after a
    rotation): it names the user's files and folders."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def setup_logging(log_file: Path | None, verbose: bool, stderr: bool) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .auth.redact import TokenRedactingFilter
    token_filter = TokenRedactingFilter()
    redact = RedactingFilter()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = PrivateRotatingFileHandler(log_file, maxBytes=10 << 20, backupCount=3)
        handler.setFormatter(fmt)
        handler.addFilter(redact)
        handler.addFilter(token_filter)
        root.addHandler(handler)
        try:
            log_file.chmod(0o600)
        except OSError:
            pass
    if stderr:
        handler = logging.StreamHandler()
        handler.setFormatter(JournalFormatter() if stderr_is_journal() else fmt)
        handler.addFilter(redact)
        handler.addFilter(token_filter)
        root.addHandler(handler)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    credentials = logging.getLogger("botocore.credentials")
    if not any(isinstance(f, OneLineFilter) for f in credentials.filters):
        credentials.addFilter(OneLineFilter())
    logging.getLogger("pyfuse3").setLevel(logging.WARNING if not verbose else logging.INFO)
