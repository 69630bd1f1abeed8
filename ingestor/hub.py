"""``Hub``: routes each payload by ``ctx.source`` to the ingestor for that source.

hub = Hub().ingestor(ExternalIngestor("k8s", "127.0.0.1:9001")).build()
hub = Hub(resolver=RegistryResolver(registry)).build()   # every registered source
events = hub.ingest(IngestContext("k8s"), raw)
result = hub.ingest_with_errors(IngestContext("k8s"), raw)   # .events and .errors

And each event by its ``route_to`` to emitters (:mod:`ingestor.emit_routes`):

hub = Hub().emitter(ExternalEmitter("audit", "127.0.0.1:9002")).build()
outcome = hub.emit(events)    # an EmitResult: .failed by emitter, .dropped
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from ingestor import _loop
from ingestor._closing import Closing
from ingestor.answer import DEFAULT_MAX_EVENTS, DEFAULT_MAX_RESPONSE_BYTES, AnswerLimits
from ingestor.breaker import BreakerSettings
from ingestor.connection import DEFAULT_CHANNELS_PER_ENDPOINT, check_channels_per_endpoint
from ingestor.context import IngestContext
from ingestor.delivery import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_EVENTS,
    BatchLimits,
    RetryPolicy,
)
from ingestor.emit_routes import EmitResult, EmitterRoutes, EmitterSettings
from ingestor.emitter import DEFAULT_EMIT_TIMEOUT, ExternalEmitter
from ingestor.errors import PluginError
from ingestor.external import DEFAULT_CONNECT_TIMEOUT, DEFAULT_INGEST_TIMEOUT, ExternalIngestor
from ingestor.metrics import gateway_metrics
from ingestor.resolver import RegistryResolver
from ingestor.result import IngestResult
from ingestor.view import ResolverView
from registry.wire import event_pb


class Hub(Closing):
    """Source → ingestor routing: static ingestors first, then the registry's plugins.

    Add static ingestors with :meth:`ingestor`, then call :meth:`build`. With a
    ``resolver``, a source no static ingestor serves goes to the registered plugins
    declaring it, through an ExternalIngestor made on first use (with
    ``connect_timeout``, ``ingest_timeout``, ``breaker``, ``max_response_bytes``,
    ``max_events`` and ``channels_per_endpoint``).

    The hub owns its ingestors, static and dynamic, and closes them; it does not own
    ``resolver``. Thread rules as :class:`ExternalIngestor`.

    ``metrics``: a CollectorRegistry its dynamic ingestors report on, and the hub its
    payloads for no known source (:mod:`ingestor.metrics`); give static ingestors
    their own ``metrics``.

    Events go out through emitters: static ones added with :meth:`emitter` and, with
    a resolver, every emitter a registered plugin has (made on first use with
    ``connect_timeout``, ``emit_timeout``, ``retry``, ``breaker``, ``metrics``,
    ``channels_per_endpoint``, ``max_batch_events`` and ``max_batch_bytes``).
    :meth:`emit` sends each event to the emitters its ``route_to`` names (all of them
    when empty) and returns an :class:`~ingestor.emit_routes.EmitResult`; events no
    emitter takes are counted in :attr:`dropped` and the gateway metrics. The hub
    owns its emitters too: closing it calls their Shutdown and closes them.

    Raises (constructor):
        ValueError: a limit is out of range (``channels_per_endpoint``,
            ``max_batch_events`` and ``max_batch_bytes`` among them; the message names
            it), or ``metrics`` holds other families of the gateway's names.
    """

    def __init__(
        self,
        resolver: RegistryResolver | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        ingest_timeout: float = DEFAULT_INGEST_TIMEOUT,
        breaker: BreakerSettings | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_events: int = DEFAULT_MAX_EVENTS,
        metrics: CollectorRegistry | None = None,
        channels_per_endpoint: int = DEFAULT_CHANNELS_PER_ENDPOINT,
        emit_timeout: float = DEFAULT_EMIT_TIMEOUT,
        retry: RetryPolicy | None = None,
        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        self.resolver = resolver
        self.channels_per_endpoint = check_channels_per_endpoint(channels_per_endpoint)
        batch = BatchLimits(max_batch_events, max_batch_bytes)  # refused now, not at first use
        self.metrics = metrics
        self._metrics = gateway_metrics(metrics)
        self.connect_timeout = connect_timeout
        self.ingest_timeout = ingest_timeout
        self.breaker = breaker
        self.limits = AnswerLimits(max_response_bytes=max_response_bytes, max_events=max_events)
        self._lock = threading.Lock()
        self._static: dict[str, ExternalIngestor] = {}
        self._dynamic: dict[str, ExternalIngestor] = {}
        self._built = False
        self._closed = False
        self._emitters = EmitterRoutes(
            resolver,
            EmitterSettings(
                connect_timeout,
                emit_timeout,
                retry,
                breaker,
                metrics,
                self.channels_per_endpoint,
                batch.max_batch_events,
                batch.max_batch_bytes,
            ),
        )

    def ingestor(self, ingestor: ExternalIngestor) -> Hub:
        """Route ``ingestor.source`` to ``ingestor``; returns the hub (chainable).

        Raises:
            ValueError: another ingestor already serves that source.
            PluginError: the hub is already built.
        """
        with self._lock:
            if self._built:
                raise PluginError("the hub is built: add ingestors before build()")
            if ingestor.source in self._static:
                raise ValueError(f"source {ingestor.source!r} already has an ingestor")
            self._static[ingestor.source] = ingestor
        return self

    def emitter(self, emitter: ExternalEmitter) -> Hub:
        """Route events for ``emitter.emitter_name`` to ``emitter``; returns the hub.

        Raises:
            ValueError: another emitter already has that name.
            PluginError: the hub is already built.
        """
        with self._lock:
            if self._built:
                raise PluginError("the hub is built: add emitters before build()")
            self._emitters.add(emitter)
        return self

    def emitters(self) -> frozenset[str]:
        """The emitter names it routes to now: static ones and, once synced, registered ones."""
        return self._emitters.names()

    @property
    def dropped(self) -> int:
        """How many events :meth:`emit` gave to no emitter, since the hub was made."""
        return self._emitters.dropped

    async def emit_async(self, events: Iterable[event_pb.Event]) -> EmitResult:
        """Send each event to the emitters its ``route_to`` names (all when empty).

        Emitters are called concurrently, each with its own retries. Failures of an
        emitter are in the result (``failed``), not raised.

        Raises:
            PluginConnectionError: the resolver had no view within its connect timeout.
            PluginError: the hub is not built, or closed.
        Cancellation cancels the emits in flight.
        """
        self._check_usable()
        return await self._emitters.emit_async(events)

    def emit(self, events: Iterable[event_pb.Event]) -> EmitResult:
        """Synchronous :meth:`emit_async` (the emitters one after another, on this thread).

        Raises:
            PluginError: called on a thread whose event loop is running (use
                ``await hub.emit_async(events)`` there); and as :meth:`emit_async`.
        """
        _loop.refuse_inside_loop("Hub.emit", "hub.emit_async(events)")
        self._check_usable()
        return self._emitters.emit(events)

    def build(self) -> Hub:
        """Freeze the static routes; the hub routes from now on. Returns the hub."""
        with self._lock:
            self._built = True
        return self

    def sources(self) -> frozenset[str]:
        """The sources it routes now: static ones and, once synced, registered ones."""
        static = frozenset(self._static)
        view = None if self.resolver is None else self.resolver.view
        return static if view is None else static | view.sources()

    async def route_async(self, source: str) -> ExternalIngestor:
        """The ingestor for ``source`` (a dynamic one is made on first use).

        Raises:
            PluginError: no ingestor serves ``source`` and no registered plugin declares
                it, the hub is not built, or it is closed.
            PluginConnectionError: a resolver that never synced within its connect timeout.
        """
        self._check_usable()
        ingestor = self._static.get(source)
        if ingestor is not None:
            return ingestor
        resolver = self._resolver_for(source)
        view = resolver.view or await resolver.wait_synced_async(resolver.connect_timeout)
        return self._routed(source, resolver, view)

    def route(self, source: str) -> ExternalIngestor:
        """Synchronous :meth:`route_async` (on a thread without a running loop).

        Raises:
            As :meth:`route_async`; PluginError inside a running loop, when it would
            have to wait for the resolver's first snapshot.
        """
        self._check_usable()
        ingestor = self._static.get(source)
        if ingestor is not None:
            return ingestor
        resolver = self._resolver_for(source)
        view = resolver.view or resolver.wait_synced(resolver.connect_timeout)
        return self._routed(source, resolver, view)

    def _resolver_for(self, source: str) -> RegistryResolver:
        if self.resolver is None:
            raise PluginError(f"no ingestor for source {source!r} (the hub has no resolver)")
        return self.resolver

    def _routed(
        self, source: str, resolver: RegistryResolver, view: ResolverView
    ) -> ExternalIngestor:
        if not view.declares(source):
            raise PluginError(
                f"no ingestor for source {source!r}: none configured and no registered "
                f"plugin declares it (registry revision {view.revision})"
            )
        return self._dynamic_ingestor(source, resolver)

    async def ingest_async(self, ctx: IngestContext, data: bytes) -> list[event_pb.Event]:
        """Route ``data`` by ``ctx.source`` and ingest it; the events.

        Raises:
            As :meth:`ingest_with_errors_async`.
        Cancellation cancels the RPC in flight.
        """
        return (await self.ingest_with_errors_async(ctx, data)).events

    async def ingest_with_errors_async(self, ctx: IngestContext, data: bytes) -> IngestResult:
        """Route ``data`` by ``ctx.source`` and ingest it; the events and per-record errors.

        Raises:
            PluginError: no route for ``ctx.source`` (and as :meth:`route_async`).
            PluginConnectionError, PluginTransformError: as
                ExternalIngestor.ingest_with_errors_async.
        Cancellation cancels the RPC in flight.
        """
        self._check_usable()  # misuse is not counted as a payload without a route
        try:
            ingestor = await self.route_async(ctx.source)
        except PluginError as exc:
            if self._metrics is not None:
                self._metrics.unrouted(exc)
            raise
        return await ingestor.ingest_with_errors_async(ctx, data)

    def ingest(self, ctx: IngestContext, data: bytes) -> list[event_pb.Event]:
        """Synchronous :meth:`ingest_async`, on the caller's thread (any without a running loop).

        Raises:
            PluginError: called on a thread whose event loop is running (use
                ``await hub.ingest_async`` there); and as :meth:`ingest_async`.
        """
        return self._ingest_sync(ctx, data, "ingest").events

    def ingest_with_errors(self, ctx: IngestContext, data: bytes) -> IngestResult:
        """Synchronous :meth:`ingest_with_errors_async` (thread rules as :meth:`ingest`).

        Raises:
            PluginError: called on a thread whose event loop is running (use
                ``await hub.ingest_with_errors_async`` there); and as
                :meth:`ingest_with_errors_async`.
        """
        return self._ingest_sync(ctx, data, "ingest_with_errors")

    def _ingest_sync(self, ctx: IngestContext, data: bytes, method: str) -> IngestResult:
        _loop.refuse_inside_loop(f"Hub.{method}", f"hub.{method}_async(ctx, data)")
        self._check_usable()  # misuse is not counted as a payload without a route
        try:
            ingestor = self.route(ctx.source)
        except PluginError as exc:
            if self._metrics is not None:
                self._metrics.unrouted(exc)
            raise
        return ingestor.ingest_with_errors(ctx, data)

    def close(self) -> None:
        """Close every ingestor and emitter of the hub (Shutdown on emitters). Idempotent."""
        for ingestor in self._shut():
            ingestor.close()
        for emitter in self._emitters.shut():
            emitter.close()

    async def aclose(self) -> None:
        """Close every ingestor and emitter of the hub, waiting for them. Idempotent."""
        await asyncio.gather(*(ingestor.aclose() for ingestor in self._shut()))
        await asyncio.gather(*(emitter.aclose() for emitter in self._emitters.shut()))

    def _check_usable(self) -> None:
        if self._closed:
            raise PluginError("the hub is closed")
        if not self._built:
            raise PluginError("the hub is not built: call build() before routing")

    def _dynamic_ingestor(self, source: str, resolver: RegistryResolver) -> ExternalIngestor:
        ingestor = self._dynamic.get(source)
        if ingestor is not None:
            return ingestor
        with self._lock:
            if self._closed:
                raise PluginError("the hub is closed")
            ingestor = self._dynamic.get(source)
            if ingestor is None:
                ingestor = ExternalIngestor(
                    source,
                    resolver=resolver,
                    connect_timeout=self.connect_timeout,
                    ingest_timeout=self.ingest_timeout,
                    breaker=self.breaker,
                    max_response_bytes=self.limits.max_response_bytes,
                    max_events=self.limits.max_events,
                    metrics=self.metrics,
                    channels_per_endpoint=self.channels_per_endpoint,
                )
                self._dynamic[source] = ingestor
            return ingestor

    def _shut(self) -> list[ExternalIngestor]:
        with self._lock:
            self._closed = True
            ingestors = [*self._static.values(), *self._dynamic.values()]
            self._dynamic = {}
        return ingestors
