"""Durations as people write them: 90s, 15m, 24h, 30d, 2w (a bare number is seconds)."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '24h', '30d' or '2w'; ValueError naming the text."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 24h, 30d")
    value = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if value <= 0:
        raise ValueError(f"{text!r} must be positive")
    return value


def duration_label(seconds: float) -> str:
    """24h, 12h, 1h, 90m, 45s, 30d: the duration as people write it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0 and not (unit == "d" and seconds < 3 * 86400):
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
