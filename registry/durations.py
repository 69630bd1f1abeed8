"""Durations as operators write them: ``0.25``, ``10``, ``250ms``, ``5m``, ``1m30s``, ``1h2m``."""

from __future__ import annotations

import math
import re

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_RANK = {unit: rank for rank, unit in enumerate(_UNITS)}
# Digits only: no sign, no exponent, no "nan"/"inf", so what parses is what was meant.
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_PLAIN = re.compile(_NUMBER)
# "ms" before "m": 1ms is a millisecond, 1m5s a minute and five seconds.
_PART = re.compile(rf"(?P<number>{_NUMBER})(?P<unit>ms|h|m|s)")

ACCEPTED_FORMS = (
    "seconds (0.25, 10), or numbers each with h, m, s or ms, largest first "
    "(250ms, 10s, 5m, 1.5h, 1m30s)"
)


def parse_duration(text: str) -> float:
    """Seconds in ``text``: plain seconds, or numbers with units in decreasing order.

    ``1h2m``, ``1m30s`` and ``2s500ms`` compound; each unit comes at most once and a
    larger one never follows a smaller one (``30s1m`` is refused: likely a typo).

    Raises:
        ValueError: ``text`` is empty, negative, not a number or not finite; the message
            quotes it and shows the accepted forms.
    """
    stripped = text.strip()
    if _PLAIN.fullmatch(stripped):
        return _finite(float(stripped), text)
    seconds, rank, position = 0.0, -1, 0
    for part in _PART.finditer(stripped):
        unit_rank = _RANK[part["unit"]]
        if part.start() != position or unit_rank <= rank:
            break
        seconds += float(part["number"]) * _UNITS[part["unit"]]
        rank, position = unit_rank, part.end()
    if position == 0 or position != len(stripped):
        raise ValueError(f"{text!r} is not a duration: use {ACCEPTED_FORMS}")
    return _finite(seconds, text)


def _finite(seconds: float, text: str) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is too large a duration: use {ACCEPTED_FORMS}")
    return seconds


def format_duration(seconds: float) -> str:
    """The short form of ``seconds`` that :func:`parse_duration` reads back: ``250ms``, ``5m``."""
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    if seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"
