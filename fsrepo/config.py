"""Settings from flags, the environment and a TOML config file, in that order of precedence.

Zero configuration works: the storage defaults to a `file://` repository under the user's
data dir, the cache to the user's cache dir.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .snapshot_policy import DEFAULT_POLICY, parse_policy

DEFAULT_CACHE_SIZE = 10 * 1024**3
DEFAULT_REFRESH = 10.0


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "imgrepo"


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "imgrepo"


def default_cache_root() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "imgrepo"


def runtime_dir() -> Path:
    """Where running mounts publish their control sockets (private to the user): the
    session's XDG_RUNTIME_DIR, else a folder of ours in /tmp (root, cron, containers)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        Path(base).mkdir(mode=0o700, parents=True, exist_ok=True)
        return private_dir(Path(base) / "imgrepo")
    return private_dir(Path(f"/tmp/imgrepo-{os.getuid()}"))


def private_dir(path: Path) -> Path:
    """`path` as a folder only we can use: created 0700 if missing; if it exists, it must
    be a real directory (never a symlink: checked with lstat), ours, mode 0700. In a shared
    folder like /tmp another user may have planted it first, to break our commands or to
    answer them with a fake mount: refused with the reason, never used."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    st = os.lstat(path)
    hint = "remove it, or set XDG_RUNTIME_DIR to a private folder"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a real directory (a symlink or a file): refusing "
                          f"to use it; {hint}")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to another user (uid {st.st_uid}): refusing to "
                          f"use it; {hint}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise ConfigError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0700: "
                          f"refusing to use it; {hint}")
    return path


def default_storage() -> str:
    return "file://" + str(data_dir() / "repository")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'10G', '512MiB', '1000000' -> bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"not a size: {text!r} (use e.g. 500M, 10G)")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (use e.g. 500M, 10G)")
    number, unit = float(m.group(1)), m.group(2).lower()
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit]
    return int(number * mult)


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know about where things are."""

    storage: str = field(default_factory=default_storage)
    endpoint_url: str | None = None
    region: str | None = None
    cache_root: Path = field(default_factory=default_cache_root)
    cache_size: int = DEFAULT_CACHE_SIZE
    refresh: float = DEFAULT_REFRESH
    uploads: int = 8
    read_ahead_files: int = 16  # a folder's next files fetched ahead of a reader (0: off)
    commit_interval: float = 1.0  # seconds from close() until power-safe (group_commit.py)
    # Directory entries kept in memory (~0.4 KiB each), and the file inodes the kernel may
    # hold while a walk goes on (namespace.kernel_files): at 200,000 a quiet machine's find
    # over 1M files peaked at 219-230 MiB; at 100,000, 181-183 MiB, with the walk as fast.
    view_cache_entries: int = 100_000
    auto_snapshots: str = DEFAULT_POLICY  # snapshot_policy.py: kinds=counts, or "off"
    idle_release: float = 30.0  # idle seconds before memory is given back (0: never)
    # login (OIDC device flow + STS web identity)
    issuer: str | None = None
    client_id: str | None = None
    role_arn: str | None = None
    scope: str = "openid offline_access"
    config_file: Path = field(default_factory=lambda: config_dir() / "config.toml")

    def state_dir(self) -> Path:
        """The local state of one repository: database, blob cache, staging files, log.
        An S3 repository's key includes its endpoint: the same bucket name on two servers
        is two repositories, and they may share one cache root."""
        name = normalise_storage_url(self.storage)
        if self.endpoint_url and name.startswith("s3://"):
            name += " at " + self.endpoint_url.strip().rstrip("/").lower()
        return self.cache_root / "repos" / hashlib.sha256(name.encode()).hexdigest()[:16]

    def legacy_state_dir(self) -> Path | None:
        """Where the state was kept before the endpoint counted (None: same place)."""
        key = hashlib.sha256(normalise_storage_url(self.storage).encode()).hexdigest()[:16]
        old = self.cache_root / "repos" / key
        return None if old == self.state_dir() else old


def normalise_storage_url(url: str) -> str:
    url = url.strip()
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path.startswith("/"):
            raise ConfigError(f"file:// URLs need an absolute path: {url!r}")
        return "file://" + os.path.normpath("/" + path.lstrip("/"))  # not POSIX's '//'
    if url.startswith("s3://"):
        rest = url[len("s3://"):].strip("/")
        if not rest:
            raise ConfigError(f"s3:// URL without a bucket: {url!r}")
        return "s3://" + rest
    if url.startswith("/"):
        return "file://" + os.path.normpath("/" + url.lstrip("/"))
    raise ConfigError(f"unknown storage URL {url!r}: use s3://bucket/prefix or file:///path")


