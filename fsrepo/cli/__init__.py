"""imgrepo-mount: mount, unmount, sync, status, login and maintenance commands.

This module reads the command line and hands it to the module that does the action.
Expected failures print one line (`imgrepo-mount: error: ...`) and exit non-zero; only a
bug prints a traceback. Actions import what they need when they run, so that `--status`
loads neither trio nor an HTTP client.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ImgrepoError
from ..nodump import disable_core_dumps
from .args import ACTIONS, PROG, parse_args, settings_from


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    disable_core_dumps()  # every command may hold credentials (the mount, --login, --verify)
    try:
        args = parse_args(argv)
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
    take_source(args)
    settings = settings_from(args)
    if args.login or args.logout:
        from ..auth import commands
        if args.login:
            return commands.run_login(settings, no_browser=args.no_browser)
        return commands.run_logout(settings)
    if args.status:
        from .status import cmd_status
        return cmd_status(settings, args)
    if args.salvage:
        from ..salvage import run_salvage
        return run_salvage(settings, Path(args.salvage).expanduser().absolute())
    if args.verify or args.gc:
        from ..maintenance.report import run_gc, run_verify
        if args.mountpoint:  # the mount's repository, not the default one
            from .mounts import settings_of_mount
            settings = settings_of_mount(settings, Path(args.mountpoint).expanduser().absolute())
        if args.verify:
            return run_verify(settings, data=args.data, as_json=args.json)
        return run_gc(settings, dry_run=args.dry_run, grace_hours=args.grace)
    if not args.mountpoint:
        raise ImgrepoError("a mountpoint is needed (see --help)")
    mountpoint = Path(args.mountpoint).expanduser().absolute()
    if args.unmount:
        from .unmount import cmd_unmount
        return cmd_unmount(mountpoint)
    if args.duplicates:
        from .duplicates import cmd_duplicates
        return cmd_duplicates(mountpoint, args.paths, args.json)
    if args.snapshot or args.snapshots:
        from .snapshots import cmd_snapshot, cmd_snapshots
        if args.snapshot:
            return cmd_snapshot(mountpoint, args.paths)
        return cmd_snapshots(mountpoint, as_json=args.json)
    if args.sync:
        from .sync import cmd_sync
        return cmd_sync(mountpoint, args.paths)
    if args.paths:
        raise ImgrepoError(f"unexpected arguments: {' '.join(args.paths)}")
    from .daemon import cmd_mount
    return cmd_mount(settings, mountpoint, args, argv)


def take_source(args: argparse.Namespace) -> None:
    """`imgrepo-mount SOURCE MOUNTPOINT` (how mount(8) calls us): SOURCE is the storage."""
    mounting = not any(getattr(args, name) for name in ACTIONS)
    if not (mounting and len(args.paths) == 1):
        return
    source, args.mountpoint, args.paths = args.mountpoint, args.paths[0], []
    if args.storage and args.storage != source:
        raise ImgrepoError(f"the storage is given twice ({source} and --storage "
                           f"{args.storage})")
    args.storage = source
    # mount(8) knows its own mounts by source and type: `mount -a` then skips this one.
    escaped = source.replace("\\", "\\\\").replace(",", "\\,")
    args.fuse_options = {*args.fuse_options, f"fsname={escaped}", "subtype=imgrepo-mount"}
