"""Sizes as people read them: one formatting rule for every message and report."""

from __future__ import annotations


def human(n: float) -> str:
    """A byte count in binary units: `512 B`, `3.4 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plural(n: int, word: str) -> str:
    """`1 file`, `2 files`: counts in messages read as sentences."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
