"""The command line: every flag `imgrepo-mount` takes, and the Settings they make."""

from __future__ import annotations

import argparse

from .. import __version__
from ..config import Settings, load_settings

PROG = "imgrepo-mount"


def build_parser() -> argparse.ArgumentParser:
    """One action flag at most (mount when none), plus the settings and options."""
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
    act.add_argument("--salvage", metavar="DEST",
                     help="copy every file not yet uploaded out of the local cache into DEST "
                          "(reads only the cache, never the bucket)")
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
    p.add_argument("--commit-interval", type=float, metavar="SECONDS",
                   help="closed files survive a power loss at most this long after close() "
                        "(default 1; fsync() at once)")
    p.add_argument("--read-only", action="store_true",
                   help="mount without ever writing (changes answer EROFS)")
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
    """The flags given override the environment and the config file (see config.py)."""
    return load_settings({
        "storage": args.storage,
        "endpoint_url": args.endpoint_url,
        "region": args.region,
        "cache_root": args.cache_dir,
        "cache_size": args.cache_size,
        "refresh": args.refresh,
        "uploads": args.uploads,
        "commit_interval": args.commit_interval,
        "issuer": args.issuer,
        "client_id": args.client_id,
        "role_arn": args.role_arn,
        "scope": args.scope,
    })
