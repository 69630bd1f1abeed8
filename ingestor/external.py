"""``ExternalIngestor``: turns raw payloads into events by calling an external plugin.

ingestor = ExternalIngestor("k8s", "127.0.0.1:9001")                    # static
ingestor = ExternalIngestor("k8s", resolver=RegistryResolver(registry))  # dynamic
events = ingestor.ingest(IngestContext("k8s"), raw)          # any thread
events = await ingestor.ingest_async(IngestContext("k8s"), raw)
result = ingestor.ingest_with_errors(IngestContext("k8s"), raw)  # .events, .errors
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import NoReturn, overload

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry

from ingestor import _loop
from ingestor._closing import Closing
from ingestor.answer import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_MAX_RESPONSE_BYTES,
    AnswerLimits,
    AnswerRefused,
    decode_answer,
)
from ingestor.breaker import BreakerSettings, BreakerState, CircuitBreaker
from ingestor.connection import ConnectionPool, PluginConnection
from ingestor.context import IngestContext
from ingestor.errors import PluginConnectionError, PluginError, PluginTransformError
from ingestor.metrics import gateway_metrics, measured
from ingestor.resolver import RegistryResolver
from ingestor.result import IngestResult
from ingestor.view import Endpoint, ResolverView
from registry.errors import InvalidArgument
from registry.trust.addresses import AddressPolicy, HostResolver, SystemResolver, parse_address
from registry.trust.dial import PluginCredentials, PluginDialer
from registry.trust.tls import TlsFiles
from registry.wire import event_pb, pb

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_INGEST_TIMEOUT = 30.0

# Statuses that say the plugin could not be reached, not that it refused the payload.
_TRANSPORT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_RECEIVE_LIMIT = "grpc.max_receive_message_length"
# How gRPC words RESOURCE_EXHAUSTED when this side's receive limit refused an answer;
# a plugin's own RESOURCE_EXHAUSTED (or its refusal of a large request, "SERVER: ...")
# is an answer like any other.
_OVER_RECEIVE_LIMIT = "CLIENT: Received message larger than max"


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class _Unreachable(Exception):
    """An endpoint failed at the transport level; ``retry`` says another may be tried."""

    def __init__(self, error: PluginConnectionError, *, retry: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry = retry


class ExternalIngestor(Closing):
    """The gateway's client of one source's ingestor plugin (static or resolved).

    Give either ``address`` (a fixed plugin: ``host:port``, ``http://h:p``,
    ``https://h:p``, ``unix:/path``) or ``resolver`` (the source's HEALTHY instances, as
    the registry reports them). Construction never fails for network reasons and never
    connects: the first call connects (waiting up to ``connect_timeout`` for the channel
    to be ready) and the channel is cached per endpoint. A connection error drops the
    cached channel; the next call resolves again and reconnects. Each Ingest has
    ``ingest_timeout`` seconds.

    Several instances: calls go round-robin over the source's HEALTHY endpoints, skipping
    those whose circuit breaker is open (:mod:`ingestor.breaker` says what counts as a
    failure); a call that could not reach its endpoint
    (UNAVAILABLE, connect failure) is retried once on another (Ingest is a pure
    transform). An endpoint the resolver drops stops receiving calls at once and its
    channel is closed (calls in flight on it may finish).

    Thread rules: ``ingest``/``health``/``close`` may be called from any thread, also
    while event loops run in other threads; they run on one private loop thread. On a
    thread whose event loop is running, ``ingest`` and ``health`` raise PluginError (they
    would block that loop): use ``await ingest_async(...)`` / ``await health_async()``
    there. The async methods work on any loop; each loop gets its own channels.

    The ingestor does not own ``resolver``: close that yourself (it is meant to be shared).

    Every endpoint (``address``, or each one the resolver gives) is parsed and vetted
    by ``address_policy`` before a channel is opened to it (default: loopback and the
    private ranges, :meth:`AddressPolicy.gateway_default`); a host name is resolved by
    ``host_resolver`` (default: the system's) and dialled at the IP it was vetted at.
    A refused endpoint raises PluginConnectionError naming the address policy, is never
    dialled, and counts like an unreachable one (another instance is tried).
    ``tls``: the CA that verifies ``https://`` plugins (the system roots without one)
    and, for mTLS, this side's certificate and key; the files are read here, once.

    Answers are bounded (SPEC §7): one over ``max_response_bytes`` (the channel's
    receive limit) or with more than ``max_events`` events (or errors) is refused
    before it is decoded, and bytes that are not an ``IngestResponse`` are refused
    too; each is a PluginTransformError naming what was exceeded and a failure for
    the endpoint's breaker (a plugin that answers so is broken), and is not retried
    on another instance (the answer's size usually follows from the payload; retrying
    would only pay for it twice). ``channel_options`` may not set
    ``grpc.max_receive_message_length``: ``max_response_bytes`` does.

    ``metrics``: a CollectorRegistry to report ingest latency, errors and breaker
    states on (:mod:`ingestor.metrics`); None reports nothing.

    Raises (constructor):
        ValueError: neither or both of ``address`` and ``resolver``, a bad timeout, a
            limit out of range, an ``address`` that does not parse, unusable ``tls``
            files, ``channel_options`` setting the receive limit, or ``metrics``
            holding other families of the gateway's names.
    """

    def __init__(
        self,
        source: str,
        address: str | None = None,
        *,
        resolver: RegistryResolver | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        ingest_timeout: float = DEFAULT_INGEST_TIMEOUT,
        breaker: BreakerSettings | None = None,
        channel_options: Iterable[tuple[str, int | str]] = (),
        address_policy: AddressPolicy | None = None,
        host_resolver: HostResolver | None = None,
        tls: TlsFiles | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_events: int = DEFAULT_MAX_EVENTS,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        if (address is None) == (resolver is None):
            raise ValueError("give exactly one of address and resolver")
        if connect_timeout <= 0 or ingest_timeout <= 0:
            raise ValueError("connect_timeout and ingest_timeout must be positive")
        self.limits = AnswerLimits(max_response_bytes=max_response_bytes, max_events=max_events)
        options = list(channel_options)
        if any(key == _RECEIVE_LIMIT for key, _ in options):
            raise ValueError(f"channel_options: set max_response_bytes, not {_RECEIVE_LIMIT}")
        if address is not None:
            try:
                parse_address("address", address)
            except InvalidArgument as exc:
                raise ValueError(str(exc)) from exc
        self._dialer = PluginDialer(
            address_policy if address_policy is not None else AddressPolicy.gateway_default(),
            host_resolver if host_resolver is not None else SystemResolver(),
            PluginCredentials(tls) if tls is not None else None,
        )
        self.source = source
        self.address = address
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.ingest_timeout = ingest_timeout
        self.breaker_settings = breaker or BreakerSettings()
        self._channel_options = [*options, (_RECEIVE_LIMIT, max_response_bytes)]
        self._lock = threading.Lock()
        self._state = _State.UNOPENED
        self._pools: dict[asyncio.AbstractEventLoop, ConnectionPool] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._turn = itertools.count()
        self._static = (Endpoint(address=address),) if address is not None else ()
        self._unsubscribe: Callable[[], None] | None = None
        if resolver is not None:
            self._unsubscribe = resolver.subscribe(self._on_view)
        self.gateway_metrics = gateway_metrics(metrics)
        if self.gateway_metrics is not None:
            self.gateway_metrics.add_ingestor(self)

    def __repr__(self) -> str:
        target = self.address if self.address is not None else f"resolver={self.resolver!r}"
        return f"ExternalIngestor({self.source!r}, {target})"

    # -- calls -------------------------------------------------------------------------

    async def ingest_async(self, ctx: IngestContext, data: bytes) -> list[event_pb.Event]:
        """Send ``data`` to the source's plugin; its events, in order.

        Errors the plugin reports next to events are logged as warnings (naming the
        plugin and offset) and the events returned; :meth:`ingest_with_errors_async`
        returns them too.

        Raises:
            As :meth:`ingest_with_errors_async`.
        Cancellation cancels the RPC in flight.
        """
        return (await self.ingest_with_errors_async(ctx, data)).events

    @measured
    async def ingest_with_errors_async(self, ctx: IngestContext, data: bytes) -> IngestResult:
        """Send ``data`` to the source's plugin; its events and its per-record errors.

        The errors (the plugin's ``IngestError`` records, as it returned them) are
        also logged as warnings, naming the plugin and offset, as :meth:`ingest_async`
        does.

        Raises:
            PluginConnectionError: no plugin could be reached (connect failure,
                UNAVAILABLE, DEADLINE_EXCEEDED, no routable plugin, a stale view, an
                endpoint the address policy refuses).
            PluginTransformError: the plugin returned errors and no events, answered
                with another error status, or with an answer refused: over
                ``max_response_bytes``, more than ``max_events`` events or errors, or
                undecodable.
            PluginError: the ingestor is closed.
        Cancellation cancels the RPC in flight.
        """
        request = pb.IngestRequest(
            source=ctx.source or self.source, cluster=ctx.cluster, format=ctx.format, data=data
        )
        pool = self._pool()
        endpoints = await self._endpoints()
        endpoint = self._pick(endpoints)
        try:
            response = await self._ingest_on(pool, endpoint, request)
        except _Unreachable as exc:
            retry_on = (
                self._pick(endpoints, avoid=endpoint.address, fail=False) if exc.retry else None
            )
            if retry_on is None:
                raise exc.error from exc.error.__cause__
            log.info("retrying source %r on %s: %s", self.source, retry_on.label(), exc.error)
            try:
                response = await self._ingest_on(pool, retry_on, request)
            except _Unreachable as again:
                raise PluginConnectionError(
                    f"{exc.error}; retried on another instance: {again.error}",
                    address=again.error.address,
                ) from again.error
            endpoint = retry_on
        return self._result(endpoint, response)

    def ingest(self, ctx: IngestContext, data: bytes) -> list[event_pb.Event]:
        """Synchronous :meth:`ingest_async`, from any thread without a running loop.

        Raises:
            PluginError: called on a thread whose event loop is running (use
                ``await ingest_async`` there), or the ingestor is closed.
            PluginConnectionError, PluginTransformError: as :meth:`ingest_async`.
        """
        return self._ingest_sync(ctx, data, "ingest").events

    def ingest_with_errors(self, ctx: IngestContext, data: bytes) -> IngestResult:
        """Synchronous :meth:`ingest_with_errors_async` (thread rules as :meth:`ingest`).

        Raises:
            PluginError: called on a thread whose event loop is running (use
                ``await ingest_with_errors_async`` there), or the ingestor is closed.
            PluginConnectionError, PluginTransformError: as :meth:`ingest_async`.
        """
        return self._ingest_sync(ctx, data, "ingest_with_errors")

    def _ingest_sync(self, ctx: IngestContext, data: bytes, method: str) -> IngestResult:
        return _loop.run_sync(
            lambda: self.ingest_with_errors_async(ctx, data),
            timeout=self._sync_budget(),
            what=f"ExternalIngestor.{method}",
            instead=f"{method}_async(ctx, data)",
        )

    async def health_async(self) -> pb.PluginHealthResponse:
        """The plugin's own ``Health`` answer (one instance's: the next in turn).

        Raises:
            PluginConnectionError: the plugin cannot be reached (or none is routable).
            PluginError: it answered with an error status or with bytes that are not a
                ``PluginHealthResponse``, or the ingestor is closed.
        """
        pool = self._pool()
        endpoints = await self._endpoints()
        endpoint = endpoints[next(self._turn) % len(endpoints)]
        connection = await pool.open(endpoint.address)
        try:
            await connection.connect(self.connect_timeout)
            raw: bytes = await connection.health(Empty(), timeout=self.connect_timeout)
        except PluginConnectionError:
            pool.drop(connection, None)
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSPORT_CODES:
                pool.drop(connection, None)
                raise PluginConnectionError(
                    f"health of plugin {endpoint.label()}: {exc.code().name}: {exc.details()}",
                    address=endpoint.address,
                ) from exc
            raise PluginError(
                f"health of plugin {endpoint.label()}: {exc.code().name}: {exc.details()}"
            ) from exc
        try:
            return pb.PluginHealthResponse.FromString(raw)
        except DecodeError as exc:
            raise PluginError(
                f"health of plugin {endpoint.label()}: an undecodable PluginHealthResponse ({exc})"
            ) from exc

    def health(self) -> pb.PluginHealthResponse:
        """Synchronous :meth:`health_async` (thread rules as :meth:`ingest`)."""
        return _loop.run_sync(
            self.health_async,
            timeout=2 * self.connect_timeout + self._resolve_budget() + 1,
            what="ExternalIngestor.health",
            instead="health_async()",
        )

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close every cached channel and refuse further calls. Idempotent.

        Waits for channels on other loops to close, unless called inside a running
        loop: there it schedules the closing (prefer ``await aclose()``).
        """
        pools = self._shut()
        here = _loop.running_loop()
        for pool in pools:
            if pool.loop.is_closed():
                continue
            if pool.loop is here:
                task = here.create_task(pool.close())
                task.add_done_callback(_log_failure)
                continue
            try:
                future = asyncio.run_coroutine_threadsafe(pool.close(), pool.loop)
                if here is None:
                    future.result(self.connect_timeout)
            except RuntimeError:
                continue  # that loop is gone; its channels went with it
            except TimeoutError:
                log.warning("channels of %r on another loop did not close in time", self)

    async def aclose(self) -> None:
        """Close every cached channel and refuse further calls. Idempotent."""
        pools = self._shut()
        here = asyncio.get_running_loop()
        for pool in pools:
            if pool.loop is here:
                await pool.close()
            elif not pool.loop.is_closed():
                try:
                    future = asyncio.run_coroutine_threadsafe(pool.close(), pool.loop)
                except RuntimeError:
                    continue
                await asyncio.wrap_future(future)

    def breaker_states(self) -> dict[str, BreakerState]:
        """The breaker of each endpoint called so far (and still resolved), by address."""
        return {address: breaker.state for address, breaker in dict(self._breakers).items()}

    def channels(self) -> int:
        """How many channels are cached on the running loop (or the private one)."""
        loop = _loop.running_loop() or _loop.started_bridge_loop()
        pool = None if loop is None else self._pools.get(loop)
        return 0 if pool is None else len(pool)

    # -- internals ---------------------------------------------------------------------

    def _pool(self) -> ConnectionPool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is not None and self._state is _State.OPEN:
            return pool
        with self._lock:
            if self._state is _State.CLOSED:
                raise PluginError(f"{self!r} is closed")
            self._state = _State.OPEN
            pool = self._pools.get(loop)
            if pool is None:
                # Loops that ended took their channels with them.
                for old in [lp for lp in self._pools if lp.is_closed()]:
                    del self._pools[old]
                pool = ConnectionPool(loop, self._dialer, self._channel_options)
                self._pools[loop] = pool
            return pool

    def _shut(self) -> list[ConnectionPool]:
        with self._lock:
            self._state = _State.CLOSED
            pools, self._pools = list(self._pools.values()), {}
            unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        if self.gateway_metrics is not None:
            self.gateway_metrics.forget(self)
        return pools

    async def _endpoints(self) -> tuple[Endpoint, ...]:
        if self.resolver is None:
            return self._static
        return await self.resolver.resolve_async(self.source)

    def _breaker(self, address: str) -> CircuitBreaker:
        breaker = self._breakers.get(address)
        if breaker is None:
            breaker = self._breakers.setdefault(address, CircuitBreaker(self.breaker_settings))
        return breaker

    @overload
    def _pick(self, endpoints: tuple[Endpoint, ...], *, avoid: str = "") -> Endpoint: ...

    @overload
    def _pick(
        self, endpoints: tuple[Endpoint, ...], *, avoid: str = "", fail: bool
    ) -> Endpoint | None: ...

    def _pick(
        self, endpoints: tuple[Endpoint, ...], *, avoid: str = "", fail: bool = True
    ) -> Endpoint | None:
        """The next endpoint in turn (not ``avoid``) whose breaker lets a call through.

        The caller holds the breaker's permit and must report the call's outcome.

        Raises:
            PluginConnectionError: with ``fail``, when every breaker is open.
        """
        candidates = [e for e in endpoints if e.address != avoid] if avoid else endpoints
        start = next(self._turn)
        count = len(candidates)
        for i in range(count):
            endpoint = candidates[(start + i) % count]
            if self._breaker(endpoint.address).allow():
                return endpoint
        if not fail:
            return None
        wait = min(self._breaker(e.address).retry_after() for e in candidates)
        raise PluginConnectionError(
            f"every instance of source {self.source!r} is failing (circuit open); "
            f"next try in {wait:.1f} s",
            address=candidates[0].address if count == 1 else "",
        )

    async def _ingest_on(
        self, pool: ConnectionPool, endpoint: Endpoint, request: pb.IngestRequest
    ) -> pb.IngestResponse:
        """One Ingest on one endpoint; reports the outcome to its breaker.

        Raises:
            _Unreachable: a transport failure (the connection is dropped).
            PluginTransformError: another error status (the plugin is up), or an answer
                refused by the limits or undecodable (a breaker failure).
        """
        breaker = self._breaker(endpoint.address)
        try:
            connection = await pool.open(endpoint.address)
        except PluginConnectionError as exc:  # refused by the address policy: not dialled
            breaker.failure()
            raise _Unreachable(exc, retry=True) from exc
        except BaseException:
            breaker.release()
            raise
        try:
            if not connection.ready:
                await connection.connect(self.connect_timeout)
            raw: bytes = await connection.ingest(request, timeout=self.ingest_timeout)
        except PluginConnectionError as exc:
            breaker.failure()
            pool.drop(connection, None)
            raise _Unreachable(exc, retry=True) from exc
        except grpc.aio.AioRpcError as exc:
            self._rpc_failed(pool, connection, breaker, endpoint, exc)
        except BaseException:
            breaker.release()
            raise
        try:
            response = decode_answer(raw, self.limits)
        except AnswerRefused as exc:
            breaker.failure()  # it answered, but with nothing a working plugin sends
            raise PluginTransformError(
                f"plugin {endpoint.label()} answered source {self.source!r} with {exc}",
                address=endpoint.address,
            ) from exc
        breaker.success()
        return response

    def _rpc_failed(
        self,
        pool: ConnectionPool,
        connection: PluginConnection,
        breaker: CircuitBreaker,
        endpoint: Endpoint,
        exc: grpc.aio.AioRpcError,
    ) -> NoReturn:
        code, details = exc.code(), exc.details() or ""
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and _OVER_RECEIVE_LIMIT in details:
            breaker.failure()  # the stream was refused, the channel is still good
            raise PluginTransformError(
                f"plugin {endpoint.label()} answered source {self.source!r} with more than "
                f"max_response_bytes={self.limits.max_response_bytes} bytes ({details})",
                address=endpoint.address,
            ) from exc
        dropped_under_us = code is grpc.StatusCode.CANCELLED and connection.dropped
        if code in _TRANSPORT_CODES or dropped_under_us:
            breaker.failure()
            pool.drop(connection, self.ingest_timeout)
            error = PluginConnectionError(
                f"plugin {endpoint.label()} for source {self.source!r}: {code.name}: {details}",
                address=endpoint.address,
            )
            error.__cause__ = exc
            # A timed-out Ingest may still be running there: do not send it twice.
            raise _Unreachable(error, retry=code is not grpc.StatusCode.DEADLINE_EXCEEDED)
        breaker.success()  # it answered: the endpoint is up, the payload is the problem
        raise PluginTransformError(
            f"plugin {endpoint.label()} failed to transform source {self.source!r}: "
            f"{code.name}: {details}",
            address=endpoint.address,
            code=code.name,
        ) from exc

    def _result(self, endpoint: Endpoint, response: pb.IngestResponse) -> IngestResult:
        events = list(response.events)
        if response.errors and not events:
            first = response.errors[0]
            raise PluginTransformError(
                f"plugin {endpoint.label()} returned {len(response.errors)} error(s) and no "
                f"events for source {self.source!r}; first at offset {first.offset}: "
                f"{first.message}",
                address=endpoint.address,
                errors=response.errors,
            )
        for error in response.errors:
            log.warning(
                "plugin %s reported an error for source %r at offset %d: %s%s",
                endpoint.label(),
                self.source,
                error.offset,
                error.message,
                f" ({error.details})" if error.details else "",
            )
        return IngestResult(events, list(response.errors))

    def _on_view(self, view: ResolverView) -> None:
        """Resolver hook (its loop thread): close channels to endpoints that went away."""
        live = {e.address for e in view.endpoints(self.source)}
        for address in [a for a in list(self._breakers) if a not in live]:
            self._breakers.pop(address, None)
        for loop, pool in list(self._pools.items()):
            try:
                loop.call_soon_threadsafe(pool.keep_only, live, self.ingest_timeout)
            except RuntimeError:
                continue  # that loop is closed

    def _resolve_budget(self) -> float:
        return 0.0 if self.resolver is None else self.resolver.connect_timeout

    def _sync_budget(self) -> float:
        # The async path enforces its own deadlines; this only guards a wedged loop.
        return 2 * (self.connect_timeout + self.ingest_timeout) + self._resolve_budget() + 1


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing plugin channels failed: %r", task.exception())
