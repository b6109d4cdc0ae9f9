"""Running the mount: in the foreground, or as a detached process the command waits for.

The parent starts `python -m fsrepo.cli ... --ready-fd N` in a new session and reads one
line from that pipe: "ok" once the mount is serving, or "error: ..." when it could not
start; the child writes the line exactly once, then goes on (or exits).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from .. import allocator
from ..config import Settings
from ..errors import ImgrepoError


def cmd_mount(settings: Settings, mountpoint: Path, args: argparse.Namespace,
              argv: list[str]) -> int:
    foreground = args.foreground or args.ready_fd is not None
    env = allocator.mount_environment(os.environ, allocator.jemalloc_library())
    if foreground and env is not None and allocator.ADDED_VAR not in os.environ:
        restart_with(env, argv)  # before the mount's imports; returns only if it could not
    from ..mount import check_fuse_options, check_mountpoint
    check_mountpoint(mountpoint)
    check_fuse_options(args.fuse_options)
    adopt_legacy_state(settings)
    if foreground:
        return run_foreground(settings, mountpoint, args)
    return start_detached(settings, mountpoint, argv, env)


def restart_with(env: dict[str, str], argv: list[str]) -> None:
    """Run this mount again in this process (same pid, terminal and descriptors) with the
    environment that preloads the allocator (`allocator.py`); only if exec fails does it
    return, and the mount runs as it is."""
    command = [*own_command(), *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(command[0], command, env)
    except OSError as exc:
        logging.getLogger("fsrepo").warning(
            "could not restart on jemalloc (%s): running on Python's own allocator", exc)


def start_detached(settings: Settings, mountpoint: Path, argv: list[str],
                   env: dict[str, str] | None) -> int:
    """Start the mount as a detached process (with `env`, else this environment) and wait
    until it says it is ready."""
    read_fd, write_fd = os.pipe()
    child_argv = [*own_command(), *argv, "--ready-fd", str(write_fd)]
    log_path = settings.state_dir() / "imgrepo.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as errlog:
        proc = subprocess.Popen(child_argv, pass_fds=(write_fd,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errlog,
                                start_new_session=True, env=env)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        line = ready.readline().decode(errors="replace").strip()
    if line == "ok":
        print(f"mounted {settings.storage} at {mountpoint} (log: {log_path})")
        offline = offline_note(mountpoint)
        if offline:
            print(offline)
        return 0
    proc.wait(timeout=30)
    if line.startswith("error: "):
        raise ImgrepoError(line[len("error: "):])
    raise ImgrepoError(f"the mount process exited (code {proc.returncode}); see {log_path}")


def adopt_legacy_state(settings: Settings) -> None:
    """A cache made before an S3 repository's key included its endpoint moves to the new
    key (once, under its lock): its pending uploads and cached files stay usable."""
    from ..engine import StateLock
    old, new = settings.legacy_state_dir(), settings.state_dir()
    if old is None or not old.is_dir() or new.exists():
        return
    lock = StateLock(old)  # refuses while an older mount still uses it
    try:
        os.rename(old, new)
    finally:
        lock.release()
    print(f"moved the local cache of {settings.storage} to {new} (its key now includes the "
          "endpoint)", file=sys.stderr)


def own_command() -> list[str]:
    """How to start this command again so that `ps` and `pgrep -f imgrepo-mount` show it
    by its name: through the installed `imgrepo-mount` script next to this Python when there
    is one, else as `python -m fsrepo.cli` (a source checkout)."""
    script = Path(sys.executable).parent / "imgrepo-mount"
    try:
        with open(script, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!") and b"fsrepo.cli" in head:
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "fsrepo.cli"]


def name_this_process(name: str = "imgrepo-mount") -> None:
    """The kernel's short name of the process (`ps -e`, `pgrep -x imgrepo-mount`, top)
    instead of "python3"."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass  # not Linux: the name stays; nothing depends on it


def offline_note(mountpoint: Path) -> str | None:
    """Mounted while the storage does not answer: say so, and what waits to go up."""
    from .. import control
    from ..units import human, plural
    status = control.ask(mountpoint, {"cmd": "status"}, timeout=10)
    if status is None or status.get("online", True):
        return None
    text = (f"the storage is unreachable ({status.get('offline_reason')}): working offline "
            "from the local cache")
    if not status.get("pending_ops"):
        return text + "; changes are queued and upload when it is back"
    return (f"{text}; {plural(status.get('pending_files', 0), 'file')} "
            f"({human(status.get('pending_bytes', 0))}) and "
            f"{plural(status.get('pending_ops', 0), 'change')} are queued and upload when it "
            "is back")


class ReadyPipe:
    """The child's end of the ready pipe (none in the foreground): one line, then closed."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def say(self, text: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (text + "\n").encode())
            os.close(self._fd)
        except OSError:
            pass
        self._fd = None


def run_foreground(settings: Settings, mountpoint: Path, args: argparse.Namespace) -> int:
    import trio

    from ..auth.commands import apply_login_environment
    from ..engine import StateLock
    from ..logsetup import setup_logging
    from ..mount import run_mount

    log_path = settings.state_dir() / "imgrepo.log"
    allocator.forget_preload(os.environ)
    name_this_process()
    setup_logging(log_path, args.verbose, stderr=args.ready_fd is None)
    if args.log_file:
        extra = logging.FileHandler(args.log_file)
        extra.setFormatter(logging.getLogger().handlers[0].formatter)
        extra.addFilter(logging.getLogger().handlers[0].filters[0])
        logging.getLogger().addHandler(extra)
    ready = ReadyPipe(args.ready_fd)
    if args.ready_fd is not None:
        # Detached: hold no directory busy (paths were made absolute when parsing argv).
        os.chdir("/")
    try:
        lock = StateLock(settings.state_dir())
        try:
            apply_login_environment(settings)
            trio.run(run_mount, settings, mountpoint, lambda: ready.say("ok"), args.read_only,
                     args.fuse_options)
        finally:
            lock.release()
    except ImgrepoError as exc:
        # Into the log file only: main() prints it on stderr, as the one line users see.
        record = logging.getLogger("fsrepo").makeRecord(
            "fsrepo", logging.ERROR, __file__, 0, "%s", (exc,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        ready.say("error: " + str(exc))
        raise
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            logging.getLogger("fsrepo").exception("the mount failed")
        ready.say(f"error: the mount failed unexpectedly ({type(exc).__name__}); see {log_path}")
        raise
    return 0

