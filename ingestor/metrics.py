"""Prometheus metrics of the gateway side (SPEC §9), on a registry the caller passes.

    metrics = CollectorRegistry()
    resolver = RegistryResolver("127.0.0.1:50051", metrics=metrics)
    hub = Hub(resolver=resolver, metrics=metrics).build()
    start_http_server(9100, registry=metrics)   # served however the caller likes

Every component given the same :class:`~prometheus_client.CollectorRegistry` shares one
:class:`GatewayMetrics` (made on first use, forgotten with the registry), so any
number of ingestors, hubs and resolvers report into the same families:

- ``polku_gateway_ingest_duration_seconds{source, result}``: each ingest call, from
  resolution to answer (a retry on another instance included); ``result`` is ``ok`` or
  ``error``.
- ``polku_gateway_ingest_errors_total{source, kind}``: ``unreachable`` (no instance
  could be reached), ``status`` (the plugin answered an error status), ``no_events``
  (only per-record errors), ``refused`` (an answer over the limits, or undecodable),
  ``other`` (a closed ingestor), ``record`` (each per-record error a plugin reported
  next to events); and from a hub, ``no_route`` and ``unreachable`` with an empty
  ``source`` (a source nobody serves is not a label: the caller's data chose it).
- ``polku_gateway_emit_events_total{emitter, outcome}``: events through an
  ``ExternalEmitter``: ``emitted`` (delivered), ``failed`` (named in the
  PluginEmitError it raised), ``retried`` (each resend of an event counts once).
- ``polku_gateway_dropped_events_total``: events a hub's ``emit`` gave to no emitter
  (none named in ``route_to`` exists; no label: the event's data chose the names).
- ``polku_gateway_breaker_state{source, endpoint}``: 0 closed, 1 half-open, 2 open, for
  each endpoint an ingestor has called, read at scrape time.
- ``polku_gateway_emitter_breaker_state{emitter, endpoint}``: the same, for each
  endpoint an ``ExternalEmitter`` has called.
- ``polku_gateway_resolver_staleness_seconds{registry}``: seconds since a live Watch
  last confirmed a resolver's view (``+Inf`` before its first snapshot), read at scrape.

Thread-safe: calls are counted on whatever loop runs them, scrapes read on theirs.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from ingestor.breaker import BreakerState
from ingestor.context import IngestContext
from ingestor.errors import PluginConnectionError, PluginError, PluginTransformError
from ingestor.result import IngestResult
from registry.metrics import LATENCY_BUCKETS as REGISTRY_BUCKETS

PREFIX = "polku_gateway_"
# The registry's buckets, and one more: an ingest may wait out a long deadline.
LATENCY_BUCKETS = (*REGISTRY_BUCKETS, 30.0)
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class _Ingests(Protocol):
    """What :func:`measured` needs of an ingestor."""

    source: str
    gateway_metrics: GatewayMetrics | None


class _Breakers(Protocol):
    source: str

    def breaker_states(self) -> dict[str, BreakerState]: ...


class _EmitterBreakers(Protocol):
    emitter_name: str

    def breaker_states(self) -> dict[str, BreakerState]: ...


class _Resolves(Protocol):
    address: str

    @property
    def staleness(self) -> float: ...


class GatewayMetrics:
    """The gateway families on one CollectorRegistry; get it with :func:`gateway_metrics`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register the families on ``registry``.

        Raises:
            ValueError: ``registry`` already holds a family of the same name.
        """
        self.ingest_seconds = Histogram(
            PREFIX + "ingest_duration_seconds",
            "Ingest calls through the gateway, by source and result (ok, error).",
            ["source", "result"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            PREFIX + "ingest_errors",
            "Ingest failures by source and kind (unreachable, status, no_events, refused, "
            "other, no_route), and per-record errors reported next to events (record).",
            ["source", "kind"],
            registry=registry,
        )
        self.emit_events = Counter(
            PREFIX + "emit_events",
            "Events through emitters, by emitter and outcome (emitted, failed, retried).",
            ["emitter", "outcome"],
            registry=registry,
        )
        self.dropped_events = Counter(
            PREFIX + "dropped_events",
            "Events a hub routed to no emitter (no emitter named in route_to exists).",
            registry=registry,
        )
        self._lock = threading.Lock()
        self._ingestors: weakref.WeakSet[_Breakers] = weakref.WeakSet()
        self._emitters: weakref.WeakSet[_EmitterBreakers] = weakref.WeakSet()
        self._resolvers: weakref.WeakSet[_Resolves] = weakref.WeakSet()
        registry.register(_Live(self))

    # -- what components tell it -----------------------------------------------------------

    def add_ingestor(self, ingestor: _Breakers) -> None:
        """Report ``ingestor``'s breakers at scrapes until :meth:`forget` (or it is gone)."""
        with self._lock:
            self._ingestors.add(ingestor)

    def add_emitter(self, emitter: _EmitterBreakers) -> None:
        """Report ``emitter``'s breakers at scrapes until :meth:`forget` (or it is gone)."""
        with self._lock:
            self._emitters.add(emitter)

    def add_resolver(self, resolver: _Resolves) -> None:
        """Report ``resolver``'s staleness at scrapes until :meth:`forget` (or it is gone)."""
        with self._lock:
            self._resolvers.add(resolver)

    def forget(self, component: object) -> None:
        """Stop reporting a closed ingestor, emitter or resolver."""
        with self._lock:
            self._ingestors.discard(component)  # type: ignore[arg-type]
            self._emitters.discard(component)  # type: ignore[arg-type]
            self._resolvers.discard(component)  # type: ignore[arg-type]

    def ingested(self, source: str, seconds: float, result: IngestResult) -> None:
        self.ingest_seconds.labels(source, "ok").observe(seconds)
        if result.errors:
            self.errors.labels(source, "record").inc(len(result.errors))

    def failed(self, source: str, seconds: float, error: PluginError) -> None:
        self.ingest_seconds.labels(source, "error").observe(seconds)
        self.errors.labels(source, error_kind(error)).inc()

    def emitted(self, emitter: str, delivered: int, failed: int, retried: int) -> None:
        """One emit call's counts of events: delivered, failed for good, sent again."""
        for outcome, count in (("emitted", delivered), ("failed", failed), ("retried", retried)):
            if count:
                self.emit_events.labels(emitter, outcome).inc(count)

    def dropped(self, count: int) -> None:
        """A hub gave ``count`` events to no emitter."""
        if count:
            self.dropped_events.inc(count)

    def unrouted(self, error: PluginError) -> None:
        """A hub found no ingestor for a payload (no source label: the data chose it)."""
        kind = "unreachable" if isinstance(error, PluginConnectionError) else "no_route"
        self.errors.labels("", kind).inc()

    # -- what a scrape reads -------------------------------------------------------------

    def components(self) -> tuple[list[_Breakers], list[_EmitterBreakers], list[_Resolves]]:
        with self._lock:
            return list(self._ingestors), list(self._emitters), list(self._resolvers)


