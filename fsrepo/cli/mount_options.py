"""`-o OPTIONS`, as mount(8), /etc/fstab and systemd pass them to `imgrepo-mount SOURCE
MOUNTPOINT -o ...`: our own long flags without dashes, the FUSE options a mount may need,
and the options mount(8) passes along that mean nothing to imgrepo (accepted, ignored).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ..errors import ConfigError

# Handed to the kernel mount as they are.
FUSE_OPTIONS = frozenset({"allow_other", "allow_root", "default_permissions",
                          "nosuid", "nodev", "noexec"})
# mount(8), fstab and systemd vocabulary with no meaning here. `dev`/`suid` (mount.fuse3 adds
# them for root) stay off: a photo repository needs no device files or set-uid programs.
IGNORED_OPTIONS = frozenset({"_netdev", "nofail", "noauto", "auto", "user", "nouser", "users",
                             "owner", "group", "defaults", "dev", "suid", "exec", "async",
                             "noatime", "relatime", "nodiratime", "lazytime", "nolazytime",
                             "loud", "silent"})
IGNORED_PREFIXES = ("x-", "comment=")
# Promises imgrepo cannot keep: refused rather than silently broken.
REFUSED_OPTIONS = {
    "sync": "imgrepo writes to the local cache first and uploads after; "
            "`imgrepo-mount --unmount` waits until every closed file is uploaded",
    "dirsync": "directory changes reach the storage after they are made, not during",
    "atime": "imgrepo keeps no access times (it mounts noatime)",
    "strictatime": "imgrepo keeps no access times (it mounts noatime)",
    "mand": "mandatory locks are not supported",
}


@dataclass
class MountOptions:
    """What one `-o` string asked for: flag values by argparse dest, and FUSE options."""

    flags: dict[str, object] = field(default_factory=dict)
    fuse: set[str] = field(default_factory=set)


def parse_mount_options(texts: list[str], flags: dict[str, argparse.Action]) -> MountOptions:
    """`flags` maps a long flag's name without dashes to its parser action (see args.py)."""
    out = MountOptions()
    for text in texts:
        for item in text.split(","):
            item = item.strip()
            if item:
                _one(item, flags, out)
    return out


def _one(item: str, flags: dict[str, argparse.Action], out: MountOptions) -> None:
    name, has_value, value = item.partition("=")
    if item in FUSE_OPTIONS:
        out.fuse.add(item)
    elif item in ("ro", "rw"):
        out.flags["read_only"] = item == "ro"
    elif item in IGNORED_OPTIONS or item.startswith(IGNORED_PREFIXES):
        return
    elif name in REFUSED_OPTIONS:
        raise ConfigError(f"mount option {name!r} is not supported: {REFUSED_OPTIONS[name]}")
    elif name.replace("_", "-") in flags:
        action = flags[name.replace("_", "-")]
        out.flags[action.dest] = _value(name, has_value, value, action)
    else:
        raise ConfigError(f"unknown mount option {name!r} (see imgrepo-mount --help)")


def _value(name: str, has_value: str, value: str, action: argparse.Action) -> object:
    if action.nargs == 0:  # a switch: `-o read-only`
        if has_value:
            raise ConfigError(f"mount option {name!r} takes no value")
        return action.const
    if not has_value or not value:
        raise ConfigError(f"mount option {name!r} needs a value: {name}=...")
    convert = action.type if callable(action.type) else str
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ConfigError(f"mount option {name}={value!r}: not a valid value") from None
