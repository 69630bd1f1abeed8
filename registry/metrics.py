"""Prometheus metrics of the registry (SPEC §9): what it holds, what changes, what it serves.

    metrics = RegistryMetrics()                      # its own CollectorRegistry
    server = grpc.aio.server(interceptors=[metrics.interceptor, ...])
    metrics.track(state, hub, leader=lambda: (True, 0))
    port = await metrics.serve("127.0.0.1:9090")     # GET /metrics, Prometheus text
    await metrics.close()

Every family is on the object's own :class:`~prometheus_client.CollectorRegistry`, never
prometheus_client's global one, so several registries in one process never collide.
Labels are bounded: service and method names, status codes, plugin statuses and types,
never a plugin's name, id or address (the endpoint has no authentication; it tells
counts only).

Values come in three ways:

- from the state's committed changes (a listener, on the event loop): registrations,
  removals, status changes from → to, and plugins by status and type, kept per id in a
  map bounded by the catalogue. Every replica counts the changes it applies.
- from hooks the components call: heartbeats (the servicer), Health calls (the
  checker's ``on_check``), commits (the journal's ``on_write``), and every RPC
  (:class:`MetricsInterceptor`, one server interceptor).
- read at scrape time, on the HTTP server's thread: the revision, watchers and watch
  messages, leadership. Only single attributes and copies made under a lock are read
  there, never a structure the event loop is changing.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from registry.errors import RegistryError
from registry.interception import WrappingInterceptor, handler_parts
from registry.model import Change, Plugin, PluginStatus, PluginType
from registry.settings import split_listen

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from registry.state import RegistryState
    from registry.watch import WatchHub

PREFIX = "polku_registry_"
# Seconds: from a fast local call to a Health call at its default 2 s timeout and beyond.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)

Leadership = Callable[[], tuple[bool, int]]
_Key = tuple[PluginStatus, PluginType]


def _label(value: PluginStatus | PluginType) -> str:
    return value.name.lower()


class RegistryMetrics:
    """The registry's metric families, the hooks that feed them, and the HTTP endpoint.

    Thread rules: :meth:`track`, :meth:`serve` and :meth:`close` are called on the
    server's event loop; the hooks (:meth:`heartbeat`, :meth:`health_checked`,
    :meth:`committed`) on it too; scrapes run on the HTTP server's thread.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        on = self.registry
        self.registrations = Counter(
            PREFIX + "registrations", "Plugin instances registered (new ids).", registry=on
        )
        self.removals = Counter(
            PREFIX + "removals",
            "Plugin instances removed, by their last status "
            "(expired: reaped after deregister_after; others: unregistered).",
            ["status"],
            registry=on,
        )
        self.heartbeats = Counter(
            PREFIX + "heartbeats", "Heartbeats answered.", ["acknowledged"], registry=on
        )
        self.status_changes = Counter(
            PREFIX + "status_changes", "Status changes of plugins.", ["from", "to"], registry=on
        )
        self.health_checks = Histogram(
            PREFIX + "health_check_duration_seconds",
            "Health calls to plugins (one call serves every registration at an address), "
            "by result: healthy, unhealthy (answered so), failed (no answer).",
            ["result"],
            buckets=LATENCY_BUCKETS,
            registry=on,
        )
        self.commit_seconds = Histogram(
            PREFIX + "commit_duration_seconds",
            "Group commits to the database.",
            buckets=LATENCY_BUCKETS,
            registry=on,
        )
        self.commit_batch = Histogram(
            PREFIX + "commit_batch_size",
            "Records one group commit wrote: plugins (whole, lease-only, removed) and "
            "ownership records.",
            buckets=BATCH_BUCKETS,
            registry=on,
        )
        self.rpcs = Counter(
            PREFIX + "rpcs",
            "RPCs handled, by service, method and status code.",
            ["service", "method", "code"],
            registry=on,
        )
        self.rpc_seconds = Histogram(
            PREFIX + "rpc_duration_seconds",
            "Time from an RPC's start to its end (a Watch stream: its whole life).",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=on,
        )
        self._acknowledged = self.heartbeats.labels("true")
        self._refused = self.heartbeats.labels("false")
        self.catalogue = _Catalogue(self)
        self._live = _Live(self.catalogue)
        on.register(self._live)
        self.interceptor = MetricsInterceptor(self)
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    # -- wiring ------------------------------------------------------------------------

    def track(self, state: RegistryState, hub: WatchHub, leader: Leadership) -> None:
        """Follow ``state`` from its view now on, and read ``hub`` and ``leader`` at scrapes.

        Call it once the state has loaded its catalogue, with no await between that
        and this: the view is counted now, every later change from its listener.
        ``leader()`` says ``(leading, epoch)``.
        """
        self.catalogue.follow(state)
        self._live.state = state
        self._live.hub = hub
        self._live.leader = leader

    async def serve(self, listen: str) -> int:
        """Serve ``/metrics`` (Prometheus text) on ``listen`` (``host:port``) from a thread.

        Returns the port bound (the real one for port 0).

        Raises:
            RegistryError: the address cannot be bound (the message names it).
        """
        if self._http is not None:
            return self.port
        try:
            host, port = split_listen(listen)
            # Binding (and resolving the host) blocks: not on the loop.
            self._http = await asyncio.to_thread(
                start_http_server, port, host or "0.0.0.0", self.registry
            )
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise RegistryError(f"cannot serve metrics on {listen}: {why}") from exc
        return self.port

    @property
    def port(self) -> int:
        """The port ``/metrics`` is served on; 0 when it is not."""
        return int(self._http[0].server_port) if self._http is not None else 0

    async def close(self) -> None:
        """Stop the HTTP endpoint and its thread. Idempotent; safe before :meth:`serve`."""
        http, self._http = self._http, None
        if http is not None:
            await asyncio.to_thread(_shut_down, *http)

    # -- hooks -------------------------------------------------------------------------

    def heartbeat(self, acknowledged: bool) -> None:
        """A Heartbeat was answered (``acknowledged`` or not)."""
        (self._acknowledged if acknowledged else self._refused).inc()

    def health_checked(self, seconds: float, result: str) -> None:
        """A Health call ended: ``healthy``, ``unhealthy`` or ``failed``."""
        self.health_checks.labels(result).observe(seconds)

    def committed(self, seconds: float, records: int) -> None:
        """A group commit wrote ``records`` records in ``seconds``."""
        self.commit_seconds.observe(seconds)
        self.commit_batch.observe(records)


