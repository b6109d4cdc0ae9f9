"""`imgrepo-mount --duplicates MOUNTPOINT [PATH] [--json]`: ask the running mount which
files under PATH share their content, and print the groups, largest first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import control
from ..errors import ImgrepoError
from ..units import human, plural
from .progress import follow


def relative_in(mountpoint: Path, path: str) -> str:
    """PATH as given (under the mount, or relative to the mount's root) relative to it."""
    full = Path(path).expanduser().absolute()
    try:
        return str(full.relative_to(mountpoint))
    except ValueError:
        if Path(path).expanduser().is_absolute():
            raise ImgrepoError(f"{path} is not inside the mount {mountpoint}") from None
        return path.strip("/")


def cmd_duplicates(mountpoint: Path, paths: list[str], as_json: bool) -> int:
    if len(paths) > 1:
        raise ImgrepoError("--duplicates takes one PATH (a folder in the mount)")
    if not control.is_running(mountpoint):
        raise ImgrepoError(f"{mountpoint} is not a running imgrepo mount; mount it first")
    rel = relative_in(mountpoint, paths[0]) if paths else ""
    final = follow(mountpoint, {"cmd": "duplicates", "path": "" if rel == "." else rel},
                   "duplicates")
    final.pop("done", None)
    if as_json:
        print(json.dumps(final, indent=1, sort_keys=True))
    else:
        print(format_duplicates(final))
    return 0


def format_duplicates(r: dict[str, Any]) -> str:
    groups = r["groups"]
    head = f"{plural(r['files'], 'file')} in {plural(r['folders'], 'folder')} under {r['path']}"
    if not groups:
        return head + ": no two files have the same content"
    copies = sum(g["count"] for g in groups)
    lines = [f"{head}: {plural(len(groups), 'group')} of identical files ({copies} files); "
             f"deduplication already stores each content once, saving {human(r['saved'])}"]
    for g in groups:
        lines.append("")
        lines.append(f"{g['count']} copies of {human(g['size'])} (would take "
                     f"{human(g['space_without_dedup'])} without dedup), sha256 "
                     f"{g['sha256'][:12]}:")
        lines.extend(f"  {p}" for p in g["paths"])
    return "\n".join(lines)
