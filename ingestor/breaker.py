"""A circuit breaker per endpoint: skip a plugin instance that keeps failing.

    closed ──N consecutive failures──▶ open ──cool-down──▶ half-open (one probe)
      ▲                                  ▲                       │
      └──────────── probe succeeds ──────┼───────────────────────┘
                                         └──── probe fails ──────┘

Failures are what a working plugin never does: the endpoint could not be reached or
timed out, or it answered with something the gateway refuses (over
``max_response_bytes``, more than ``max_events`` events, bytes that do not decode).
A plugin that answers well-formed, even with an error status or only errors, is up:
the payload is the problem. Thread-safe: one breaker is shared by every event loop
and every thread that calls the endpoint. The common case, a closed breaker and a
call that succeeds, takes no lock: the state is read whole (an attribute read is
atomic), and only a change of it is made under the lock.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a breaker opens and how long it stays open. Durations are in seconds.

    Raises:
        ValueError: a setting is out of range (the message names it).
    """

    failure_threshold: int = 5
    reset_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold: {self.failure_threshold!r} is out of range")
        if self.reset_timeout < 0:
            raise ValueError(f"reset_timeout: {self.reset_timeout!r} is out of range")


class CircuitBreaker:
    """The health of one endpoint as seen by its callers."""

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state is BreakerState.OPEN and self._cooled_down():
                return BreakerState.HALF_OPEN
            return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through; 0 when it would now."""
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.settings.reset_timeout - self._clock())

    def allow(self) -> bool:
        """Whether a call may go to the endpoint now; a True in half-open is the probe.

        A caller given True must report the outcome with :meth:`success` or
        :meth:`failure` (or :meth:`release` when the call never reached the endpoint).
        """
        state = self._state
        if state is BreakerState.CLOSED:
            return True  # no change to make: no lock
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if not self._cooled_down():
                    return False
                self._state = BreakerState.HALF_OPEN
            if self._probing:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        if self._state is BreakerState.CLOSED and not self._failures and not self._probing:
            return  # nothing to reset: no lock
        with self._lock:
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if (
                self._state is BreakerState.HALF_OPEN
                or self._failures >= self.settings.failure_threshold
            ):
                self._state = BreakerState.OPEN
                self._opened_at = self._clock()
            self._probing = False

    def release(self) -> None:
        """The allowed call was abandoned (e.g. cancelled): free the probe slot."""
        with self._lock:
            self._probing = False

    def _cooled_down(self) -> bool:
        return self._clock() - self._opened_at >= self.settings.reset_timeout
