"""A hub's emitters, and how it routes events to them by ``route_to``.

    routes = EmitterRoutes(resolver, EmitterSettings())
    routes.add(ExternalEmitter("audit", "127.0.0.1:9002"))   # static, before the hub is built
    result = await routes.emit_async(events)                 # an EmitResult

Each event goes to every emitter named in its ``route_to``, or to every emitter the
hub knows when ``route_to`` is empty. The emitters it knows: the static ones and, with
a resolver, every emitter name a registered plugin has (any status; one with no
HEALTHY instance fails its events like an unreachable one). Names in ``route_to``
that the hub does not know are ignored; an event none of whose names it knows (or any
event, when it knows no emitter at all) is **dropped**: counted in ``dropped``, in
the gateway metrics, and in the result, and sent nowhere.

The result (:class:`EmitResult`), not an exception, says how each emitter did, since
one event may go to several and each may fail apart from the others: ``failed`` maps
an emitter's name to the PluginEmitError it raised (``failed_event_ids``: exactly the
events it did not deliver).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from ingestor.breaker import BreakerSettings
from ingestor.connection import DEFAULT_CHANNELS_PER_ENDPOINT
from ingestor.delivery import DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_BATCH_EVENTS, RetryPolicy
from ingestor.emitter import DEFAULT_CONNECT_TIMEOUT, DEFAULT_EMIT_TIMEOUT, ExternalEmitter
from ingestor.errors import PluginEmitError, PluginError
from ingestor.metrics import gateway_metrics
from ingestor.resolver import RegistryResolver
from ingestor.view import ResolverView
from registry.wire import event_pb


@dataclass(frozen=True, slots=True)
class EmitResult:
    """What one ``hub.emit`` did.

    ``delivered``: for each emitter given events, how many it delivered.
    ``failed``: for each emitter that did not deliver all of them, its PluginEmitError
    (``failed_event_ids`` names the events). ``dropped_event_ids``: the events no
    emitter took (``dropped`` counts them, those without an id too).
    """

    delivered: Mapping[str, int] = field(default_factory=dict)
    failed: Mapping[str, PluginEmitError] = field(default_factory=dict)
    dropped: int = 0
    dropped_event_ids: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every emitter delivered every event it was given (drops aside)."""
        return not self.failed

    def failed_event_ids(self) -> dict[str, list[str]]:
        """The ids each failing emitter did not deliver, by emitter name."""
        return {name: list(error.failed_event_ids) for name, error in self.failed.items()}


