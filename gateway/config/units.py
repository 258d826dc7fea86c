"""Size and duration parsing for the YAML config.

SPEC §4: ``MB`` and ``MiB`` both mean 1,048,576 bytes (the platform's admins think in "MB" but
their limits have always been binary), so both spellings map to the same power of 1024.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "k": 1024,
    "mb": 1024**2,
    "mib": 1024**2,
    "m": 1024**2,
    "gb": 1024**3,
    "gib": 1024**3,
    "g": 1024**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"20MB"``, ``"8KiB"``; raises ValueError with a readable reason."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 20MB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 20MB, got {value!r}")
    match = _NUMBER_UNIT.match(value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 20MB, 512KiB or 1048576, got {value!r}")
    number, unit = match.groups()
    # Exact arithmetic: ``float()`` of a long digit string is ``inf`` and int() of that raises.
    return int(Fraction(number) * _SIZE_UNITS[unit.lower()])


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``"30s"``, ``"250ms"``, ``"90d"``; raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, got {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int with hundreds of digits
            seconds = math.inf
        if not math.isfinite(seconds):  # ``.nan``/``.inf``: a NaN leeway lets exp never expire
            raise ValueError(f"expected a finite duration such as 30s, got {value!r}")
        if seconds < 0:
            raise ValueError("a duration cannot be negative")
        return seconds
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 30s, got {value!r}")
    match = _NUMBER_UNIT.match(value)
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"expected a duration such as 250ms, 30s, 5m, 24h or 7d, got {value!r}")
    number, unit = match.groups()
    seconds = float(number) * _DURATION_UNITS[unit.lower()]
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration such as 30s, got {value!r}")
    return seconds


def format_size(num_bytes: int) -> str:
    """The inverse used in error messages: whole MiB/KiB when exact, bytes otherwise."""
    for unit, factor in (("MB", 1024**2), ("KB", 1024)):
        if num_bytes >= factor and num_bytes % factor == 0:
            return f"{num_bytes // factor}{unit}"
    return f"{num_bytes} bytes"
