"""Durations as operators write them: ``0.25``, ``10``, ``250ms``, ``10s``, ``5m``, ``1.5h``."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Digits only: no sign, no exponent, no "nan"/"inf", so what parses is what was meant.
_DURATION = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<unit>ms|s|m|h)?")

ACCEPTED_FORMS = "seconds (0.25, 10) or a number with ms, s, m or h (250ms, 10s, 5m, 1.5h)"


def parse_duration(text: str) -> float:
    """Seconds in ``text``: plain seconds, or a number with a unit suffix.

    Raises:
        ValueError: ``text`` is empty, negative, not a number or not finite; the message
            quotes it and shows the accepted forms.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration: use {ACCEPTED_FORMS}")
    seconds = float(match["number"]) * _UNITS[match["unit"] or "s"]
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
