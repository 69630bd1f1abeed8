"""How one ``emit`` call delivers its events: what is resent, when, and what failed.

    delivery = Delivery("audit", events, RetryPolicy())
    while True:
        request = delivery.request()            # the events still to deliver
        ...                                     # one Emit on one instance, then one of:
        delivery.answered(address, response)    #   its EmitResponse
        delivery.unreachable(address, error)    #   a transport failure: no answer
        delivery.refused(address, error)        #   an error status, an undecodable answer
        delay = delivery.next_delay()           # None: done, or out of attempts/budget
        if delay is None:
            break
        sleep(delay)
    error = delivery.error()                    # PluginEmitError, or None: all delivered

The delivery guarantee this gives (an emit is not a pure transform):

- **At least once** for every event that is retried. After a transport failure (no
  answer: UNAVAILABLE, a dropped channel, DEADLINE_EXCEEDED) all the events of that
  attempt are sent again, since any of them may or may not have reached the sink. After
  an answer, only the ``failed_event_ids`` the plugin marked ``retryable`` (an
  ``EmitError`` with ``retryable = true`` for that id) are sent again; the others it
  did not name were delivered, and those it failed without a retryable error are
  failed for good. A plugin should therefore be idempotent by ``Event.id``.
- **No silent loss**: an event is either delivered (answered and not named as failed)
  or named in the ``PluginEmitError`` the call raises (``failed_event_ids``). Events
  without an id cannot be named: an ``EmitError`` with an empty ``event_id`` stands for
  all of them (they are counted in the error's message, not in its ids); an answer
  that has none counts them as delivered. After a transport failure they are resent
  with the rest.
- An error status from the plugin (INTERNAL when an SDK handler raised, any other
  non-transport code) or an answer that does not decode fails every event of that
  attempt, without a retry: the plugin answered, and sending the same again would
  most likely fail the same way.

Retries follow :class:`RetryPolicy`: at most ``max_attempts`` attempts in all, waits of
exponential backoff with full jitter between them, and no attempt starts (or waits)
past ``budget`` seconds from the first; an attempt's deadline is cut to what is left
of the budget. The caller picks another instance for each retry where there is one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ingestor.errors import PluginConnectionError, PluginEmitError, PluginError
from registry.wire import event_pb, pb

DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_INITIAL_BACKOFF = 0.1
DEFAULT_MAX_BACKOFF = 2.0
DEFAULT_RETRY_BUDGET = 60.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How an emitter retries: attempts, backoff (full jitter) and a total time budget.

    ``max_attempts`` counts the first attempt (1: never retry). The wait before retry
    ``n`` (1, 2, …) is uniform in ``[0, min(max_backoff, initial_backoff * 2**(n-1))]``.
    No attempt starts, and no wait ends, past ``budget`` seconds after the first
    attempt began; each attempt's deadline is at most what is left of it.

    Raises (constructor):
        ValueError: a setting out of range (the message names it).
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_backoff: float = DEFAULT_INITIAL_BACKOFF
    max_backoff: float = DEFAULT_MAX_BACKOFF
    budget: float = DEFAULT_RETRY_BUDGET

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: {self.max_attempts!r} must be at least 1")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError("initial_backoff and max_backoff: need 0 <= initial <= max")
        if self.budget <= 0:
            raise ValueError(f"budget: {self.budget!r} must be positive")

    def backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1 for the first), fully jittered."""
        ceiling = min(self.max_backoff, self.initial_backoff * 2 ** min(retry - 1, 32))
        return random.uniform(0, ceiling)