def _shut_down(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()  # waits for serve_forever to return (its poll interval: 0.5 s)
    server.server_close()
    thread.join(5.0)


class _Catalogue:
    """Plugins by status and type, and what changed between commits: a state listener.

    ``_seen`` maps every plugin id of the view to its status and type (bounded by the
    catalogue); the loop changes it, a scrape reads ``counts()``, a copy made under
    the lock.
    """

    def __init__(self, metrics: RegistryMetrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._state: RegistryState | None = None
        self._view: object = None
        self._seen: dict[str, _Key] = {}
        self._counts: collections.Counter[_Key] = collections.Counter()

    def follow(self, state: RegistryState) -> None:
        self._state = state
        self._rebuild()
        state.subscribe(self.on_changes, on_reset=self._rebuild)

    def counts(self) -> dict[_Key, int]:
        with self._lock:
            return dict(self._counts)

    def on_changes(self, changes: list[Change]) -> None:
        state = self._state
        if state is not None and state.view is not self._view:
            # Reloaded without a reset notice: count the new view; its events are lost.
            self._rebuild()
            return
        metrics = self._metrics
        with self._lock:
            seen, counts = self._seen, self._counts
            for change in changes:
                for plugin in change.upserted:
                    key = _key(plugin)
                    old = seen.get(plugin.plugin_id)
                    if old is None:
                        metrics.registrations.inc()
                    elif old[0] is not key[0]:
                        metrics.status_changes.labels(_label(old[0]), _label(key[0])).inc()
                    if old != key:
                        if old is not None:
                            counts[old] -= 1
                        counts[key] += 1
                        seen[plugin.plugin_id] = key
                for plugin in change.removed:
                    gone = seen.pop(plugin.plugin_id, None)
                    if gone is not None:
                        counts[gone] -= 1
                        metrics.removals.labels(_label(gone[0])).inc()

    def _rebuild(self) -> None:
        """Count the view whole (at start, and after the catalogue was reloaded)."""
        state = self._state
        if state is None:
            return
        view = state.view
        seen = {plugin.plugin_id: _key(plugin) for plugin in view}
        counts = collections.Counter(seen.values())
        with self._lock:
            self._view, self._seen, self._counts = view, seen, counts


def _key(plugin: Plugin) -> _Key:
    return plugin.status, plugin.registration.type


class _Live:
    """The families read at scrape time (a prometheus_client custom collector)."""

    def __init__(self, catalogue: _Catalogue) -> None:
        self._catalogue = catalogue
        self.state: RegistryState | None = None
        self.hub: WatchHub | None = None
        self.leader: Leadership | None = None

    def describe(self) -> Iterable[Metric]:
        # The names only, so registering never runs collect().
        return [family for family, _ in self._families()]

    def collect(self) -> Iterable[Metric]:
        return [family for family, fill in self._families() if fill(family)]

    def _families(self) -> list[tuple[Metric, Callable[[Any], bool]]]:
        """Each family and what fills it in at a scrape (False: leave it out)."""
        return [
            (
                GaugeMetricFamily(
                    PREFIX + "plugins",
                    "Plugin instances in the catalogue, by status and type.",
                    labels=["status", "type"],
                ),
                self._plugins,
            ),
            (
                GaugeMetricFamily(
                    PREFIX + "revision", "The catalogue's revision (this replica's)."
                ),
                self._revision,
            ),
            (GaugeMetricFamily(PREFIX + "watchers", "Watch streams open now."), self._watchers),
            (
                CounterMetricFamily(PREFIX + "watch_messages", "Messages sent on Watch streams."),
                self._messages,
            ),
            (
                GaugeMetricFamily(
                    PREFIX + "leader", "1 while this replica leads (writes), else 0."
                ),
                self._leading,
            ),
            (
                GaugeMetricFamily(
                    PREFIX + "leader_epoch", "The leader epoch this replica saw last (0 on SQLite)."
                ),
                self._epoch,
            ),
        ]

    def _plugins(self, family: GaugeMetricFamily) -> bool:
        counts = self._catalogue.counts()
        # Every status and type, 0 included, so each series exists from the start.
        for status in PluginStatus:
            for plugin_type in (PluginType.INGESTOR, PluginType.EMITTER):
                counts.setdefault((status, plugin_type), 0)
        for (status, plugin_type), count in sorted(counts.items()):
            if status is not PluginStatus.UNSPECIFIED or count:
                family.add_metric([_label(status), _label(plugin_type)], count)
        return True

    def _revision(self, family: GaugeMetricFamily) -> bool:
        if self.state is not None:
            family.add_metric([], self.state.view.revision)
        return self.state is not None

    def _watchers(self, family: GaugeMetricFamily) -> bool:
        if self.hub is not None:
            family.add_metric([], self.hub.watchers)
        return self.hub is not None

    def _messages(self, family: CounterMetricFamily) -> bool:
        if self.hub is not None:
            family.add_metric([], self.hub.messages_sent)
        return self.hub is not None

    def _leading(self, family: GaugeMetricFamily) -> bool:
        if self.leader is not None:
            family.add_metric([], 1 if self.leader()[0] else 0)
        return self.leader is not None

    def _epoch(self, family: GaugeMetricFamily) -> bool:
        if self.leader is not None:
            family.add_metric([], self.leader()[1])
        return self.leader is not None


class MetricsInterceptor(WrappingInterceptor):
    """Counts every RPC by service, method and status code, and times it.

    Put it first among the server's interceptors, so that it also sees the calls the
    others refuse. Only methods the server has a handler for are counted (an unknown
    method is answered UNIMPLEMENTED by grpc itself, before any interceptor's handler),
    so the labels stay bounded by the services served. Async handlers only (as every
    ``grpc.aio`` servicer's); another kind is passed through uncounted.
    """

    def __init__(self, metrics: RegistryMetrics) -> None:
        super().__init__()
        self._rpcs = metrics.rpcs
        self._seconds = metrics.rpc_seconds

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        factory, behaviour = handler_parts(handler)
        service, _, name = method.lstrip("/").rpartition("/")
        timed = self._timed(_Ended(self._rpcs, self._seconds, service, name), behaviour)
        if timed is None:
            return handler
        return factory(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    @staticmethod
    def _timed(ended: _Ended, behaviour: Callable[..., Any]) -> Callable[..., Any] | None:
        """``behaviour`` reporting its end to ``ended``, of the same kind (coroutine or gen)."""
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                responses = behaviour(request, context)
                failure: BaseException | None = None
                try:
                    async for response in responses:
                        yield response
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    ended(context, failure, started)
                    await responses.aclose()

            return streaming

        if inspect.iscoroutinefunction(behaviour):

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    response = await behaviour(request, context)
                except BaseException as exc:
                    ended(context, exc, started)
                    raise
                ended(context, None, started)
                return response

            return call

        return None


class _Ended:
    """Records one method's ended calls: its counter children by code, its histogram."""

    __slots__ = ("_by_code", "_method", "_rpcs", "_seconds", "_service")

    def __init__(self, rpcs: Counter, seconds: Histogram, service: str, method: str) -> None:
        self._rpcs = rpcs
        self._service = service
        self._method = method
        self._by_code: dict[str, Counter] = {}
        self._seconds = seconds.labels(service, method)

    def __call__(
        self, context: grpc.aio.ServicerContext, failure: BaseException | None, started: float
    ) -> None:
        self._seconds.observe(time.perf_counter() - started)
        code = _code(context, failure)
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._rpcs.labels(self._service, self._method, code)
        child.inc()


def _code(context: grpc.aio.ServicerContext, failure: BaseException | None) -> str:
    """The status code a call ends with, as grpc will answer it."""
    code = context.code()  # set by abort() or set_code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        for known in grpc.StatusCode:
            if known.value[0] == code:
                return str(known.name)
    if failure is None:
        return "OK"
    if isinstance(failure, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"  # the caller went away (or the server is stopping)
    return "UNKNOWN"
