"""The lines `--status` prints for a mount's status reply (and the login part)."""

from __future__ import annotations

import time
from typing import Any

from ..units import human


def format_status(s: dict[str, Any]) -> str:
    lines = []
    if "mountpoint" in s:
        lines.append(f"mount:        {s['mountpoint']} (pid {s['pid']})")
        if s.get("online") is False:
            since = time.strftime("%H:%M:%S", time.localtime(s.get("offline_since") or 0))
            lines.append(f"storage:      {s['storage']} - UNREACHABLE since {since}, working "
                         "offline (changes are queued)")
        elif s.get("online_again_at"):
            back = time.strftime("%H:%M:%S", time.localtime(s["online_again_at"]))
            lines.append(f"storage:      {s['storage']} (reachable again since {back})")
        else:
            lines.append(f"storage:      {s['storage']} (reachable)")
        if s.get("write_mode"):
            lines.append(f"writes:       {s['write_mode']}")
        lines.append(f"pending:      {s['pending_files']} files ({human(s['pending_bytes'])}) "
                     f"to upload, {s['pending_ops']} changes to commit")
        lines.append(f"in flight:    {s['uploads_in_flight']} uploads, "
                     f"{s.get('downloads_in_flight', 0)} downloads"
                     + (", a --sync is running" if s.get("syncs_running") else ""))
        lines.append(f"uploaded:     {s['uploaded_files']} files ({human(s['uploaded_bytes'])})"
                     " since mounted")
        if s.get("last_error"):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_error_at"]))
            lines.append(f"last error:   {when}: {s['last_error']}")
        if s.get("login_required"):
            lines.append("login:        credentials rejected - run imgrepo-mount --login")
        lines.append(f"cache:        {human(s['cache_used'])} of {human(s['cache_limit'])}")
        lines.append(f"dedup saved:  {human(s['dedup_saved_bytes'])}")
        if "repository_files" in s:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["repository_counted_at"]))
            lines.append(f"repository:   {s['repository_files']} files, "
                         f"{human(s['repository_bytes'])} ({human(s['repository_unique_bytes'])}"
                         f" stored) as counted by the last full --sync, {when}")
        else:
            lines.append("repository:   not counted yet (a full --sync counts it)")
    login = s.get("login")
    if login and (login.get("logged_in") or not lines or s.get("storage", "").startswith("s3://")):
        from ..auth.status import format_status as login_lines
        lines.append(login_lines(login))
    if not lines:
        lines.append("nothing to report: give a mountpoint, or log in with --login")
    return "\n".join(lines)
