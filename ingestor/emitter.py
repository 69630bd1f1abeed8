"""``ExternalEmitter``: sends events out through an external emitter plugin.

emitter = ExternalEmitter("audit", "127.0.0.1:9002")                    # static
emitter = ExternalEmitter("audit", resolver=RegistryResolver(registry))  # by emitter name
emitter.emit(events)                 # any thread; PluginEmitError names what failed
await emitter.emit_async(events)     # in requests of at most 1,000 events / 4,000,000 bytes
emitter.close()                      # calls Shutdown on every instance it used

How a batch is split into requests, what is resent and when, and the delivery
guarantee, are in :mod:`ingestor.delivery`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Collection, Iterable

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry

from ingestor import _loop
from ingestor.breaker import BreakerSettings
from ingestor.connection import DEFAULT_CHANNELS_PER_ENDPOINT, ConnectionPool, PluginService
from ingestor.delivery import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_EVENTS,
    BatchLimits,
    Delivery,
    Emission,
    RetryPolicy,
)
from ingestor.errors import PluginConnectionError, PluginEmitError, PluginError
from ingestor.failures import Verdict
from ingestor.metrics import GatewayMetrics, gateway_metrics
from ingestor.plugin_client import PluginClient, Unreachable
from ingestor.resolver import RegistryResolver
from ingestor.sync_connection import SyncPool
from ingestor.view import Endpoint, ResolverView
from registry.trust.addresses import AddressPolicy, HostResolver
from registry.trust.tls import TlsFiles
from registry.wire import event_pb, pb

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_EMIT_TIMEOUT = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 5.0

EMITTER_SERVICE = PluginService(
    "polku.v1.EmitterPlugin",
    {
        "Emit": pb.EmitRequest.SerializeToString,
        "Health": Empty.SerializeToString,
        "Shutdown": Empty.SerializeToString,
    },
)


class ExternalEmitter(PluginClient):
    """The gateway's client of one emitter plugin (static, or resolved by emitter name).

    Give either ``address`` (a fixed plugin) or ``resolver`` (the HEALTHY instances
    registered under ``emitter_name``: a plugin's ``emitter_name``, else its name).
    Connections, timeouts, spreading and breakers are :class:`ExternalIngestor`'s
    (the shared :class:`~ingestor.plugin_client.PluginClient`): nothing connects
    before the first call, channels are cached per endpoint, calls go round-robin over
    the HEALTHY instances skipping those whose breaker is open, an endpoint the
    resolver drops has its channel closed. Each Emit has ``emit_timeout`` seconds (cut
    to what is left of the retry budget).

    Batches (:class:`~ingestor.delivery.BatchLimits`): an ``emit`` sends its events in
    order, in EmitRequests of at most ``max_batch_events`` events (1 to 100,000, default
    1,000) and ``max_batch_bytes`` encoded bytes (1 KiB to 64 MiB, default 4,000,000:
    under gRPC's default 4 MiB receive limit), one after another, each with its own
    attempts within the call's one retry budget. An event whose encoding alone is over
    ``max_batch_bytes`` is not sent: it is named in the PluginEmitError (with a
    gateway-made ``EmitError`` saying so) and the other events still go. The error
    names every event not delivered, across the requests, in the order given.

    Retries (:class:`~ingestor.delivery.RetryPolicy`, ``retry``): a transport failure
    resends every event of the attempt, a retryable ``EmitError`` only the events it
    names, on another instance where there is one, after a jittered exponential
    backoff, within ``max_attempts`` and ``budget``. The guarantee is **at least once**
    for retried events: make the plugin idempotent by event id
    (:mod:`ingestor.delivery` has the details).

    ``close()``/``aclose()`` call ``Shutdown`` on every instance this emitter opened a
    channel to (and that is still routable), all at once, within
    ``shutdown_timeout`` seconds in all; a Shutdown that fails or answers
    ``success = false`` is logged, never raised. Then the channels close.

    Thread rules as :class:`ExternalIngestor`: ``emit``/``health`` run on the caller's
    thread over synchronous channels (and refuse a thread whose event loop runs); the
    async methods work on any loop. ``close`` may be called from any thread; inside a
    running loop it only schedules the Shutdowns and the closing (prefer ``await
    aclose()`` there). The emitter does not own ``resolver``.

    ``address_policy``, ``host_resolver``, ``tls``, ``channel_options``,
    ``channels_per_endpoint`` and ``breaker`` are ExternalIngestor's. ``metrics``: a
    CollectorRegistry to count emitted, failed and retried events on, and to report
    the breaker of each endpoint at scrapes until the emitter is closed
    (:mod:`ingestor.metrics`).

    Raises (constructor):
        ValueError: neither or both of ``address`` and ``resolver``, a timeout that is
            not positive, an ``address`` that does not parse, unusable ``tls`` files,
            ``channels_per_endpoint``, ``max_batch_events`` or ``max_batch_bytes`` out
            of range, or ``metrics`` holding other families of the gateway's names.
    """

    def __init__(
        self,
        emitter_name: str,
        address: str | None = None,
        *,
        resolver: RegistryResolver | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        emit_timeout: float = DEFAULT_EMIT_TIMEOUT,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        retry: RetryPolicy | None = None,
        breaker: BreakerSettings | None = None,
        channel_options: Iterable[tuple[str, int | str]] = (),
        address_policy: AddressPolicy | None = None,
        host_resolver: HostResolver | None = None,
        tls: TlsFiles | None = None,
        metrics: CollectorRegistry | None = None,
        channels_per_endpoint: int = DEFAULT_CHANNELS_PER_ENDPOINT,
        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        if (address is None) == (resolver is None):
            raise ValueError("give exactly one of address and resolver")
        if min(connect_timeout, emit_timeout, shutdown_timeout) <= 0:
            raise ValueError("connect_timeout, emit_timeout and shutdown_timeout must be positive")
        # Checked before the base class subscribes to the resolver.
        self.batch_limits = BatchLimits(max_batch_events, max_batch_bytes)
        super().__init__(
            f"emitter {emitter_name!r}",
            address,
            resolver,
            connect_timeout=connect_timeout,
            breaker=breaker,
            channel_options=channel_options,
            address_policy=address_policy,
            host_resolver=host_resolver,
            tls=tls,
            service=EMITTER_SERVICE,
            channels_per_endpoint=channels_per_endpoint,
        )
        self.emitter_name = emitter_name
        self.emit_timeout = emit_timeout
        self.shutdown_timeout = shutdown_timeout
        self.retry = retry or RetryPolicy()
        self.gateway_metrics = gateway_metrics(metrics)
        self._used: set[str] = set()  # addresses a channel was opened to: Shutdown goes there
        self._used_lock = threading.Lock()
        self._closing = False
        self._close_tasks: set[asyncio.Task[None]] = set()
        if self.gateway_metrics is not None:
            self.gateway_metrics.add_emitter(self)  # forgotten when it closes

    def __repr__(self) -> str:
        target = self.address if self.address is not None else f"resolver={self.resolver!r}"
        return f"ExternalEmitter({self.emitter_name!r}, {target})"

    # -- calls -------------------------------------------------------------------------

    async def emit_async(self, events: Iterable[event_pb.Event]) -> None:
        """Deliver ``events`` through the emitter plugin, retrying as the policy allows.

        Returns once every event was delivered (an empty batch sends nothing). The
        requests (within ``max_batch_events`` and ``max_batch_bytes``) go one after
        another, each retried on its own within the call's retry budget.

        Raises:
            PluginEmitError: some events were not delivered: the plugin failed them for
                good, answered an error status, or could not be reached within the
                retries (``__cause__`` is then the PluginConnectionError), or an event
                was over ``max_batch_bytes``; ``failed_event_ids`` names exactly those
                events, across the requests, in the order given.
            PluginError: the emitter is closed, or its resolver is.
        Cancellation cancels the RPC in flight; events of that attempt, and of the
        requests before, may have been delivered.
        """
        emission = self._start(events)
        if emission is None:
            return
        pool = self._pool()
        try:
            for delivery in emission.deliveries():
                await self._deliver_async(pool, delivery)
        finally:
            self._count(emission)
        _raise_failures(emission)

    def emit(self, events: Iterable[event_pb.Event]) -> None:
        """Synchronous :meth:`emit_async`, on the caller's thread (any without a running loop).

        The backoff between attempts sleeps on the caller's thread.

        Raises:
            PluginError: called on a thread whose event loop is running (use
                ``await emit_async(events)`` there); and as :meth:`emit_async`.
        """
        _loop.refuse_inside_loop("ExternalEmitter.emit", "emit_async(events)")
        emission = self._start(events)
        if emission is None:
            return
        pool = self._sync_pool()
        try:
            for delivery in emission.deliveries():
                self._deliver_sync(pool, delivery)
        finally:
            self._count(emission)
        _raise_failures(emission)

    # -- one request, its attempts ------------------------------------------------------

    async def _deliver_async(self, pool: ConnectionPool, delivery: Delivery) -> None:
        """Attempt one request until it is delivered or out of attempts or budget."""
        while True:
            request = delivery.request()
            endpoint = await self._next_endpoint_async(delivery)
            if endpoint is not None:
                try:
                    response = await self._call_on_async(
                        pool, endpoint, "Emit", request, self._timeout(delivery), self._decode
                    )
                except (Unreachable, PluginEmitError) as exc:
                    _failed(delivery, endpoint, exc)
                else:
                    delivery.answered(endpoint.address, response)
            delay = self._next_delay(delivery)
            if delay is None:
                return
            await asyncio.sleep(delay)

    def _deliver_sync(self, pool: SyncPool, delivery: Delivery) -> None:
        """:meth:`_deliver_async` over synchronous channels, sleeping on this thread."""
        while True:
            request = delivery.request()
            endpoint = self._next_endpoint_sync(delivery)
            if endpoint is not None:
                try:
                    response = self._call_on_sync(
                        pool, endpoint, "Emit", request, self._timeout(delivery), self._decode
                    )
                except (Unreachable, PluginEmitError) as exc:
                    _failed(delivery, endpoint, exc)
                else:
                    delivery.answered(endpoint.address, response)
            delay = self._next_delay(delivery)
            if delay is None:
                return
            time.sleep(delay)

    def _start(self, events: Iterable[event_pb.Event]) -> Emission | None:
        if self._closing:
            raise PluginError(f"{self!r} is closed")
        emission = Emission(self.emitter_name, events, self.retry, self.batch_limits)
        return emission if emission.total else None

    async def _next_endpoint_async(self, delivery: Delivery) -> Endpoint | None:
        """The attempt's endpoint (its breaker's permit held); None: recorded as unreachable."""
        try:
            return self._pick(await self._endpoints_async(), delivery)
        except PluginConnectionError as exc:  # none routable, every circuit open
            delivery.unreachable("", exc)
            return None

    def _next_endpoint_sync(self, delivery: Delivery) -> Endpoint | None:
        try:
            return self._pick(self._endpoints_sync(), delivery)
        except PluginConnectionError as exc:
            delivery.unreachable("", exc)
            return None

    def _pick(self, endpoints: tuple[Endpoint, ...], delivery: Delivery) -> Endpoint:
        """Another instance than the last one tried, where one lets a call through."""
        endpoint = None
        if delivery.address and len(endpoints) > 1:
            endpoint = self._balancer.pick(endpoints, avoid=delivery.address, fail=False)
        if endpoint is None:
            endpoint = self._balancer.pick(endpoints)
        with self._used_lock:
            self._used.add(endpoint.address)
        return endpoint

    def _timeout(self, delivery: Delivery) -> float:
        # The budget bounds the whole call; a tiny remainder still gets a usable deadline.
        return max(0.001, min(self.emit_timeout, delivery.remaining()))

    def _next_delay(self, delivery: Delivery) -> float | None:
        delay = delivery.next_delay()
        if delay is not None:
            log.info(
                "retrying %d event(s) of emitter %r in %.3f s (attempt %d of %d): %s",
                len(delivery.pending),
                self.emitter_name,
                delay,
                delivery.attempts + 1,
                self.retry.max_attempts,
                delivery.cause,
            )
        return delay

    def _count(self, emission: Emission) -> None:
        metrics: GatewayMetrics | None = self.gateway_metrics
        if metrics is not None:
            # Failed: every event not delivered (in flight or never sent, on cancellation).
            delivered = emission.delivered
            failed = emission.total - delivered
            metrics.emitted(self.emitter_name, delivered, failed, emission.retried)

    def _decode(self, endpoint: Endpoint, raw: bytes) -> pb.EmitResponse:
        try:
            return pb.EmitResponse.FromString(raw)
        except DecodeError as exc:
            raise PluginEmitError(
                f"plugin {endpoint.label()} answered emitter {self.emitter_name!r} with an "
                f"undecodable EmitResponse ({exc})",
                address=endpoint.address,
                emitter=self.emitter_name,
            ) from exc

    # -- what PluginClient asks of it -----------------------------------------------------

    def _resolve(self, resolver: RegistryResolver) -> tuple[Endpoint, ...]:
        return resolver.resolve_emitter(self.emitter_name)

    def _live(self, view: ResolverView) -> Collection[str]:
        return {e.address for e in view.emitter_endpoints(self.emitter_name)}

    def _drain_grace(self) -> float | None:
        return self.emit_timeout

    def _answer_error(self, endpoint: Endpoint, verdict: Verdict) -> PluginError:
        return PluginEmitError(
            f"plugin {endpoint.label()} failed to emit for emitter {self.emitter_name!r}: "
            f"{verdict.code.name}: {verdict.details}",
            address=endpoint.address,
            code=verdict.code.name,
            emitter=self.emitter_name,
        )

    def _on_view(self, view: ResolverView) -> None:
        super()._on_view(view)
        live = self._live(view)
        with self._used_lock:
            self._used &= set(live)

    # -- lifecycle: Shutdown, then close -------------------------------------------------

    def close(self) -> None:
        """Call Shutdown on every instance used (bounded, logged), then close. Idempotent.

        Inside a running event loop it schedules both on that loop and returns.
        """
        targets = self._begin_close()
        here = _loop.running_loop()
        if here is not None:
            task = here.create_task(self._finish_close(targets))
            self._close_tasks.add(task)
            task.add_done_callback(self._close_tasks.discard)
            return
        if targets:
            try:
                _loop.run_sync(
                    lambda: self._shutdown_all(targets),
                    timeout=self.shutdown_timeout + 1.0,
                    what="ExternalEmitter.close",
                    instead="aclose()",
                )
            except PluginError as exc:
                log.warning("Shutdown of emitter %r did not finish: %s", self.emitter_name, exc)
        super().close()

    async def aclose(self) -> None:
        """Call Shutdown on every instance used (bounded, logged), then close. Idempotent."""
        await self._finish_close(self._begin_close())

    async def _finish_close(self, targets: list[str]) -> None:
        if targets:
            await self._shutdown_all(targets)
        await super().aclose()

    def _begin_close(self) -> list[str]:
        """Refuse further emits; the addresses to call Shutdown on (once, by the first close)."""
        with self._used_lock:
            if self._closing:
                return []
            self._closing = True
            targets, self._used = sorted(self._used), set()
        if self.resolver is not None and self.resolver.view is not None:
            live = self._live(self.resolver.view)
            targets = [t for t in targets if t in live]
        return targets

    async def _shutdown_all(self, addresses: list[str]) -> None:
        """Shutdown on each of ``addresses`` over this loop's channels, within the timeout."""
        try:
            pool = self._pool()
        except PluginError:
            return  # closed meanwhile by another close: its channels are gone
        try:
            async with asyncio.timeout(self.shutdown_timeout):
                await asyncio.gather(*(self._shutdown_one(pool, a) for a in addresses))
        except TimeoutError:
            log.warning(
                "Shutdown of emitter %r did not answer within %g s",
                self.emitter_name,
                self.shutdown_timeout,
            )

    async def _shutdown_one(self, pool: ConnectionPool, address: str) -> None:
        try:
            connection = await pool.open(address)
            await connection.connect(self.connect_timeout)
            raw = await connection.rpc["Shutdown"](Empty(), timeout=self.shutdown_timeout)
            answer = pb.ShutdownResponse.FromString(raw)
        except (PluginError, grpc.RpcError, DecodeError) as exc:
            log.warning("Shutdown of emitter %r at %s failed: %s", self.emitter_name, address, exc)
            return
        if not answer.success:
            log.warning(
                "emitter %r at %s answered Shutdown unsuccessfully: %s",
                self.emitter_name,
                address,
                answer.message or "(no message)",
            )

    def _sync_pool(self) -> SyncPool:
        if self._closing:
            raise PluginError(f"{self!r} is closed")
        return super()._sync_pool()


def _code(exc: Unreachable) -> str:
    cause = exc.error.__cause__
    if isinstance(cause, grpc.RpcError):
        code = cause.code()
        return str(code.name)
    return "UNAVAILABLE"


def _failed(delivery: Delivery, endpoint: Endpoint, exc: Unreachable | PluginEmitError) -> None:
    """Record an attempt that got no usable answer (no answer, or an error status)."""
    if isinstance(exc, Unreachable):
        delivery.unreachable(endpoint.address, exc.error, _code(exc))
    else:
        delivery.refused(endpoint.address, exc)


def _raise_failures(emission: Emission) -> None:
    error = emission.error()
    if error is not None:
        raise error from emission.cause