def error_kind(error: PluginError) -> str:
    """The ``kind`` label of an ingest failure."""
    if isinstance(error, PluginConnectionError):
        return "unreachable"
    if isinstance(error, PluginTransformError):
        if error.code:
            return "status"
        return "no_events" if error.errors else "refused"
    return "other"


class _Live:
    """Breaker states and resolver staleness, read at scrape time (a custom collector)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = weakref.ref(metrics)

    def describe(self) -> Iterable[Metric]:
        return list(_families())

    def collect(self) -> Iterable[Metric]:
        breakers, emitter_breakers, staleness = _families()
        metrics = self._metrics()
        ingestors, emitters, resolvers = (
            metrics.components() if metrics is not None else ([], [], [])
        )
        _add_breakers(breakers, [(i.source, i.breaker_states()) for i in ingestors])
        _add_breakers(emitter_breakers, [(e.emitter_name, e.breaker_states()) for e in emitters])
        ages: dict[str, float] = {}
        for resolver in resolvers:
            # Several resolvers of one registry: the freshest view stands for it.
            ages[resolver.address] = min(
                ages.get(resolver.address, float("inf")), resolver.staleness
            )
        for address, age in sorted(ages.items()):
            staleness.add_metric([address], age)
        return [breakers, emitter_breakers, staleness]


def _add_breakers(
    family: GaugeMetricFamily, clients: list[tuple[str, dict[str, BreakerState]]]
) -> None:
    states: dict[tuple[str, str], int] = {}
    for name, breakers in clients:
        for endpoint, state in breakers.items():
            key = (name, endpoint)
            # Two clients of one name may call one endpoint: the worse state shows.
            states[key] = max(states.get(key, 0), BREAKER_VALUES[state])
    for (name, endpoint), number in sorted(states.items()):
        family.add_metric([name, endpoint], number)


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (
        GaugeMetricFamily(
            PREFIX + "breaker_state",
            "Circuit breaker of each endpoint an ingestor called: 0 closed, 1 half-open, 2 open.",
            labels=["source", "endpoint"],
        ),
        GaugeMetricFamily(
            PREFIX + "emitter_breaker_state",
            "Circuit breaker of each endpoint an emitter called: 0 closed, 1 half-open, 2 open.",
            labels=["emitter", "endpoint"],
        ),
        GaugeMetricFamily(
            PREFIX + "resolver_staleness_seconds",
            "Seconds since a live Watch confirmed the resolver's view (+Inf before any).",
            labels=["registry"],
        ),
    )


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, GatewayMetrics] = (
    weakref.WeakKeyDictionary()
)


def gateway_metrics(registry: CollectorRegistry | None) -> GatewayMetrics | None:
    """The :class:`GatewayMetrics` of ``registry`` (made on first use); None for None.

    Raises:
        ValueError: ``registry`` holds a family of the same name that is not ours.
    """
    if registry is None:
        return None
    with _lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = _by_registry[registry] = GatewayMetrics(registry)
        return metrics


Ingestor = TypeVar("Ingestor", bound=_Ingests)
IngestCall = Callable[[Ingestor, IngestContext, bytes], Coroutine[Any, Any, IngestResult]]


def measured(method: IngestCall[Ingestor]) -> IngestCall[Ingestor]:
    """An ingestor's ingest method, timed and its failures counted when it has metrics."""

    @functools.wraps(method)
    async def ingest(self: Ingestor, ctx: IngestContext, data: bytes) -> IngestResult:
        metrics = self.gateway_metrics
        if metrics is None:
            return await method(self, ctx, data)
        started = time.perf_counter()
        try:
            result = await method(self, ctx, data)
        except PluginError as exc:
            metrics.failed(self.source, time.perf_counter() - started, exc)
            raise
        metrics.ingested(self.source, time.perf_counter() - started, result)
        return result

    return ingest


SyncIngestCall = Callable[[Ingestor, IngestContext, bytes], IngestResult]


def measured_sync(method: SyncIngestCall[Ingestor]) -> SyncIngestCall[Ingestor]:
    """:func:`measured` for a synchronous ingest method."""

    @functools.wraps(method)
    def ingest(self: Ingestor, ctx: IngestContext, data: bytes) -> IngestResult:
        metrics = self.gateway_metrics
        if metrics is None:
            return method(self, ctx, data)
        started = time.perf_counter()
        try:
            result = method(self, ctx, data)
        except PluginError as exc:
            metrics.failed(self.source, time.perf_counter() - started, exc)
            raise
        metrics.ingested(self.source, time.perf_counter() - started, result)
        return result

    return ingest
