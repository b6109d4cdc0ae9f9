"""The lines `--status` prints for a mount's status reply (and the login part)."""

from __future__ import annotations

import time
from typing import Any

from ..units import human, plural


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
        lines.append(f"pending:      {plural(s['pending_files'], 'file')} "
                     f"({human(s['pending_bytes'])}) to upload, "
                     f"{plural(s['pending_ops'], 'change')} to commit")
        lines.append(f"in flight:    {s['uploads_in_flight']} uploads, "
                     f"{s.get('downloads_in_flight', 0)} downloads"
                     + (", a --sync is running" if s.get("syncs_running") else ""))
        lines.append(f"uploaded:     {s['uploaded_files']} files ({human(s['uploaded_bytes'])})"
                     " since mounted")
        if s.get("read_ahead_files"):  # what the guesses cost: a GET each, opened or not
            lines.append(f"read ahead:   {plural(s['read_ahead_files'], 'file')} "
                         f"({human(s['read_ahead_bytes'])}) fetched ahead of readers "
                         "since mounted")
        lines.extend(conflict_lines(s))
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
                         f" stored) as counted by the last full --sync, {when}"
                         + (f"; {human(s['repository_local_only_bytes'])} of it was still only "
                            "on this machine" if s.get("repository_local_only_bytes") else ""))
        else:
            lines.append("repository:   not counted yet (a full --sync counts it)")
    if "pending" in s:
        lines.extend(pending_lines(s["pending"]))
    login = s.get("login")
    if login and (login.get("logged_in") or (not lines and not s.get("mounts")) or s.get("storage", "").startswith("s3://")):
        from ..auth.status import format_status as login_lines
        lines.append(login_lines(login))
    if not lines and "mounts" not in s:
        lines.append("nothing to report: give a mountpoint, or log in with --login")
    return "\n".join(lines)


def conflict_lines(s: dict[str, Any]) -> list[str]:
    """This session's conflict copies by path, and what to do about them."""
    copies = s.get("conflict_copies") or []
    if not s.get("conflicts") and not copies:
        return []
    lines = [f"conflicts:    {s.get('conflicts', len(copies))} since mounted: another machine "
             "changed the same file; both versions are kept"]
    for c in copies:
        lines.append(f"  {c['path']}  ->  this machine's version: {c['copy']}")
    lines.append("  to resolve: compare the two, keep the one you want under the name (mv), "
                 "delete the other (rm)")
    return lines


def pending_lines(p: dict[str, Any]) -> list[str]:
    """`--pending`: the files not in the bucket yet, largest first."""
    if not p["total_files"]:
        return ["not uploaded: nothing, every file is in the bucket"]
    lines = [f"not uploaded: {plural(p['total_files'], 'file')} ({human(p['total_bytes'])}):"]
    lines.extend(f"  {human(f['size']):>10}  {f['path']}" for f in p["files"])
    if not p["listed_all"]:
        lines.append(f"  ... and {p['total_files'] - len(p['files'])} more (see --json)")
    return lines


def format_mounts(mounts: list[dict[str, Any]]) -> str:
    """`--status` without a mountpoint: every imgrepo mount, one line each."""
    if not mounts:
        return "no imgrepo mounts on this machine"
    lines = [f"{plural(len(mounts), 'imgrepo mount')}:"]
    for m in mounts:
        if not m.get("answering"):
            lines.append(f"  {m['mountpoint']}: NOT ANSWERING (its process is gone); clean up "
                         f"with: imgrepo-mount --unmount {m['mountpoint']} (what it had not "
                         "uploaded is kept and goes at the next mount)")
            continue
        state = "online" if m.get("online", True) else "OFFLINE (changes are queued)"
        lines.append(f"  {m['mountpoint']}: {m.get('storage')}, {state}, pending "
                     f"{plural(m.get('pending_files', 0), 'file')} "
                     f"({human(m.get('pending_bytes', 0))})")
    return "\n".join(lines)
