"""Sizes as administrators write them: ``10G``, ``512M``, ``1.5T``, ``4096``."""

from __future__ import annotations

import re

from dmsnap.errors import InvalidArgument

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size", allow_zero: bool = False) -> int:
    """Binary units (K = 1024). A size must be positive (an offset may be 0)."""
    m = _RE.fullmatch(text)
    if not m:
        raise InvalidArgument(f"{what} {text!r}: expected a number with optional K/M/G/T suffix")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if allow_zero and value == 0:
        return 0
    if value < 1:
        raise InvalidArgument(f"{what} {text!r} must be positive")
    return int(value)


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("P", "T", "G", "M", "K"):
        f = _UNITS[unit]
        if n >= f:
            v = n / f
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n}B"
