"""The command line: every flag `imgrepo-mount` takes, grouped by action, and the Settings
they make.

A new flag is one `add_argument` line in its group below. Flags in the groups listed in
O_GROUPS may also be given as `-o name=value` (the mount(8)/fstab form).
"""

from __future__ import annotations

import argparse

from .. import __version__
from ..config import Settings, load_settings
from ..errors import ConfigError
from .mount_options import MountOptions, parse_mount_options

PROG = "imgrepo-mount"

# The action flags: at most one per command (mount when none).
ACTIONS = ("unmount", "sync", "status", "login", "logout", "verify", "gc", "salvage",
           "duplicates", "snapshot", "snapshots")

# Flags that only change what an action does, and the actions they go with: given alone,
# they are refused (not taken as a mount: `--pending MNT` must not mount MNT).
MODIFIERS = {"pending": ("status",), "wait": ("status",), "data": ("verify",),
             "dry_run": ("gc",), "json": ("status", "verify", "duplicates", "snapshots")}

STORAGE_GROUP = "storage and cache (any command)"
MOUNT_GROUP = "mount (the default action)"
O_GROUPS = (STORAGE_GROUP, MOUNT_GROUP)

EXAMPLES = """\
examples:
  imgrepo-mount ~/photos --storage s3://bucket/photos     mount (and return)
  imgrepo-mount s3://bucket/photos ~/photos -o ro         the same, read-only, mount(8) form
  mount -t fuse.imgrepo-mount s3://bucket/photos /mnt/photos -o allow_other,_netdev
  imgrepo-mount --status ~/photos                         what the mount is doing
  imgrepo-mount --sync ~/photos 2024                      keep ~/photos/2024 offline
  imgrepo-mount --unmount ~/photos                        upload everything, then unmount
  imgrepo-mount --snapshot ~/photos before-cleanup        record the whole tree now
  cp -a ~/photos/.snapshots/before-cleanup/2024/x.jpg ~/photos/2024/    get a file back
  imgrepo-mount --verify --storage s3://bucket/photos     check the repository
  imgrepo-mount --verify ~/photos                         ... the one mounted there
  imgrepo-mount --duplicates ~/photos 2024                what ~/photos/2024 holds twice

With no configuration, the repository is a local folder under
~/.local/share/imgrepo/repository. Settings may also live in ~/.config/imgrepo/config.toml.
The mount's log is <cache-dir>/repos/<id>/imgrepo.log (--status shows the exact path).
fstab and systemd: see docs/systemd.md."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        usage="%(prog)s [SOURCE] MOUNTPOINT [-o OPTIONS] [flags]\n"
              "       %(prog)s --ACTION [MOUNTPOINT] [flags]",
        description="Mount a deduplicated file repository kept in S3 (or a local folder) "
                    "as an ordinary folder.")
    p.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT",
                   help="the folder to mount on (or act on); given after SOURCE, SOURCE is "
                        "the storage URL (as mount(8) passes it)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="with --sync: only these paths")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    storage = p.add_argument_group(STORAGE_GROUP)
    storage.add_argument("--storage", help="s3://bucket/prefix or file:///path "
                                           "(env IMGREPO_STORAGE)")
    storage.add_argument("--endpoint-url", help="S3 endpoint (MinIO, R2, ...; "
                                                "env AWS_ENDPOINT_URL)")
    storage.add_argument("--region", help="S3 region")
    storage.add_argument("--cache-dir", help="local cache root (env IMGREPO_CACHE_DIR; "
                                             "default ~/.cache/imgrepo)")
    storage.add_argument("--cache-size", help="cache limit, e.g. 20G (default 10G)")
    storage.add_argument("--refresh", type=float,
                         help="seconds until other machines' changes show (default 10)")
    storage.add_argument("--uploads", type=int, help="uploads in flight (default 8)")
    storage.add_argument("--read-ahead-files", type=int, metavar="N",
                         help="files of a folder read in order fetched before they are "
                              "opened (default 16; 0: off)")

    mount = p.add_argument_group(MOUNT_GROUP)
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                       help="comma-separated: the flags of these two groups without dashes "
                            "(cache-dir=..., read-only), ro, rw, allow_other, "
                            "default_permissions, noexec, nosuid, nodev; mount(8)'s and "
                            "systemd's own (_netdev, nofail, x-systemd.*, ...) are ignored")
    mount.add_argument("--commit-interval", type=float, metavar="SECONDS",
                       help="closed files survive a power loss at most this long after "
                            "close() (default 1; fsync() at once)")
    mount.add_argument("--read-only", action="store_true",
                       help="mount without ever writing (changes answer EROFS; no lease)")
    mount.add_argument("--auto-snapshots", metavar="POLICY",
                       help="automatic snapshots kept, e.g. hourly=24,daily=30,weekly=8,"
                            "monthly=12,yearly=5, or off (default hourly=24,daily=30,"
                            "monthly=12; with -o, join them with +); any running mount "
                            "takes each one once")
    mount.add_argument("--foreground", "-f", action="store_true",
                       help="stay in the foreground (systemd: Type=notify)")
    mount.add_argument("--log-file", help="log here as well")
    mount.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    mount.add_argument("--unmount", "-u", action="store_true",
                       help="action: wait until every closed file is in the bucket, "
                            "then unmount")

    status = p.add_argument_group("status")
    status.add_argument("--status", "--whoami", dest="status", action="store_true",
                        help="action: what the mount is doing (without MOUNTPOINT: every "
                             "imgrepo mount here); login state")
    status.add_argument("--json", action="store_true",
                        help="with --status/--verify/--duplicates: JSON")
    status.add_argument("--wait", action="store_true",
                        help="with --status: block until nothing is pending")
    status.add_argument("--pending", action="store_true",
                        help="with --status: list the files not uploaded yet")
    status.add_argument("--duplicates", action="store_true",
                        help="action: files with identical content under MOUNTPOINT [PATH], "
                             "from the manifests (nothing downloaded)")

    sync = p.add_argument_group("sync")
    sync.add_argument("--sync", action="store_true",
                      help="action: prefetch every file (or PATHs) into the local cache")

    snaps = p.add_argument_group("snapshots (read them under MOUNTPOINT/.snapshots/NAME)")
    snaps.add_argument("--snapshot", action="store_true",
                       help="action: MOUNTPOINT [NAME]: once this machine's changes are in "
                            "the bucket, record the whole tree as a snapshot (NAME: the "
                            "UTC time)")
    snaps.add_argument("--snapshots", action="store_true",
                       help="action: list the snapshots (rmdir MOUNTPOINT/.snapshots/NAME "
                            "deletes one)")

    maint = p.add_argument_group("maintenance")
    maint.add_argument("--verify", action="store_true",
                       help="action: check every manifest and that every referenced blob "
                            "exists, and every snapshot's folder copies and blobs")
    maint.add_argument("--data", action="store_true", help="with --verify: also hash every blob")
    maint.add_argument("--gc", action="store_true",
                       help="action: free what nothing needs any more: blobs no folder and "
                            "no snapshot names, removal marks of removed folders, and what "
                            "only deleted snapshots held")
    maint.add_argument("--dry-run", action="store_true", help="with --gc: only report")
    maint.add_argument("--grace", type=float, default=24.0,
                       help="with --gc: keep what became unneeded less than this many "
                            "hours ago (default 24)")
    maint.add_argument("--salvage", metavar="DEST",
                       help="action: copy every file not yet uploaded out of the local cache "
                            "into DEST (reads only the cache, never the bucket)")

    login = p.add_argument_group("login (OpenID Connect device flow)")
    login.add_argument("--login", action="store_true", help="action: log in")
    login.add_argument("--logout", action="store_true",
                       help="action: revoke and forget the login")
    login.add_argument("--issuer", help="OpenID Connect issuer URL")
    login.add_argument("--client-id", help="OAuth client id")
    login.add_argument("--role-arn", help="IAM role to assume with the ID token")
    login.add_argument("--scope", help="scopes (default 'openid offline_access')")
    login.add_argument("--no-browser", action="store_true", help="only print the URL")

    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse, allow one action at most, and fold `-o` into the flags (args.fuse_options)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = [name for name in ACTIONS if getattr(args, name)]
    if len(chosen) > 1:
        parser.error(" and ".join(f"--{name}" for name in chosen) + " cannot be combined")
    for flag, actions in MODIFIERS.items():
        if getattr(args, flag) and not set(chosen) & set(actions):
            parser.error(f"--{flag.replace('_', '-')} goes with "
                         + " or ".join(f"--{a}" for a in actions))
    args.fuse_options = set()
    if args.options:
        if chosen:
            parser.error("-o is for mounting only")
        apply_mount_options(args, parse_mount_options(args.options, o_flags(parser)))
    return args


def o_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags `-o` accepts, by their long name without dashes."""
    out: dict[str, argparse.Action] = {}
    for group in parser._action_groups:
        if group.title in O_GROUPS:
            for action in group._group_actions:
                if action.dest in ACTIONS:
                    continue
                for flag in action.option_strings:
                    if flag.startswith("--"):
                        out[flag[2:]] = action
    return out


def apply_mount_options(args: argparse.Namespace, options: MountOptions) -> None:
    """`-o` fills in flags; the same setting given both ways must agree."""
    for dest, value in options.flags.items():
        given = getattr(args, dest)
        if given not in (None, False) and given != value:
            raise ConfigError(f"-o {dest.replace('_', '-')} disagrees with the flag given "
                              f"({given!r})")
        setattr(args, dest, value)
    args.fuse_options = options.fuse


def settings_from(args: argparse.Namespace) -> Settings:
    """The flags given override the environment and the config file (see config.py)."""
    return load_settings({
        "storage": args.storage,
        "endpoint_url": args.endpoint_url,
        "region": args.region,
        "cache_root": args.cache_dir,
        "cache_size": args.cache_size,
        "refresh": args.refresh,
        "uploads": args.uploads,
        "read_ahead_files": args.read_ahead_files,
        "auto_snapshots": args.auto_snapshots,
        "commit_interval": args.commit_interval,
        "issuer": args.issuer,
        "client_id": args.client_id,
        "role_arn": args.role_arn,
        "scope": args.scope,
    })
