"""``PluginClient``: what every client of a plugin service shares (ExternalIngestor; an emitter).

Where a call goes and over which channel, on either path:

- endpoints: a fixed ``address``, or the resolver's view (:meth:`_resolve`);
- which one: :class:`~ingestor.balancer.Balancer` (round-robin, a breaker per endpoint);
- channels: one :class:`~ingestor.connection.ConnectionPool` per event loop for the
  async methods, one :class:`~ingestor.sync_connection.SyncPool` for callers without a
  loop, which call on their own thread (no hand-off);
- what a failure means: :func:`ingestor.failures.judge`; a transport failure is retried
  once on another instance (:meth:`_call_async` / :meth:`_call_sync`);
- lifecycle: unopened, open, closed; ``close()`` closes every channel of both kinds.

A subclass names its service, resolves its endpoints from a view, decodes its answers
and says which error an answered failure is (:meth:`_answer_error`).

The sync methods are not a thin wrapper over the async core on the private loop (as
STYLE suggests), on purpose: two thread hand-offs per call cost a third of a small
call (SPEC §5 asks 90 % of grpc's own sync stub). Every decision is made once, here
and in the modules named above; only the I/O exists twice (``await`` or not).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError

from ingestor import _loop
from ingestor._closing import Closing
from ingestor.balancer import Balancer
from ingestor.breaker import BreakerSettings, BreakerState, CircuitBreaker
from ingestor.connection import (
    DEFAULT_CHANNELS_PER_ENDPOINT,
    INGESTOR_SERVICE,
    ConnectionPool,
    PluginConnection,
    PluginService,
    check_channels_per_endpoint,
)
from ingestor.errors import PluginConnectionError, PluginError
from ingestor.failures import TRANSPORT_CODES, Verdict, judge_error
from ingestor.metrics import GatewayMetrics
from ingestor.resolver import RegistryResolver
from ingestor.sync_connection import SyncPool
from ingestor.view import Endpoint, ResolverView
from registry.errors import InvalidArgument
from registry.trust.addresses import AddressPolicy, HostResolver, SystemResolver, parse_address
from registry.trust.dial import PluginCredentials, PluginDialer
from registry.trust.tls import TlsFiles
from registry.wire import pb

log = logging.getLogger(__name__)

T = TypeVar("T")
# Turns an endpoint's answer (bytes) into the client's type; a PluginError refuses it.
Decode = Callable[[Endpoint, bytes], T]


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class Unreachable(Exception):
    """An endpoint failed at the transport level; ``retry`` says another may be tried."""

    def __init__(self, error: PluginConnectionError, *, retry: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry = retry


class PluginClient(Closing):
    """A client of one plugin service: static ``address`` or ``resolver``, lazy channels.

    ``what`` names the target in errors and logs (``"source 'k8s'"``).
    ``channels_per_endpoint`` (1 to 64): HTTP/2 connections to each endpoint, taken
    in turn by the calls to it (:mod:`ingestor.connection`).

    Raises (constructor):
        ValueError: neither or both of ``address`` and ``resolver``, an ``address``
            that does not parse, unusable ``tls`` files, ``channels_per_endpoint``
            out of range.
    """

    def __init__(
        self,
        what: str,
        address: str | None,
        resolver: RegistryResolver | None,
        *,
        connect_timeout: float,
        breaker: BreakerSettings | None,
        channel_options: Iterable[tuple[str, int | str]],
        address_policy: AddressPolicy | None,
        host_resolver: HostResolver | None,
        tls: TlsFiles | None,
        service: PluginService = INGESTOR_SERVICE,
        channels_per_endpoint: int = DEFAULT_CHANNELS_PER_ENDPOINT,
    ) -> None:
        if (address is None) == (resolver is None):
            raise ValueError("give exactly one of address and resolver")
        self.channels_per_endpoint = check_channels_per_endpoint(channels_per_endpoint)
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
        self.address = address
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.breaker_settings = breaker or BreakerSettings()
        self.gateway_metrics: GatewayMetrics | None = None
        self._service = service
        self._channel_options = list(channel_options)
        self._balancer = Balancer(self.breaker_settings, what)
        self._lock = threading.Lock()
        self._state = _State.UNOPENED
        self._pools: dict[asyncio.AbstractEventLoop, ConnectionPool] = {}
        self._sync: SyncPool | None = None
        self._static = (Endpoint(address=address),) if address is not None else ()
        self._unsubscribe: Callable[[], None] | None = None
        if resolver is not None:
            self._unsubscribe = resolver.subscribe(self._on_view)

    # -- what a subclass says ----------------------------------------------------------

    def _resolve(self, resolver: RegistryResolver) -> tuple[Endpoint, ...]:
        """The routable endpoints from the resolver's current view (never blocks).

        Raises:
            PluginConnectionError: none is routable, or the view is too stale.
        """
        raise NotImplementedError

    def _live(self, view: ResolverView) -> Collection[str]:
        """The addresses of ``view`` this client may still call."""
        raise NotImplementedError

    def _answer_error(self, endpoint: Endpoint, verdict: Verdict) -> PluginError:
        """The error for a call the endpoint answered with a failure (not a transport one)."""
        raise NotImplementedError

    # -- calls -------------------------------------------------------------------------

    async def _call_async(
        self, method: str, request: Any, rpc_timeout: float, decode: Decode[T]
    ) -> tuple[Endpoint, T]:
        """``method`` on the next endpoint, once more on another after a transport failure.

        Each attempt has ``rpc_timeout`` seconds.

        Raises:
            PluginConnectionError: no endpoint could be reached (or none is routable).
            PluginError: what ``decode`` or :meth:`_answer_error` say; the client is closed.
        Cancellation cancels the RPC in flight.
        """
        pool = self._pool()
        endpoints = await self._endpoints_async()
        endpoint = self._balancer.pick(endpoints)
        try:
            return endpoint, await self._call_on_async(
                pool, endpoint, method, request, rpc_timeout, decode
            )
        except Unreachable as exc:
            retry_on = self._retry_target(endpoints, endpoint, exc)
            try:
                answer = await self._call_on_async(
                    pool, retry_on, method, request, rpc_timeout, decode
                )
            except Unreachable as again:
                raise _both_failed(exc, again) from again.error
            return retry_on, answer

    def _call_sync(
        self, method: str, request: Any, timeout: float, decode: Decode[T]
    ) -> tuple[Endpoint, T]:
        """:meth:`_call_async` on the caller's thread, over the synchronous channels.

        The caller has checked that no event loop runs on this thread.
        """
        pool = self._sync_pool()
        endpoints = self._endpoints_sync()
        endpoint = self._balancer.pick(endpoints)
        try:
            return endpoint, self._call_on_sync(pool, endpoint, method, request, timeout, decode)
        except Unreachable as exc:
            retry_on = self._retry_target(endpoints, endpoint, exc)
            try:
                answer = self._call_on_sync(pool, retry_on, method, request, timeout, decode)
            except Unreachable as again:
                raise _both_failed(exc, again) from again.error
            return retry_on, answer

    async def _call_on_async(
        self,
        pool: ConnectionPool,
        endpoint: Endpoint,
        method: str,
        request: Any,
        rpc_timeout: float,
        decode: Decode[T],
    ) -> T:
        """One call on one endpoint; reports the outcome to its breaker.

        Raises:
            Unreachable: a transport failure (the connection is dropped).
            PluginError: an answered failure, or an answer ``decode`` refused.
        """
        breaker = self._balancer.breaker(endpoint.address)
        try:
            connection = await pool.open(endpoint.address)
        except PluginConnectionError as exc:  # refused by the address policy: not dialled
            breaker.failure()
            raise Unreachable(exc, retry=True) from exc
        except BaseException:
            breaker.release()
            raise
        try:
            if not connection.ready:
                await connection.connect(self.connect_timeout)
            raw = await self._send_async(connection, endpoint, method, request, rpc_timeout)
        except PluginConnectionError as exc:
            breaker.failure()
            pool.drop(connection, None)
            raise Unreachable(exc, retry=True) from exc
        except grpc.aio.AioRpcError as exc:
            verdict, error = self._rpc_failed(breaker, endpoint, exc, connection.dropped)
            if verdict.drop_channel:
                pool.drop(connection, rpc_timeout)
            raise error from exc
        except BaseException:
            breaker.release()
            raise
        return _decoded(breaker, endpoint, raw, decode)

    async def _send_async(
        self,
        connection: PluginConnection,
        endpoint: Endpoint,
        method: str,
        request: Any,
        rpc_timeout: float,
    ) -> bytes:
        """The RPC itself, on a connected channel: the answer's bytes.

        A subclass may send it another way (ExternalIngestor: over the channel's ingest
        stream); it raises as the unary call does, ``grpc.aio.AioRpcError`` on failure.
        """
        raw: bytes = await connection.rpc[method](request, timeout=rpc_timeout)
        return raw

    def _call_on_sync(
        self,
        pool: SyncPool,
        endpoint: Endpoint,
        method: str,
        request: Any,
        timeout: float,
        decode: Decode[T],
    ) -> T:
        """:meth:`_call_on_async` over a synchronous channel."""
        breaker = self._balancer.breaker(endpoint.address)
        try:
            connection = pool.open(endpoint.address)
        except PluginConnectionError as exc:  # refused by the address policy: not dialled
            breaker.failure()
            raise Unreachable(exc, retry=True) from exc
        except BaseException:
            breaker.release()
            raise
        try:
            if not connection.ready:
                connection.connect(self.connect_timeout)
            raw = connection.call(method, request, timeout)
        except PluginConnectionError as exc:
            breaker.failure()
            pool.drop(connection)
            raise Unreachable(exc, retry=True) from exc
        except grpc.RpcError as exc:
            verdict, error = self._rpc_failed(breaker, endpoint, exc, connection.dropped)
            if verdict.drop_channel:
                pool.drop(connection)
            raise error from exc
        except BaseException:
            breaker.release()
            raise
        return _decoded(breaker, endpoint, raw, decode)

    def _rpc_failed(
        self, breaker: CircuitBreaker, endpoint: Endpoint, exc: grpc.RpcError, dropped: bool
    ) -> tuple[Verdict, Exception]:
        """Judge a failed RPC, report it to the breaker; the verdict and what to raise."""
        verdict = judge_error(exc, dropped=dropped)
        if verdict.breaker_failure:
            breaker.failure()
        else:
            breaker.success()  # it answered: the endpoint is up, the request is the problem
        if not verdict.drop_channel:
            return verdict, self._answer_error(endpoint, verdict)
        error = PluginConnectionError(
            f"plugin {endpoint.label()} for {self._balancer.what}: "
            f"{verdict.code.name}: {verdict.details}",
            address=endpoint.address,
        )
        error.__cause__ = exc
        # A timed-out call may still be running there: do not send it twice.
        return verdict, Unreachable(error, retry=verdict.retry)

    def _retry_target(
        self, endpoints: tuple[Endpoint, ...], failed: Endpoint, exc: Unreachable
    ) -> Endpoint:
        """Another endpoint to retry on (its breaker's permit held).

        Raises:
            PluginConnectionError: the first failure, when it may not be retried or no
                other endpoint lets a call through.
        """
        retry_on = (
            self._balancer.pick(endpoints, avoid=failed.address, fail=False) if exc.retry else None
        )
        if retry_on is None:
            raise exc.error from exc.error.__cause__
        log.info("retrying %s on %s: %s", self._balancer.what, retry_on.label(), exc.error)
        return retry_on

    # -- health --------------------------------------------------------------------------

    async def health_async(self) -> pb.PluginHealthResponse:
        """The plugin's own ``Health`` answer (one instance's: the next in turn).

        Raises:
            PluginConnectionError: the plugin cannot be reached (or none is routable).
            PluginError: it answered with an error status or with bytes that are not a
                ``PluginHealthResponse``, or the client is closed.
        """
        pool = self._pool()
        endpoint = self._balancer.next(await self._endpoints_async())
        connection = await pool.open(endpoint.address)
        try:
            await connection.connect(self.connect_timeout)
            raw: bytes = await connection.rpc["Health"](Empty(), timeout=self.connect_timeout)
        except PluginConnectionError:
            pool.drop(connection, None)
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() in TRANSPORT_CODES:
                pool.drop(connection, None)
            raise _health_error(endpoint, exc) from exc
        return _health_answer(endpoint, raw)

    def health(self) -> pb.PluginHealthResponse:
        """Synchronous :meth:`health_async`, on the caller's thread.

        Raises:
            PluginError: called on a thread whose event loop is running (use
                ``await health_async()`` there); and as :meth:`health_async`.
        """
        _loop.refuse_inside_loop(f"{type(self).__name__}.health", "health_async()")
        pool = self._sync_pool()
        endpoint = self._balancer.next(self._endpoints_sync())
        connection = pool.open(endpoint.address)
        try:
            connection.connect(self.connect_timeout)
            raw = connection.call("Health", Empty(), self.connect_timeout)
        except PluginConnectionError:
            pool.drop(connection)
            raise
        except grpc.RpcError as exc:
            if exc.code() in TRANSPORT_CODES:
                pool.drop(connection)
            raise _health_error(endpoint, exc) from exc
        return _health_answer(endpoint, raw)

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
        return self._balancer.states()

    def channels(self) -> int:
        """How many channels are cached on the running loop; without one, the sync ones."""
        loop = _loop.running_loop()
        if loop is None:
            sync = self._sync
            return 0 if sync is None else len(sync)
        pool = self._pools.get(loop)
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
                pool = ConnectionPool(
                    loop,
                    self._dialer,
                    self._channel_options,
                    self._service,
                    channels=self.channels_per_endpoint,
                )
                self._pools[loop] = pool
            return pool

    def _sync_pool(self) -> SyncPool:
        pool = self._sync
        if pool is not None and self._state is _State.OPEN:
            return pool
        with self._lock:
            if self._state is _State.CLOSED:
                raise PluginError(f"{self!r} is closed")
            self._state = _State.OPEN
            if self._sync is None:
                self._sync = SyncPool(
                    self._dialer,
                    self._channel_options,
                    self._service,
                    connect_timeout=self.connect_timeout,
                    channels=self.channels_per_endpoint,
                )
            return self._sync

    def _shut(self) -> list[ConnectionPool]:
        with self._lock:
            self._state = _State.CLOSED
            pools, self._pools = list(self._pools.values()), {}
            sync, self._sync = self._sync, None
            unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        if sync is not None:
            sync.close()
        if self.gateway_metrics is not None:
            self.gateway_metrics.forget(self)
        return pools

    async def _endpoints_async(self) -> tuple[Endpoint, ...]:
        resolver = self.resolver
        if resolver is None:
            return self._static
        if resolver.view is None:
            await resolver.wait_synced_async(resolver.connect_timeout)
        return self._resolve(resolver)

    def _endpoints_sync(self) -> tuple[Endpoint, ...]:
        resolver = self.resolver
        if resolver is None:
            return self._static
        if resolver.view is None:
            resolver.wait_synced(resolver.connect_timeout)
        return self._resolve(resolver)

    def _on_view(self, view: ResolverView) -> None:
        """Resolver hook (its loop thread): close channels to endpoints that went away."""
        live = self._live(view)
        self._balancer.keep_only(live)
        grace = self._drain_grace()
        for loop, pool in list(self._pools.items()):
            try:
                loop.call_soon_threadsafe(pool.keep_only, live, grace)
            except RuntimeError:
                continue  # that loop is closed
        sync = self._sync
        if sync is not None:
            sync.keep_only(live)

    def _drain_grace(self) -> float | None:
        """How long calls in flight on a channel no longer routable may take to finish."""
        return None


def _decoded(breaker: CircuitBreaker, endpoint: Endpoint, raw: bytes, decode: Decode[T]) -> T:
    try:
        answer = decode(endpoint, raw)
    except PluginError:
        breaker.failure()  # it answered, but with nothing a working plugin sends
        raise
    except BaseException:
        breaker.release()
        raise
    breaker.success()
    return answer


def _both_failed(first: Unreachable, again: Unreachable) -> PluginConnectionError:
    return PluginConnectionError(
        f"{first.error}; retried on another instance: {again.error}",
        address=again.error.address,
    )


def _health_error(endpoint: Endpoint, exc: grpc.RpcError) -> PluginError:
    text = f"health of plugin {endpoint.label()}: {exc.code().name}: {exc.details()}"
    if exc.code() in TRANSPORT_CODES:
        return PluginConnectionError(text, address=endpoint.address)
    return PluginError(text)


def _health_answer(endpoint: Endpoint, raw: bytes) -> pb.PluginHealthResponse:
    try:
        return pb.PluginHealthResponse.FromString(raw)
    except DecodeError as exc:
        raise PluginError(
            f"health of plugin {endpoint.label()}: an undecodable PluginHealthResponse ({exc})"
        ) from exc


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing plugin channels failed: %r", task.exception())
