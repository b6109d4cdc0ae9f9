"""Automatic snapshots' policy: how many of each period to keep, the name a period's
snapshot has, and which automatic snapshots a policy keeps (pure: no I/O, no clock).

An automatic snapshot is named after the start of the finest period the policy keeps
(`auto-2026-12-05T1400Z` for hourly ones), so every machine taking "the 14:00 one" writes
the same name and a conditional create lets only one of them succeed. Retention works as
restic's --keep-hourly/daily/...: for each period kind, the newest snapshot of each of the
last N periods that have one is kept; a snapshot kept by any kind stays. The "auto-"
prefix is reserved: manual snapshots never expire.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass

from .errors import ConfigError

DEFAULT_POLICY = "hourly=24,daily=30,monthly=12"
AUTO_PREFIX = "auto-"
KINDS = ("hourly", "daily", "weekly", "monthly", "yearly")  # finest first
_AUTO_RE = re.compile(r"^auto-(\d{4})-(\d\d)-(\d\d)T(\d\d)00Z$")


@dataclass(frozen=True)
class Retention:
    keep: tuple[tuple[str, int], ...]  # (kind, how many), finest first

    @property
    def finest(self) -> str:
        return self.keep[0][0]

    def __str__(self) -> str:
        return ",".join(f"{kind}={n}" for kind, n in self.keep)


def parse_policy(text: str) -> Retention | None:
    """'hourly=24,daily=30' -> Retention; 'off' -> None; anything else: one-line error.
    '+' separates as ',' does (`-o` options are themselves separated by commas)."""
    text = text.strip().lower()
    if text in ("off", "none", "no", "0"):
        return None
    counts: dict[str, int] = {}
    for part in re.split(r"[,+]", text):
        kind, _, number = part.strip().partition("=")
        if kind not in KINDS or not number.isdigit() or int(number) < 1 or kind in counts:
            raise ConfigError(f"bad automatic snapshot policy {text[:80]!r}: use e.g. "
                              f"{DEFAULT_POLICY} (kinds: {', '.join(KINDS)}), or off")
        counts[kind] = int(number)
    return Retention(tuple((k, counts[k]) for k in KINDS if k in counts))


def period_start(kind: str, t: float) -> float:
    """The start (UTC) of the period of `kind` that holds `t`."""
    tm = time.gmtime(t)
    if kind == "hourly":
        parts = (tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour)
    elif kind in ("daily", "weekly"):
        parts = (tm.tm_year, tm.tm_mon, tm.tm_mday, 0)
    elif kind == "monthly":
        parts = (tm.tm_year, tm.tm_mon, 1, 0)
    else:
        parts = (tm.tm_year, 1, 1, 0)
    start = calendar.timegm((*parts, 0, 0, 0, 0, 0))
    if kind == "weekly":
        start -= tm.tm_wday * 86400  # weeks start on Monday
    return float(start)


def auto_name(policy: Retention, now: float) -> str:
    """The name of the automatic snapshot for the period `now` falls in."""
    return AUTO_PREFIX + time.strftime("%Y-%m-%dT%H00Z",
                                       time.gmtime(period_start(policy.finest, now)))


def auto_time(name: str) -> float | None:
    """When an automatic snapshot's period starts (None: not an automatic snapshot)."""
    m = _AUTO_RE.match(name)
    if m is None:
        return None
    year, month, day, hour = (int(g) for g in m.groups())
    try:
        return float(calendar.timegm((year, month, day, hour, 0, 0, 0, 0, 0)))
    except (ValueError, OverflowError):
        return None


def kept(policy: Retention, names: list[str]) -> set[str]:
    """The automatic snapshots among `names` that the policy keeps."""
    timed = sorted(((t, n) for n in names if (t := auto_time(n)) is not None), reverse=True)
    keep: set[str] = set()
    for kind, count in policy.keep:
        last: float | None = None
        taken = 0
        for t, name in timed:
            if taken >= count:
                break
            period = period_start(kind, t)
            if period != last:
                keep.add(name)
                last = period
                taken += 1
    return keep