@dataclass(frozen=True, slots=True)
class EmitterSettings:
    """How a hub makes the emitters it discovers through its resolver."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    emit_timeout: float = DEFAULT_EMIT_TIMEOUT
    retry: RetryPolicy | None = None
    breaker: BreakerSettings | None = None
    metrics: CollectorRegistry | None = None
    channels_per_endpoint: int = DEFAULT_CHANNELS_PER_ENDPOINT
    max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES


class EmitterRoutes:
    """The emitters of one hub (static and discovered) and the routing of events to them.

    Thread-safe; owns its emitters and closes them.
    """

    def __init__(self, resolver: RegistryResolver | None, settings: EmitterSettings) -> None:
        self.resolver = resolver
        self.settings = settings
        self._metrics = gateway_metrics(settings.metrics)
        self._lock = threading.Lock()
        self._static: dict[str, ExternalEmitter] = {}
        self._dynamic: dict[str, ExternalEmitter] = {}
        self._dropped = 0
        self._closed = False

    @property
    def dropped(self) -> int:
        """Events given to no emitter since the hub was made."""
        return self._dropped

    def add(self, emitter: ExternalEmitter) -> None:
        """Route ``emitter.emitter_name`` to ``emitter``.

        Raises:
            ValueError: another emitter already has that name.
        """
        with self._lock:
            if emitter.emitter_name in self._static:
                raise ValueError(f"emitter {emitter.emitter_name!r} is already added")
            self._static[emitter.emitter_name] = emitter

    def names(self) -> frozenset[str]:
        """The emitters it routes to now: static ones and, once synced, registered ones."""
        static = frozenset(self._static)
        view = None if self.resolver is None else self.resolver.view
        return static if view is None else static | view.emitter_names()

    # -- emitting ----------------------------------------------------------------------

    async def emit_async(self, events: Iterable[event_pb.Event]) -> EmitResult:
        """Route each event by ``route_to`` and emit it; every emitter at once.

        Raises:
            PluginConnectionError: the resolver had no view within its connect timeout.
            PluginError: closed (the hub, or an emitter or resolver of it).
        Cancellation cancels the emits in flight.
        """
        events = list(events)
        view = None
        if self.resolver is not None and events:
            view = self.resolver.view or await self.resolver.wait_synced_async(
                self.resolver.connect_timeout
            )
        batches, dropped = self._split(events, view)
        emitters = [(self._emitter(name), batch) for name, batch in batches.items()]
        outcomes = await asyncio.gather(
            *(emitter.emit_async(batch) for emitter, batch in emitters), return_exceptions=True
        )
        return self._result(batches, list(zip(batches, outcomes, strict=True)), dropped)

    def emit(self, events: Iterable[event_pb.Event]) -> EmitResult:
        """Synchronous :meth:`emit_async`: the emitters one after another, on this thread.

        Raises:
            As :meth:`emit_async`.
        """
        events = list(events)
        view = None
        if self.resolver is not None and events:
            view = self.resolver.view or self.resolver.wait_synced(self.resolver.connect_timeout)
        batches, dropped = self._split(events, view)
        outcomes: list[tuple[str, BaseException | None]] = []
        for name, batch in batches.items():
            try:
                self._emitter(name).emit(batch)
            except PluginEmitError as exc:
                outcomes.append((name, exc))
            else:
                outcomes.append((name, None))
        return self._result(batches, outcomes, dropped)

    def _split(
        self, events: list[event_pb.Event], view: ResolverView | None
    ) -> tuple[dict[str, list[event_pb.Event]], list[event_pb.Event]]:
        """Each known emitter's events (in the order given), and the events none takes."""
        if self._closed:
            raise PluginError("the hub is closed")
        static = self._static
        everyone = sorted(
            self.names() if view is None else frozenset(static) | view.emitter_names()
        )
        batches: dict[str, list[event_pb.Event]] = {}
        dropped: list[event_pb.Event] = []
        for event in events:
            if event.route_to:
                names = [
                    n
                    for n in dict.fromkeys(event.route_to)
                    if n in static or (view is not None and view.declares_emitter(n))
                ]
            else:
                names = everyone
            if not names:
                dropped.append(event)
            for name in names:
                batches.setdefault(name, []).append(event)
        if dropped:
            with self._lock:
                self._dropped += len(dropped)
            if self._metrics is not None:
                self._metrics.dropped(len(dropped))
        return batches, dropped

    def _result(
        self,
        batches: Mapping[str, list[event_pb.Event]],
        outcomes: list[tuple[str, BaseException | None]],
        dropped: list[event_pb.Event],
    ) -> EmitResult:
        delivered: dict[str, int] = {}
        failed: dict[str, PluginEmitError] = {}
        for name, outcome in outcomes:
            if isinstance(outcome, PluginEmitError):
                failed[name] = outcome
                lost = len(outcome.failed_event_ids)
                delivered[name] = len(batches[name]) - lost
            elif outcome is not None:
                raise outcome  # misuse (a closed emitter or resolver), or a cancellation
            else:
                delivered[name] = len(batches[name])
        return EmitResult(
            delivered=delivered,
            failed=failed,
            dropped=len(dropped),
            dropped_event_ids=tuple(e.id for e in dropped if e.id),
        )

    def _emitter(self, name: str) -> ExternalEmitter:
        emitter = self._static.get(name) or self._dynamic.get(name)
        if emitter is not None:
            return emitter
        assert self.resolver is not None  # only names the view declares get here
        with self._lock:
            if self._closed:
                raise PluginError("the hub is closed")
            emitter = self._dynamic.get(name)
            if emitter is None:
                settings = self.settings
                emitter = ExternalEmitter(
                    name,
                    resolver=self.resolver,
                    connect_timeout=settings.connect_timeout,
                    emit_timeout=settings.emit_timeout,
                    retry=settings.retry,
                    breaker=settings.breaker,
                    metrics=settings.metrics,
                    channels_per_endpoint=settings.channels_per_endpoint,
                    max_batch_events=settings.max_batch_events,
                    max_batch_bytes=settings.max_batch_bytes,
                )
                self._dynamic[name] = emitter
            return emitter

    # -- lifecycle ---------------------------------------------------------------------

    def shut(self) -> list[ExternalEmitter]:
        """Refuse further emits; every emitter, for the caller to close."""
        with self._lock:
            self._closed = True
            emitters = [*self._static.values(), *self._dynamic.values()]
            self._dynamic = {}
        return emitters
