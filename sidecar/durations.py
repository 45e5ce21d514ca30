"""Durations in Prometheus syntax: ``1d2h3m4s5ms``, ``1w``, ``500ms``, ``0s``.

A duration is one or more ``<integer><unit>`` parts, largest unit first, each unit
at most once: ``y`` (365 days), ``w``, ``d``, ``h``, ``m``, ``s``, ``ms``. A bare
``0`` is also accepted. This is the syntax of Prometheus's ``model.ParseDuration``,
so the same strings work in the sidecar's files and in Prometheus rules.

Durations are held as ``float`` seconds in the rest of the sidecar. Pure module:
standard library only.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_duration", "parse_duration"]

# (unit, milliseconds), largest first: the order a duration must be written in.
_UNITS: tuple[tuple[str, int], ...] = (
    ("y", 365 * 24 * 3600 * 1000),
    ("w", 7 * 24 * 3600 * 1000),
    ("d", 24 * 3600 * 1000),
    ("h", 3600 * 1000),
    ("m", 60 * 1000),
    ("s", 1000),
    ("ms", 1),
)
_MS = dict(_UNITS)
_RANK = {unit: i for i, (unit, _) in enumerate(_UNITS)}
_PART = re.compile(r"([0-9]+)(ms|[ywdhms])")
_HELP = "expected <integer><unit> parts such as 30s, 1h30m, 500ms (units y, w, d, h, m, s, ms)"


def parse_duration(text: str) -> float:
    """Parse a Prometheus duration (``1h30m``) into seconds.

    Raises :class:`ValueError` on anything else: an empty string, an unknown unit,
    a fraction (``1.5h``), a sign, or units out of order or repeated (``1m1h``).
    """
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'invalid duration "": {_HELP}')
    total_ms = 0
    pos = 0
    last_rank = -1
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            raise ValueError(f'invalid duration "{text}": {_HELP}')
        unit = match.group(2)
        rank = _RANK[unit]
        if rank <= last_rank:
            raise ValueError(f'invalid duration "{text}": units must go from largest to smallest, once each')
        last_rank = rank
        total_ms += int(match.group(1)) * _MS[unit]
        pos = match.end()
    return total_ms / 1000


def format_duration(seconds: float) -> str:
    """Format seconds in the Prometheus form: ``5400`` → ``1h30m``, ``0`` → ``0s``.

    The value is rounded to the millisecond. Raises :class:`ValueError` for a
    negative or non-finite value, which has no Prometheus form.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration (must be finite and >= 0)")
    remaining = round(seconds * 1000)
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit, ms in _UNITS:
        count, remaining = divmod(remaining, ms)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
