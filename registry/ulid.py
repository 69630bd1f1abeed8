"""ULIDs: 128-bit ids that sort by creation time (48-bit ms clock, 80 random bits)."""

from __future__ import annotations

import os
import re
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
# Every 10-bit value as its two characters: 13 lookups make an id.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
ULID_PATTERN = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


def new_ulid(now_ms: int | None = None) -> str:
    """A fresh ULID as its 26-character Crockford base32 text."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join([_PAIRS[(value >> shift) & 0x3FF] for shift in range(120, -10, -10)])