class Delivery:
    """The state of one emit call: the events still to deliver and those failed for good.

    Not thread-safe: one call's loop drives it. ``clock`` is for tests.
    """

    def __init__(
        self,
        emitter: str,
        events: Iterable[event_pb.Event],
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emitter = emitter
        self.policy = policy
        self.pending: list[event_pb.Event] = list(events)
        self.total = len(self.pending)
        self.attempts = 0
        # Counts for the gateway metrics: events delivered, failed, sent again.
        self.delivered = 0
        self.retried = 0
        self.address = ""
        self._order = {event.id: n for n, event in enumerate(self.pending) if event.id}
        self._clock = clock
        self._started = clock()
        self._failed: dict[str, pb.EmitError | None] = {}
        self._failed_unnamed = 0
        self._last: PluginError | None = None
        self._code = ""
        self._last_errors: dict[str, pb.EmitError] = {}

    # -- one attempt ---------------------------------------------------------------------

    def request(self) -> pb.EmitRequest:
        """The next attempt's request: every event not delivered yet."""
        self.attempts += 1
        return pb.EmitRequest(events=self.pending)

    def remaining(self) -> float:
        """Seconds left of the budget (an attempt's deadline is at most this)."""
        return max(0.0, self.policy.budget - (self._clock() - self._started))

    def answered(self, address: str, response: pb.EmitResponse) -> None:
        """The plugin answered: keep the retryable failures, fail the others for good."""
        self.address = address
        errors: dict[str, pb.EmitError] = {}
        final: set[str] = set()
        for error in response.errors:
            if not error.retryable:
                final.add(error.event_id)
            if error.event_id not in errors or not error.retryable:
                errors[error.event_id] = error  # a non-retryable one for an id wins
        failed = set(response.failed_event_ids) | set(errors)
        still: list[event_pb.Event] = []
        for event in self.pending:
            # An EmitError with an empty event_id stands for every event without an id.
            if event.id not in failed:
                self.delivered += 1
                continue
            explained = errors.get(event.id)
            if explained is not None and event.id not in final:
                still.append(event)
                self._last_errors[event.id] = explained
            else:
                self._fail(event, explained)
        self.pending = still
        self._code = ""
        if still:
            first = self._last_errors[still[0].id]
            self._last = PluginEmitError(
                f"{len(still)} event(s) failed retryably, e.g. {first.event_id!r}: {first.message}",
                address=address,
                emitter=self.emitter,
            )

    def unreachable(
        self, address: str, error: PluginConnectionError, code: str = "UNAVAILABLE"
    ) -> None:
        """No answer (``code``: how it failed): every event of the attempt is sent again."""
        self.address = address or self.address
        self._last = error
        self._code = code

    def refused(self, address: str, error: PluginEmitError) -> None:
        """An error status or an undecodable answer: the attempt's events fail for good."""
        self.address = address
        self._code = error.code
        for event in self.pending:
            self._fail(event, None)
        self.pending = []
        self._last = error

    # -- what next -----------------------------------------------------------------------

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt; None when there is none to make."""
        if not self.pending or self.attempts >= self.policy.max_attempts:
            return None
        delay = self.policy.backoff(self.attempts)
        if delay >= self.remaining():
            return None
        self.retried += len(self.pending)
        return delay

    @property
    def cause(self) -> PluginError | None:
        """The last failure seen (what the raised error is chained to)."""
        return self._last

    def error(self) -> PluginEmitError | None:
        """What the call raises: every event not delivered, by id; None when all were."""
        for event in self.pending:  # retries ran out
            self._fail(event, self._last_errors.get(event.id))
        self.pending = []
        failed = sorted(self._failed, key=self._order.__getitem__)
        if not failed and not self._failed_unnamed:
            return None
        last = self._last
        what = f"{len(failed) + self._failed_unnamed} of {self.total} event(s) not delivered"
        return PluginEmitError(
            f"emitter {self.emitter!r}: {what} after {self.attempts} attempt(s): {last}",
            failed_event_ids=failed,
            errors=[e for e in (self._failed[i] for i in failed) if e is not None],
            address=self.address,
            code=self._code,
            emitter=self.emitter,
        )

    def failed_count(self) -> int:
        """How many events failed for good so far (all of them once :meth:`error` ran)."""
        return len(self._failed) + self._failed_unnamed

    def _fail(self, event: event_pb.Event, error: pb.EmitError | None) -> None:
        if event.id:
            self._failed[event.id] = error
        else:
            self._failed_unnamed += 1
