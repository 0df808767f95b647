"""Numbers for people: sizes, counts and durations as the CLI and error messages print them (a leaf module)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``12.3 GiB`` style (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    """``1.2B`` / ``135.0M`` / ``4.1K`` style."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def human_seconds(s: float) -> str:
    """``~3 min`` / ``~2.1 h`` style (rough on purpose)."""
    if s < 90:
        return f"~{max(s, 1):.0f} s"
    if s < 5400:
        return f"~{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"~{s / 3600:.1f} h"
    return f"~{s / 86400:.1f} days"
