"""How one ``emit`` call delivers its events: what is resent, when, and what failed.

    emission = Emission("audit", events, RetryPolicy(), BatchLimits())
    for delivery in emission.deliveries():      # one EmitRequest's events, in order
        deliver(delivery)                       # the loop below
    error = emission.error()                    # PluginEmitError, or None: all delivered

A call's events go out in requests of at most ``max_batch_events`` events and
``max_batch_bytes`` encoded bytes (:class:`BatchLimits`), in the order given, one
request after another; a plugin refuses a request over its receive limit (gRPC's
default: 4 MiB) whole. An event whose own encoding passes ``max_batch_bytes`` is never
sent: it fails at once, named in the error with an ``EmitError`` saying so, and the
other events still go. Each request is a :class:`Delivery` of its own, with its own
attempts; the budget is the call's: a request not started within it is not sent, and
its events fail as unreachable (so a call takes at most the budget and one attempt):

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ingestor.errors import PluginConnectionError, PluginEmitError, PluginError
from registry.wire import event_pb, pb

DEFAULT_MAX_ATTEMPTS = 4
DEFAULT_INITIAL_BACKOFF = 0.1
DEFAULT_MAX_BACKOFF = 2.0
DEFAULT_RETRY_BUDGET = 60.0
DEFAULT_MAX_BATCH_EVENTS = 1_000
# gRPC's default receive limit is 4 MiB (4,194,304 bytes): leave room for the envelope.
DEFAULT_MAX_BATCH_BYTES = 4_000_000
MAX_BATCH_EVENTS = 100_000
MIN_BATCH_BYTES = 1024
MAX_BATCH_BYTES = 64 * 1024 * 1024


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


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How large one EmitRequest may be, in events and in encoded bytes.

    ``max_batch_events``: 1 to 100,000 (default 1,000). ``max_batch_bytes``: 1 KiB to
    64 MiB (default 4,000,000: gRPC's default receive limit of 4 MiB, less a margin).

    Raises (constructor):
        ValueError: a limit that is not an int in its range (the message names it).
    """

    max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES

    def __post_init__(self) -> None:
        _check_range("max_batch_events", self.max_batch_events, 1, MAX_BATCH_EVENTS)
        _check_range("max_batch_bytes", self.max_batch_bytes, MIN_BATCH_BYTES, MAX_BATCH_BYTES)


def _check_range(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: {value!r} is out of range (an int, {low:,} to {high:,})")


def encoded_size(event: event_pb.Event) -> int:
    """The bytes ``event`` adds to an EmitRequest: a tag, its length, the event itself."""
    return _with_envelope(event.ByteSize())


def _with_envelope(size: int) -> int:
    # The field's one-byte tag and the varint of its length (under 128: one byte).
    return size + 2 if size < 128 else size + 1 + (size.bit_length() + 6) // 7


class Emission:
    """The state of one emit call: its events split into requests, each a :class:`Delivery`.

    :meth:`deliveries` makes each request's Delivery when the one before is done; all
    share the call's budget, counted from the call's start. Not thread-safe: one call
    drives it.
    """

    def __init__(
        self,
        emitter: str,
        events: Iterable[event_pb.Event],
        policy: RetryPolicy,
        limits: BatchLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emitter = emitter
        self.policy = policy
        self.limits = limits
        self.events = list(events)
        self.total = len(self.events)
        self.batches, self.oversized = _split(self.events, limits)
        self.sent: list[Delivery] = []
        self._clock = clock
        self._started = clock()

    def deliveries(self) -> Iterator[Delivery]:
        """A Delivery for each request in turn (drive each to its end before the next)."""
        for batch in self.batches:
            delivery = Delivery(
                self.emitter, batch, self.policy, clock=self._clock, started=self._started
            )
            self.sent.append(delivery)
            if delivery.remaining() <= 0:
                why = f"the retry budget ({self.policy.budget:g} s) ran out before it was sent"
                delivery.unreachable("", PluginConnectionError(f"emitter {self.emitter!r}: {why}"))
                continue
            yield delivery

    @property
    def delivered(self) -> int:
        return sum(d.delivered for d in self.sent)

    @property
    def retried(self) -> int:
        return sum(d.retried for d in self.sent)

    def error(self) -> PluginEmitError | None:
        """What the call raises: every event not delivered, by id, in the order given."""
        failing = [(d, e) for d in self.sent if (e := d.error()) is not None]
        if not self.oversized and len(self.sent) <= 1:
            return failing[0][1] if failing else None  # one request: its own error, as is
        if not failing and not self.oversized:
            return None
        failed: dict[str, None] = {}
        explained: dict[str, pb.EmitError] = {}
        for _, error in failing:
            failed.update(dict.fromkeys(error.failed_event_ids))
            for emit_error in error.errors:
                explained.setdefault(emit_error.event_id, emit_error)
        limit = self.limits.max_batch_bytes
        for event, size in self.oversized:
            if event.id:
                failed[event.id] = None
                explained[event.id] = pb.EmitError(
                    event_id=event.id,
                    message=f"{size} bytes encoded, over max_batch_bytes ({limit}): not sent",
                    retryable=False,
                )
        order = {event.id: n for n, event in enumerate(self.events) if event.id}
        ids = sorted(failed, key=order.__getitem__)
        count = sum(d.failed_count() for d in self.sent) + len(self.oversized)
        what = f"{count} of {self.total} event(s) not delivered"
        if self.oversized:
            event, size = self.oversized[0]
            what += (
                f"; {len(self.oversized)} over max_batch_bytes ({limit}) not sent, e.g. "
                f"{event.id!r} of {size} bytes"
            )
        last, last_error = failing[-1] if failing else (None, None)
        if last is not None:
            what += (
                f"; {len(failing)} of {len(self.sent)} request(s) failed, the last after "
                f"{last.attempts} attempt(s): {last.cause}"
            )
        return PluginEmitError(
            f"emitter {self.emitter!r}: {what}",
            failed_event_ids=ids,
            errors=[explained[i] for i in ids if i in explained],
            address=last_error.address if last_error is not None else "",
            code=last_error.code if last_error is not None else "",
            emitter=self.emitter,
        )

    @property
    def cause(self) -> PluginError | None:
        """The last failure of the last request that lost events (what the error chains)."""
        for delivery in reversed(self.sent):
            if delivery.failed_count() or delivery.pending:
                return delivery.cause
        return None


def _split(
    events: list[event_pb.Event], limits: BatchLimits
) -> tuple[list[list[event_pb.Event]], list[tuple[event_pb.Event, int]]]:
    """The requests' events, in order, within ``limits``; and the events too big to send."""
    batches: list[list[event_pb.Event]] = []
    oversized: list[tuple[event_pb.Event, int]] = []
    batch: list[event_pb.Event] = []
    size = 0
    for event in events:
        cost = encoded_size(event)
        if cost > limits.max_batch_bytes:
            oversized.append((event, cost))
            continue
        if batch and (
            len(batch) >= limits.max_batch_events or size + cost > limits.max_batch_bytes
        ):
            batches.append(batch)
            batch, size = [], 0
        batch.append(event)
        size += cost
    if batch:
        batches.append(batch)
    return batches, oversized


class Delivery:
    """One request of an emit call: the events still to deliver and those failed for good.

    Not thread-safe: one call's loop drives it. ``clock`` is for tests; ``started``
    (on ``clock``) is when the call's budget began, by default now.
    """

    def __init__(
        self,
        emitter: str,
        events: Iterable[event_pb.Event],
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        started: float | None = None,
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
        self._started = clock() if started is None else started  # the budget's start
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
