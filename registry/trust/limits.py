"""Token buckets and counters behind the per-caller limits (SPEC §6 "Limits").

Plain, synchronous, single-threaded structures: the interceptor uses them on the event
loop, where nothing interleaves between a check and its update. Every map here stays
bounded: buckets by an LRU bound, counters by the calls in flight (a key goes when its
count drops to zero), so many principals or peers cannot grow them without end.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full.

    Raises:
        ValueError: ``rate`` is not a positive finite number or ``burst`` is below 1.
    """

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate: {rate!r} must be a positive number")
        if burst < 1:
            raise ValueError(f"burst: {burst!r} must be at least 1")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self) -> bool:
        """Take one token if there is one; whether it was there."""
        now = self._clock()
        # max(): a clock that steps back must not drain the bucket.
        tokens = self._tokens + max(0.0, now - self._stamp) * self.rate
        if tokens > self.burst:
            tokens = float(self.burst)
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


class BucketsByKey:
    """A :class:`TokenBucket` per key, at most ``max_keys`` of them.

    A new key beyond the bound evicts the least recently used one. That key starts full
    again when it comes back, which can only favour it, and only once more than
    ``max_keys`` callers are active at the same time.

    Raises:
        ValueError: as :class:`TokenBucket`, or ``max_keys`` is below 1.
    """

    def __init__(
        self, rate: float, burst: int, max_keys: int = 10_000, clock: Clock = time.monotonic
    ) -> None:
        TokenBucket(rate, burst, clock)  # validates rate and burst once, here
        if max_keys < 1:
            raise ValueError(f"max_keys: {max_keys!r} must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def take(self, key: Hashable) -> bool:
        """Take one token from ``key``'s bucket; whether it was there."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self._clock)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets


class KeyedCounter:
    """How many of something (streams, calls) each key holds, at most ``limit`` each.

    Keys are forgotten when their count returns to zero, so the map never holds more
    keys than there are acquisitions outstanding. :meth:`release` never goes below zero.

    Raises:
        ValueError: ``limit`` is below 1.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit: {limit!r} must be at least 1")
        self.limit = limit
        self._counts: dict[Hashable, int] = {}

    def acquire(self, key: Hashable) -> bool:
        """Count one more for ``key`` unless it is at the limit; whether it was counted."""
        count = self._counts.get(key, 0)
        if count >= self.limit:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: Hashable) -> None:
        """Count one less for ``key``; a key at zero stays at zero."""
        count = self._counts.get(key, 0)
        if count > 1:
            self._counts[key] = count - 1
        elif count:
            del self._counts[key]

    def count(self, key: Hashable) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        """The number of keys holding something."""
        return len(self._counts)


class PeerConnections:
    """Connections with calls in flight, per peer host, at most ``limit`` per host.

    A connection is known by its peer address (``host:port``); it is counted while at
    least one of its calls is in flight. Both maps drop entries when their calls end.

    Raises:
        ValueError: ``limit`` is below 1.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit: {limit!r} must be at least 1")
        self.limit = limit
        self._by_host: dict[str, dict[str, int]] = {}

    def acquire(self, host: str, connection: str) -> bool:
        """Count a call on ``connection`` from ``host``; False if it would be one too many."""
        connections = self._by_host.get(host)
        if connections is None:
            self._by_host[host] = {connection: 1}
            return True
        calls = connections.get(connection)
        if calls is not None:
            connections[connection] = calls + 1
            return True
        if len(connections) >= self.limit:
            return False
        connections[connection] = 1
        return True

    def release(self, host: str, connection: str) -> None:
        """The end of a call counted by :meth:`acquire`; unknown pairs are ignored."""
        connections = self._by_host.get(host)
        if connections is None:
            return
        calls = connections.get(connection, 0)
        if calls > 1:
            connections[connection] = calls - 1
        elif calls:
            del connections[connection]
            if not connections:
                del self._by_host[host]

    def connections(self, host: str) -> int:
        """How many of ``host``'s connections have calls in flight."""
        return len(self._by_host.get(host, ()))

    def __len__(self) -> int:
        """The number of hosts with calls in flight."""
        return len(self._by_host)
