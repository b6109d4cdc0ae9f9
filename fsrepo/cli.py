"""imgrepo-mount: mount, unmount, sync, status, login and maintenance commands.

Expected failures print one line (`imgrepo-mount: error: ...`) and exit non-zero; only a
bug prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .config import Settings, load_settings
from .errors import ImgrepoError
from .units import human

PROG = "imgrepo-mount"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Mount a deduplicated file repository kept in S3 (or a local folder) "
                    "as an ordinary folder.",
        epilog="With no configuration, the repository is a local folder under "
               "~/.local/share/imgrepo/repository. The mount's log is "
               "<cache-dir>/repos/<id>/imgrepo.log (see --status for the exact path). "
               "Settings may also live in ~/.config/imgrepo/config.toml.")
    p.add_argument("mountpoint", nargs="?", help="the folder to mount on (or act on)")
    p.add_argument("paths", nargs="*", help="with --sync: only these paths in the mount")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--unmount", "-u", action="store_true",
                     help="wait until every closed file is in the bucket, then unmount")
    act.add_argument("--sync", action="store_true",
                     help="prefetch every file (or PATHS) into the local cache")
    act.add_argument("--status", "--whoami", dest="status", action="store_true",
                     help="what the mount is doing; login state")
    act.add_argument("--login", action="store_true", help="log in (OAuth 2.0 device flow)")
    act.add_argument("--logout", action="store_true", help="revoke and forget the login")
    act.add_argument("--verify", action="store_true",
                     help="check every manifest and that every referenced blob exists")
    act.add_argument("--gc", action="store_true",
                     help="delete blobs that no directory references any more")
    act.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--storage", help="s3://bucket/prefix or file:///path (env IMGREPO_STORAGE)")
    p.add_argument("--endpoint-url", help="S3 endpoint (MinIO, R2, ...; env AWS_ENDPOINT_URL)")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--cache-dir", help="local cache root (env IMGREPO_CACHE_DIR; default "
                                       "~/.cache/imgrepo)")
    p.add_argument("--cache-size", help="cache limit, e.g. 20G (default 10G)")
    p.add_argument("--refresh", type=float,
                   help="seconds until other machines' changes show (default 10)")
    p.add_argument("--uploads", type=int, help="uploads in flight (default 8)")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    p.add_argument("--log-file", help="log here as well")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--json", action="store_true", help="with --status/--verify: JSON output")
    p.add_argument("--wait", action="store_true",
                   help="with --status: block until nothing is pending")
    p.add_argument("--data", action="store_true", help="with --verify: also hash every blob")
    p.add_argument("--dry-run", action="store_true", help="with --gc: only report")
    p.add_argument("--grace", type=float, default=24.0,
                   help="with --gc: keep unreferenced blobs younger than this many hours")
    p.add_argument("--issuer", help="with --login: OpenID Connect issuer URL")
    p.add_argument("--client-id", help="with --login: OAuth client id")
    p.add_argument("--role-arn", help="with --login: IAM role to assume with the ID token")
    p.add_argument("--scope", help="with --login: scopes (default 'openid offline_access')")
    p.add_argument("--no-browser", action="store_true", help="with --login: only print the URL")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings({
        "storage": args.storage,
        "endpoint_url": args.endpoint_url,
        "region": args.region,
        "cache_root": args.cache_dir,
        "cache_size": args.cache_size,
        "refresh": args.refresh,
        "uploads": args.uploads,
        "issuer": args.issuer,
        "client_id": args.client_id,
        "role_arn": args.role_arn,
        "scope": args.scope,
    })


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args, argv)
    except ImgrepoError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `imgrepo-mount --status MNT | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    settings = settings_from(args)
    if args.login or args.logout:
        from .auth import commands
        if args.login:
            return commands.run_login(settings, no_browser=args.no_browser)
        return commands.run_logout(settings)
    if args.status:
        return cmd_status(settings, args)
    if args.verify or args.gc:
        from . import maintenance
        if args.verify:
            return maintenance.run_verify(settings, data=args.data, as_json=args.json)
        return maintenance.run_gc(settings, dry_run=args.dry_run, grace_hours=args.grace)
    if not args.mountpoint:
        raise ImgrepoError("a mountpoint is needed (see --help)")
    mountpoint = Path(args.mountpoint).expanduser().absolute()
    if args.unmount:
        return cmd_unmount(mountpoint)
    if args.sync:
        return cmd_sync(mountpoint, args.paths)
    if args.paths:
        raise ImgrepoError(f"unexpected arguments: {' '.join(args.paths)}")
    return cmd_mount(settings, mountpoint, args, argv)


# -- mount ------------------------------------------------------------------------------
def cmd_mount(settings: Settings, mountpoint: Path, args: argparse.Namespace,
              argv: list[str]) -> int:
    from .mount import check_mountpoint
    check_mountpoint(mountpoint)
    if args.foreground or args.ready_fd is not None:
        return run_foreground(settings, mountpoint, args)
    # Start the mount as a detached process and wait until it says it is ready.
    read_fd, write_fd = os.pipe()
    child_argv = [sys.executable, "-m", "fsrepo.cli", *argv, "--ready-fd", str(write_fd)]
    log_path = settings.state_dir() / "imgrepo.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as errlog:
        proc = subprocess.Popen(child_argv, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errlog,
                                start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        line = ready.readline().decode(errors="replace").strip()
    if line == "ok":
        print(f"mounted {settings.storage} at {mountpoint} (log: {log_path})")
        return 0
    proc.wait(timeout=30)
    if line.startswith("error: "):
        raise ImgrepoError(line[len("error: "):])
    raise ImgrepoError(f"the mount process exited (code {proc.returncode}); see {log_path}")


def run_foreground(settings: Settings, mountpoint: Path, args: argparse.Namespace) -> int:
    import logging

    import trio

    from .engine import StateLock
    from .logsetup import setup_logging
    from .mount import run_mount

    log_path = settings.state_dir() / "imgrepo.log"
    setup_logging(log_path, args.verbose, stderr=args.ready_fd is None)
    if args.log_file:
        from logging import FileHandler
        extra = FileHandler(args.log_file)
        extra.setFormatter(logging.getLogger().handlers[0].formatter)
        extra.addFilter(logging.getLogger().handlers[0].filters[0])
        logging.getLogger().addHandler(extra)
    ready_fd = args.ready_fd

    def say(text: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, (text + "\n").encode())
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = None

    try:
        lock = StateLock(settings.state_dir())
        try:
            apply_login_environment(settings)
            trio.run(run_mount, settings, mountpoint, lambda: say("ok"))
        finally:
            lock.release()
    except ImgrepoError as exc:
        # Into the log file only: main() prints it on stderr, as the one line users see.
        record = logging.getLogger("fsrepo").makeRecord(
            "fsrepo", logging.ERROR, __file__, 0, "%s", (exc,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        say("error: " + str(exc))
        raise
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            logging.getLogger("fsrepo").exception("the mount failed")
        say(f"error: the mount failed unexpectedly ({type(exc).__name__}); see {log_path}")
        raise
    return 0


def apply_login_environment(settings: Settings) -> None:
    """With a device-flow login, let botocore assume the role with our ID token file."""
    if not settings.storage.startswith("s3://"):
        return
    try:
        from .auth import commands
    except ImportError:
        return
    os.environ.update(commands.aws_environment(settings))


# -- unmount ------------------------------------------------------------------------------
def cmd_unmount(mountpoint: Path) -> int:
    from . import control
    pid = None
    if control.is_running(mountpoint):
        final = follow(mountpoint, {"cmd": "wait"}, "uploading", give_up_offline=10.0)
        pid = final.get("pid")
        if final.get("gave_up"):
            p = final["progress"]
            print(f"the storage is unreachable: {p['blobs']} files ({human(p['bytes'])}) and "
                  f"{p['ops']} changes stay queued locally and upload at the next mount",
                  file=sys.stderr)
            pid = _status_pid(mountpoint)
    elif not os.path.ismount(mountpoint):
        raise ImgrepoError(f"{mountpoint} is not mounted")
    unmount_kernel(mountpoint)
    if pid:
        deadline = time.time() + 60
        while time.time() < deadline and _alive(pid):
            time.sleep(0.05)
    print(f"unmounted {mountpoint}")
    return 0


def unmount_kernel(mountpoint: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 and os.path.ismount(mountpoint):
        msg = (result.stderr or result.stdout).strip().splitlines()
        raise ImgrepoError(f"cannot unmount {mountpoint}: {msg[-1] if msg else 'busy'}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


# -- progress ------------------------------------------------------------------------------
def _status_pid(mountpoint: Path) -> int | None:
    from . import control
    try:
        for reply in control.request(mountpoint, {"cmd": "ping"}, timeout=10):
            if reply.get("done"):
                return reply.get("pid")
    except (ImgrepoError, OSError, ValueError):
        pass
    return None


def follow(mountpoint: Path, cmd: dict[str, Any], label: str,
           give_up_offline: float | None = None) -> dict[str, Any]:
    """Send a request; render its progress (a bar on a terminal, lines otherwise).
    With `give_up_offline`, stop once the storage has been unreachable that long and
    return the last progress with "gave_up"."""
    from . import control
    tty = sys.stderr.isatty()
    last_line = 0.0
    shown = False
    final: dict[str, Any] = {}
    offline_since: float | None = None
    for reply in control.request(mountpoint, cmd):
        if reply.get("done"):
            final = reply
            break
        if give_up_offline is not None and "progress" in reply:
            if reply.get("online") is False:
                offline_since = offline_since or time.monotonic()
                if time.monotonic() - offline_since >= give_up_offline:
                    final = {**reply, "gave_up": True}
                    break
            else:
                offline_since = None
        text = progress_text(label, reply)
        if not text:
            continue
        now = time.monotonic()
        if tty:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
            shown = True
        elif now - last_line >= 2:
            print(text, file=sys.stderr, flush=True)
            last_line = now
    if shown:
        sys.stderr.write("\r\033[K")
    if final.get("error"):
        raise ImgrepoError(final["error"])
    return final


def progress_text(label: str, reply: dict[str, Any]) -> str:
    if "progress" in reply:
        p = reply["progress"]
        text = f"{label}: {p['blobs']} files ({human(p['bytes'])}) and {p['ops']} changes pending"
        if reply.get("online") is False:
            text += " - the storage is unreachable; waiting for it"
        elif reply.get("last_error"):
            text += f" - last error: {reply['last_error']}"
        return text
    if reply.get("phase") == "start":
        return (f"{label}: {reply['to_fetch']} of {reply['files']} files to fetch "
                f"({human(reply['bytes'])})")
    if reply.get("phase") == "progress":
        done, total = reply["done_bytes"], max(1, reply["bytes"])
        rate = done / max(reply["elapsed"], 1e-3)
        left = (total - done) / rate if rate > 0 else 0
        width = 30
        filled = int(width * done / total)
        return (f"{label} [{'#' * filled}{'.' * (width - filled)}] "
                f"{reply['done_files']}/{reply['to_fetch']} files, {human(done)}/"
                f"{human(total)}, {human(rate)}/s, {left:.0f}s left")
    return ""


# -- sync and status ---------------------------------------------------------------------
def cmd_sync(mountpoint: Path, paths: list[str]) -> int:
    from . import control
    if not control.is_running(mountpoint):
        raise ImgrepoError(f"{mountpoint} is not a running imgrepo mount; mount it first")
    rel = []
    for p in paths:
        full = Path(p).expanduser().absolute()
        try:
            rel.append(str(full.relative_to(mountpoint)))
        except ValueError:
            rel.append(p)  # already relative to the mount
    print(f"syncing {mountpoint}{' (' + ', '.join(rel) + ')' if rel else ''}",
          file=sys.stderr)
    start_seen: dict[str, Any] = {}
    final: dict[str, Any] = {}
    try:
        for reply in _sync_replies(mountpoint, rel, start_seen):
            final = reply
    except KeyboardInterrupt:
        # Closing the connection stops the sync in the mount; what it fetched stays cached.
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K")
        print("sync interrupted; what was fetched stays in the cache: run the same command "
              "again to continue", file=sys.stderr)
        return 130
    if start_seen and not start_seen.get("fits"):
        print(f"note: {human(start_seen['bytes'])} to fetch but only "
              f"{human(start_seen['cache_room'])} free in the cache limit; stopping at the "
              "limit (raise it with --cache-size)", file=sys.stderr)
    msg = (f"fetched {final['done_files']} files ({human(final['done_bytes'])}) in "
           f"{final['elapsed']:.1f}s")
    if not final.get("remaining") and "files" in final:
        msg += f"; all {final['files']} files are in the local cache"
    if final.get("failed"):
        msg += f"; {final['failed']} failed (see the log)"
    if final.get("stopped_at_limit"):
        msg += "; stopped at the cache limit"
    if final.get("offline"):
        msg += (f"; stopped because the storage is unreachable ({final.get('remaining', 0)} "
                "files left): run it again when it is back")
    print(msg)
    return 1 if final.get("failed") or final.get("stopped_at_limit") or final.get("offline") \
        else 0


def _sync_replies(mountpoint: Path, rel: list[str], start_seen: dict[str, Any]):  # noqa: ANN202
    from . import control
    tty = sys.stderr.isatty()
    last_line = 0.0
    for reply in control.request(mountpoint, {"cmd": "sync", "paths": rel}):
        if reply.get("done"):
            if reply.get("error"):
                raise ImgrepoError(reply["error"])
            if tty:
                sys.stderr.write("\r\033[K")
            yield reply
            return
        if reply.get("phase") == "start":
            start_seen.update(reply)
            if not reply.get("fits"):
                print(f"warning: the files need {human(reply['bytes'])} but the cache has "
                      f"room for {human(reply['cache_room'])}; sync will stop at the limit",
                      file=sys.stderr)
        text = progress_text("sync", reply)
        now = time.monotonic()
        if tty and text:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        elif text and now - last_line >= 2:
            print(text, file=sys.stderr, flush=True)
            last_line = now


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from . import control
    out: dict[str, Any] = {}
    if args.mountpoint:
        mountpoint = Path(args.mountpoint).expanduser().absolute()
        if args.wait:
            follow(mountpoint, {"cmd": "wait"}, "uploading")
        for reply in control.request(mountpoint, {"cmd": "status", "repository": True}):
            out = reply
        out.pop("done", None)
        if out.get("error"):
            raise ImgrepoError(out["error"])
    try:
        from .auth.status import run_status
        login = run_status(settings)
    except ImportError:
        login = None
    if login:
        out["login"] = login
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    print(format_status(out))
    return 0


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
            lines.append(f"repository:   {s['repository_files']} files, "
                         f"{human(s['repository_bytes'])} ({human(s['repository_unique_bytes'])}"
                         " stored)")
    login = s.get("login")
    if login and (login.get("logged_in") or not lines or s.get("storage", "").startswith("s3://")):
        from .auth.status import format_status as login_lines
        lines.append(login_lines(login))
    if not lines:
        lines.append("nothing to report: give a mountpoint, or log in with --login")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