_FILE_KEYS = {f.name for f in fields(Settings)} - {"config_file"}


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    section = raw.get("imgrepo", raw)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [imgrepo] must be a table of settings")
    out: dict[str, Any] = {}
    for key, value in section.items():
        key = key.replace("-", "_")
        if key == "cache_dir":
            key = "cache_root"
        if key not in _FILE_KEYS:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        out[key] = value
    return out


CONFIG_HEADER = "# imgrepo settings (flags and IMGREPO_* environment variables override these)\n"


def check_config_values(values: dict[str, Any]) -> None:
    """Refuse, before anything is done, a value the config file could not show readably."""
    for key, value in values.items():
        if isinstance(value, str) and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ConfigError(f"{key.replace('_', '-')} {value!r} contains control "
                              f"characters; it cannot be written to the config file")
        if value is not None and not isinstance(value, str | int | float | bool | Path):
            raise ConfigError(f"{key.replace('_', '-')}: {type(value).__name__} values "
                              f"cannot be written to the config file")


def write_config_values(path: Path, values: dict[str, Any]) -> None:
    """Merge `values` into the config file (used by --login to remember its settings),
    keeping the user's comments, layout and [imgrepo] table (tomlkit edits in place)."""
    import tomlkit
    values = {k: v for k, v in values.items() if v is not None}
    check_config_values(values)
    read_config_file(path)  # a file we could not read back is not rewritten
    try:
        doc = tomlkit.parse(path.read_text())
    except FileNotFoundError:
        doc = tomlkit.parse(CONFIG_HEADER)
    table: Any = doc["imgrepo"] if "imgrepo" in doc else doc
    spelled = {k.replace("-", "_"): k for k in table}  # keep the user's spelling of a key
    for key, value in values.items():
        name = "cache_dir" if key == "cache_root" else key
        table[spelled.get(name, name.replace("_", "-"))] = (
            str(value) if isinstance(value, Path) else value)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomlkit.dumps(doc))
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


_ENV = {
    "IMGREPO_STORAGE": "storage",
    "IMGREPO_CACHE_DIR": "cache_root",
    "IMGREPO_CACHE_SIZE": "cache_size",
    "IMGREPO_REFRESH": "refresh",
    "IMGREPO_ISSUER": "issuer",
    "IMGREPO_CLIENT_ID": "client_id",
    "IMGREPO_ROLE_ARN": "role_arn",
    "AWS_ENDPOINT_URL_S3": "endpoint_url",
    "AWS_ENDPOINT_URL": "endpoint_url",
}


def load_settings(flags: dict[str, Any] | None = None, config_file: Path | None = None) -> Settings:
    """Flags (non-None values) > environment > config file > defaults."""
    flags = dict(flags or {})
    path = Path(config_file or os.environ.get("IMGREPO_CONFIG") or config_dir() / "config.toml")
    merged: dict[str, Any] = read_config_file(path)
    for var, key in reversed(_ENV.items()):  # earlier names win (AWS_ENDPOINT_URL_S3 first)
        if os.environ.get(var):
            merged[key] = os.environ[var]
    merged.update({k: v for k, v in flags.items() if v is not None and k in _FILE_KEYS})
    settings = Settings(config_file=path)
    try:
        if "storage" in merged:
            merged["storage"] = normalise_storage_url(str(merged["storage"]))
        if "cache_root" in merged:
            merged["cache_root"] = Path(os.path.expanduser(str(merged["cache_root"]))).absolute()
        if "cache_size" in merged:
            merged["cache_size"] = parse_size(merged["cache_size"])
        if "refresh" in merged:
            merged["refresh"] = float(merged["refresh"])
            if merged["refresh"] <= 0:
                raise ConfigError("--refresh must be a positive number of seconds")
        if "auto_snapshots" in merged:
            merged["auto_snapshots"] = str(merged["auto_snapshots"])
            parse_policy(merged["auto_snapshots"])  # refused now, in one line, if bad
        if "commit_interval" in merged:
            merged["commit_interval"] = float(merged["commit_interval"])
            if not 0 < merged["commit_interval"] <= 3600:
                raise ConfigError("--commit-interval must be between 0 and 3600 seconds")
        if "idle_release" in merged:
            merged["idle_release"] = float(merged["idle_release"])
            if merged["idle_release"] < 0:
                raise ConfigError("idle-release must be 0 (never) or a number of seconds")
        if "read_ahead_files" in merged:
            merged["read_ahead_files"] = int(merged["read_ahead_files"])
            if not 0 <= merged["read_ahead_files"] <= 1000:
                raise ConfigError("--read-ahead-files must be between 0 (off) and 1000")
        if "uploads" in merged:
            merged["uploads"] = int(merged["uploads"])
            if merged["uploads"] < 1:
                raise ConfigError("--uploads must be at least 1")
    except ValueError as exc:
        raise ConfigError(f"bad setting: {exc}") from None
    return replace(settings, **merged)
