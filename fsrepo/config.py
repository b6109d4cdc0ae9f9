"""Settings from flags, the environment and a TOML config file, in that order of precedence.

Zero configuration works: the storage defaults to a `file://` repository under the user's
data dir, the cache to the user's cache dir.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

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
    """Where running mounts publish their control sockets (private to the user)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "imgrepo" if base else Path(f"/tmp/imgrepo-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to another user; set XDG_RUNTIME_DIR")
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
    view_cache_entries: int = 200_000  # directory entries kept in memory (~0.4 KiB each)
    idle_release: float = 30.0  # idle seconds before memory is given back (0: never)
    # login (OIDC device flow + STS web identity)
    issuer: str | None = None
    client_id: str | None = None
    role_arn: str | None = None
    scope: str = "openid offline_access"
    config_file: Path = field(default_factory=lambda: config_dir() / "config.toml")

    def state_dir(self) -> Path:
        """The local state of one repository: database, blob cache, staging files, log."""
        key = hashlib.sha256(normalise_storage_url(self.storage).encode()).hexdigest()[:16]
        return self.cache_root / "repos" / key


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


def write_config_values(path: Path, values: dict[str, Any]) -> None:
    """Merge `values` into the config file (used by --login to remember its settings)."""
    current = read_config_file(path)
    current.update({k: v for k, v in values.items() if v is not None})
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# imgrepo settings (flags and IMGREPO_* environment variables override these)"]
    for key, value in sorted(current.items()):
        if key == "cache_root":
            key = "cache_dir"
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key.replace('_', '-')} = {text}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
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
        if "idle_release" in merged:
            merged["idle_release"] = float(merged["idle_release"])
            if merged["idle_release"] < 0:
                raise ConfigError("idle-release must be 0 (never) or a number of seconds")
        if "uploads" in merged:
            merged["uploads"] = int(merged["uploads"])
            if merged["uploads"] < 1:
                raise ConfigError("--uploads must be at least 1")
    except ValueError as exc:
        raise ConfigError(f"bad setting: {exc}") from None
    return replace(settings, **merged)
