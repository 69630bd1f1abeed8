"""PluginHost: serve a plugin and keep it registered for as long as it runs.

    async with PluginHost({"name": "lines", "sources": ["lines"]}, ingest=split) as host:
        print("registered as", await host.wait_registered())
        ...  # the rest of the program; leaving the block unregisters and stops

Lifecycle: ``start()`` binds and starts the gRPC server, then a background task
registers (retrying with backoff and jitter while the registry is unreachable,
serving meanwhile), renews its lease at the interval the registry returns, and
registers again whenever a renewal is not acknowledged (the registry restarted with a
fresh database, or the lease lapsed). Renewals go over one KeepAlive stream (SPEC
§1.3) that every host of the process with the same registry settings shares; a
registry that answers KeepAlive UNIMPLEMENTED (an older one) gets unary Heartbeats.
``stop(grace)`` unregisters first, so the gateway stops routing here, then stops the
server, letting calls in flight finish; ``hurry()`` (a second SIGTERM, in
``run_plugin``) cuts the phase under way short, but never skips the unregister.

Drain (SPEC §9): an operator may take this instance out of routing (DRAINING). The
registry still acknowledges its heartbeats, so it keeps its id and does not register
again; the host learns of it with one GetPlugin after each acknowledged heartbeat
(bounded by half an interval, so it never delays the next), exposes it as
:attr:`PluginHost.drained` and calls ``on_drain(True)``, then ``on_drain(False)`` when
undrained. A principal without the ``read`` scope cannot ask: the host then says so
once in the log and :attr:`~PluginHost.drained` stays False.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from registry.client import DEFAULT_REGISTRY, RegistryClient, dial_target, parse_addresses
from registry.errors import InvalidArgument, NotFound, RegistryError, RegistryUnavailable
from registry.keeper import KeepAliveStream, KeepAliveUnsupported
from registry.lifecycle import AsyncService
from registry.sdk.handlers import (
    DEFAULT_STREAM_IN_FLIGHT,
    STREAM_CAPABILITY,
    EmitFn,
    EmitterServicer,
    Handlers,
    HealthFn,
    IngestFn,
    IngestorServicer,
    ShutdownFn,
)
from registry.trust.tls import TlsFiles
from registry.validation import check_address, registration_from_request
from registry.wire import pb, pb_grpc

log = logging.getLogger(__name__)

# Heartbeat period when a registry grants no interval (it never should for a lease).
_FALLBACK_INTERVAL = 10.0
_WILDCARD_HOSTS = ("", "0.0.0.0", "[::]", "::")
# After a registry answered KeepAlive UNIMPLEMENTED, renewals go unary this long
# before the stream is tried again (a rolling upgrade may have reached it by then).
UNARY_FOR = 300.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between attempts to reach the registry: exponential, capped, jittered.

    Attempt ``n`` waits ``min(maximum, initial * multiplier**n)`` scaled by a random
    factor in ``[1 - jitter, 1]``, so plugins restarted together spread out.

    Raises:
        ValueError: a field is out of range.
    """

    initial: float = 0.2
    maximum: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"backoff: need 0 < initial <= maximum, got {self}")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff: need multiplier >= 1 and 0 <= jitter <= 1, got {self}")

    def delays(self) -> Iterator[float]:
        """An endless series of delays, for one run of failures."""
        delay = self.initial
        while True:
            yield delay * random.uniform(1 - self.jitter, 1)
            delay = min(self.maximum, delay * self.multiplier)


class _State(enum.Enum):
    NEW = "new"
    STARTED = "started"
    STOPPED = "stopped"


def plugin_info(
    info: pb.PluginInfo | Mapping[str, Any], plugin_type: pb.PluginType
) -> pb.PluginInfo:
    """A copy of ``info`` (a message or its fields) with its type filled in.

    Raises:
        ValueError: a field is unknown, or the type contradicts the handlers given.
    """
    message = pb.PluginInfo()
    if isinstance(info, pb.PluginInfo):
        message.CopyFrom(info)
    else:
        message = pb.PluginInfo(**info)
    if message.type == pb.PLUGIN_TYPE_UNSPECIFIED:
        message.type = plugin_type
    elif message.type != plugin_type:
        raise ValueError(
            f"info.type is {pb.PluginType.Name(message.type)} but the handlers given make "
            f"an {pb.PluginType.Name(plugin_type)}"
        )
    return message


def _route_host(registry: str) -> str:
    """The local address that routes to the registry (a UDP connect sends nothing)."""
    target, _ = dial_target(registry)
    host, _, port = target.rpartition(":")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_DGRAM
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(address)
            local: str = probe.getsockname()[0]
    except (OSError, ValueError):
        return socket.gethostname()
    return f"[{local}]" if ":" in local else local


_KeeperKey = tuple[asyncio.AbstractEventLoop, tuple[str, ...], str | None, TlsFiles | None, float]


class _Keeper:
    """The KeepAlive stream the hosts of one process share, per registry and credentials.

    Hosts made with the same registry addresses, token, TLS files and timeout on one
    event loop renew over one stream (SPEC §1.3: one per process), through a client of
    its own, opened at the first renewal where the asking host's client stands. A
    stream that breaks is reopened by the next renewal (the hosts back off between
    attempts); an unreachable registry gets a new channel, past the address that
    failed. A registry without KeepAlive gets unary Heartbeats for :data:`UNARY_FOR`
    seconds, then the stream is tried again.
    """

    _shared: dict[_KeeperKey, _Keeper] = {}

    def __init__(self, key: _KeeperKey) -> None:
        self._key = key
        self.users = 0
        self._client: RegistryClient | None = None
        self._stream: KeepAliveStream | None = None
        self._unary_until = float("-inf")

    @classmethod
    def acquire(cls, key: _KeeperKey) -> _Keeper:
        keeper = cls._shared.get(key)
        if keeper is None:
            keeper = cls._shared[key] = cls(key)
        keeper.users += 1
        return keeper

    async def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        if self._shared.get(self._key) is self:
            del self._shared[self._key]
        await self._close()

    async def renew(self, plugin_id: str, first: str) -> bool:
        """Renew one lease; False: the registry no longer knows it (register again).

        Raises:
            RegistryError: as ``RegistryClient.heartbeat`` (the caller backs off).
        """
        client = self._client
        if client is None:
            client = self._client = self._new_client(first)
        loop = asyncio.get_running_loop()
        if loop.time() < self._unary_until:
            return await self._unary(client, plugin_id)
        stream = self._stream
        if stream is None:
            stream = self._stream = client.keep_alive()
        try:
            response = await stream.renew(plugin_id)
        except KeepAliveUnsupported as exc:
            log.info("%s; heartbeating instead", exc)
            self._unary_until = loop.time() + UNARY_FOR
            return await self._unary(client, plugin_id)
        except RegistryUnavailable:
            await self._reset(client)
            raise
        return response.acknowledged

    async def _unary(self, client: RegistryClient, plugin_id: str) -> bool:
        try:
            return await client.heartbeat(plugin_id)
        except RegistryUnavailable:
            await self._reset(client)
            raise

    async def _reset(self, client: RegistryClient) -> None:
        """A new channel past the address that failed (see ``PluginHost._reset_client``)."""
        if client is not self._client:
            return  # another renewal has reset it already
        stream, self._stream = self._stream, None
        self._client = self._new_client(client.current_address)
        if stream is not None:
            await stream.close()
        await client.close()

    def _new_client(self, first: str) -> RegistryClient:
        _, addresses, token, tls, timeout = self._key
        at = addresses.index(first) if first in addresses else 0
        return RegistryClient(
            addresses[at:] + addresses[:at], timeout=timeout, token=token, tls=tls
        )

    async def _close(self) -> None:
        stream, self._stream = self._stream, None
        client, self._client = self._client, None
        if stream is not None:
            await stream.close()
        if client is not None:
            await client.close()


class PluginHost(AsyncService):
    """One plugin: its gRPC server and its registration, ``start()``/``stop()`` or ``async with``.

    Give ``info`` (a ``pb.PluginInfo`` or its fields; the type is inferred) and either
    ``ingest`` (an ingestor) or ``emit`` (an emitter), plus optionally ``health`` and
    ``shutdown`` — as keywords or as methods of ``plugin``; keywords win.
    ``listen`` may use port 0: the address registered is the one bound, unless
    ``advertise`` gives the one others must dial (containers, NAT). A wildcard listen
    host (``0.0.0.0``, ``[::]``) advertises the local address that routes to the registry.

    ``registry``: its address, or the replicas of one registry (``"a:1,b:2"`` or a
    sequence); registration and heartbeats fail over between them. A wildcard listen
    host advertises the local address that routes to the first.

    ``token`` (a bearer token) and ``tls`` (the TLS files to reach the registry with,
    not this plugin's own server) go to its :class:`~registry.client.RegistryClient`.

    ``on_drain(drained)`` is called on the host's loop when an operator drains this
    instance (True) or undrains it (False); it must not block (see the module docstring).

    An ingestor is served over unary ``Ingest`` and over ``polku.v1.IngestorStream``
    too, and registers with the capability ``ingest.stream.v1`` added to ``info``;
    ``stream_in_flight`` bounds how many requests of one stream are handled at once
    (:mod:`registry.sdk.handlers`).

    ``lease_ttl_seconds=0`` takes the registry's default lease. ``grace`` is how long
    :meth:`stop` lets calls in flight finish. Thread rules: a host belongs to the event
    loop that starts it; plain (non-async) handlers run in its pool of ``max_workers``
    threads.

    Raises (on construction, before any I/O):
        ValueError: no handler, both an ingest and an emit handler, a bad field, or
            ``stream_in_flight`` below 1.
        InvalidArgument: the registry would refuse this registration (names the field).
        RegistryError: no registry address, or ``token``/``tls`` refused by
            RegistryClient (a token in clear to a non-loopback registry, unusable TLS
            files).
    """

    def __init__(
        self,
        info: pb.PluginInfo | Mapping[str, Any],
        plugin: object | None = None,
        *,
        ingest: IngestFn | None = None,
        emit: EmitFn | None = None,
        health: HealthFn | None = None,
        shutdown: ShutdownFn | None = None,
        registry: str | Sequence[str] = DEFAULT_REGISTRY,
        listen: str = "127.0.0.1:0",
        advertise: str | None = None,
        lease_ttl_seconds: int = 0,
        labels: Mapping[str, str] | None = None,
        grace: float = 5.0,
        backoff: Backoff | None = None,
        max_workers: int | None = None,
        registry_timeout: float = 5.0,
        server_options: Iterable[tuple[str, Any]] = (),
        token: str | None = None,
        tls: TlsFiles | None = None,
        on_drain: Callable[[bool], object] | None = None,
        stream_in_flight: int = DEFAULT_STREAM_IN_FLIGHT,
    ) -> None:
        ingest = ingest or getattr(plugin, "ingest", None)
        emit = emit or getattr(plugin, "emit", None)
        if (ingest is None) == (emit is None):
            raise ValueError("a plugin needs exactly one of ingest (an ingestor) or emit")
        kind = pb.PLUGIN_TYPE_INGESTOR if ingest is not None else pb.PLUGIN_TYPE_EMITTER
        self.info = plugin_info(info, kind)
        if ingest is not None and STREAM_CAPABILITY not in self.info.capabilities:
            self.info.capabilities.append(STREAM_CAPABILITY)
        if isinstance(stream_in_flight, bool) or not isinstance(stream_in_flight, int):
            raise ValueError(f"stream_in_flight must be an integer, not {stream_in_flight!r}")
        if stream_in_flight < 1:
            raise ValueError(f"stream_in_flight must be at least 1, not {stream_in_flight}")
        self._stream_in_flight = stream_in_flight
        self._ingest, self._emit = ingest, emit
        self._health = health or getattr(plugin, "health", None)
        self._shutdown = shutdown or getattr(plugin, "shutdown", None)
        self._registries = parse_addresses(registry)
        self.registry = ",".join(self._registries)
        self.listen = listen
        self.grace = grace
        self._advertise = advertise
        self._lease_ttl = lease_ttl_seconds
        self._labels = dict(labels or {})
        self._backoff = backoff or Backoff()
        self._max_workers = max_workers
        self._registry_timeout = registry_timeout
        self._server_options = list(server_options)
        self._token = token
        self._tls = tls
        self._on_drain = on_drain
        self._drained = False
        # False once the registry refused to tell this instance its own status.
        self._drain_readable = True
        self._new_client()  # a token in clear or unusable TLS files fail now, not later
        # The registry's own checks, done here so that a mistake fails at once.
        registration_from_request(self._request("127.0.0.1:1"), default_ttl=30)
        if advertise is not None:
            check_address("advertise", advertise)

        self._state = _State.NEW
        self._address = ""
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._ingestor: IngestorServicer | None = None
        self._client: RegistryClient | None = None
        self._keeper: _Keeper | None = None
        self._pools: list[ThreadPoolExecutor] = []
        self._task: asyncio.Task[None] | None = None
        self._pending: asyncio.Future[pb.RegisterResponse] | None = None
        self._plugin_id: str | None = None
        self._failure: InvalidArgument | None = None
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()  # start and stop run one at a time
        self._hurry_unregister = False  # hurried before the unregister began
        self._unregister_scope: asyncio.Timeout | None = None
        self._stopping_server: grpc.aio.Server | None = None
        self._cut: asyncio.Future[None] | None = None

    @property
    def address(self) -> str:
        """The address registered: ``advertise``, or the one bound. Empty before start."""
        return self._address

    @property
    def drained(self) -> bool:
        """Whether the registry holds this instance DRAINING, as last seen (see the
        module docstring). A new registration starts undrained."""
        return self._drained

    @property
    def plugin_id(self) -> str | None:
        """The id the registry knows this instance by now; None while unregistered."""
        return self._plugin_id

    async def start(self) -> None:
        """Bind and serve, then register in the background. Idempotent.

        Returns once serving, without waiting for the registry (see :meth:`wait_registered`).

        Raises:
            RegistryError: ``listen`` cannot be bound, or the host was stopped.
        """
        async with self._lock:
            if self._state is _State.NEW:
                await self._start()
            elif self._state is _State.STOPPED:
                raise RegistryError("the plugin host is stopped; make a new one")

    async def _start(self) -> None:
        name = self.info.name
        pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix=f"plugin-{name}")
        health_pool = ThreadPoolExecutor(1, thread_name_prefix=f"plugin-{name}-health")
        self._pools = [pool, health_pool]
        handlers = Handlers(
            self.info,
            pool,
            health_pool,
            self._ingest,
            self._emit,
            self._health,
            self._shutdown,
            self._stream_in_flight,
        )
        # Without SO_REUSEPORT a port in use is an error, not a second server sharing it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *self._server_options])
        if self._ingest is not None:
            servicer = self._ingestor = IngestorServicer(handlers)
            pb_grpc.add_IngestorPluginServicer_to_server(servicer, server)
            pb_grpc.add_IngestorStreamServicer_to_server(servicer, server)
        else:
            pb_grpc.add_EmitterPluginServicer_to_server(EmitterServicer(handlers), server)
        try:
            try:
                self.port = server.add_insecure_port(self.listen)
            except RuntimeError as exc:
                raise RegistryError(f"cannot listen on {self.listen}: {exc}") from exc
            self._address = self._advertise or await self._bound_address()
            await server.start()
        except BaseException:
            await server.stop(None)
            self._shutdown_pools()
            raise
        self._server = server
        self._state = _State.STARTED
        self._client = self._new_client()
        self._keeper = _Keeper.acquire(
            (
                asyncio.get_running_loop(),
                self._registries,
                self._token,
                self._tls,
                self._registry_timeout,
            )
        )
        self._task = asyncio.create_task(self._keep_registered(), name=f"plugin-{name}-registry")
        log.info("plugin %s listening on %s", name, self._address)

    async def stop(self, grace: float | None = None) -> None:
        """Unregister, then stop serving; calls in flight get ``grace`` seconds to finish.

        ``grace=None`` uses the host's. Idempotent and safe before ``start``; concurrent
        calls return when the first has finished. A failed Unregister is logged (the
        lease then lapses on its own). :meth:`hurry` cuts it short. Cancelled while
        unregistering, it still stops the server and releases its threads before the
        CancelledError propagates.
        """
        async with self._lock:
            if self._state is _State.STOPPED:
                return
            started, self._state = self._state is _State.STARTED, _State.STOPPED
            self._changed.set()
            try:
                if started:
                    await self._unregister_in_time()
            finally:
                server, self._server = self._server, None
                try:
                    if server is not None:
                        await self._stop_server(server, self.grace if grace is None else grace)
                finally:
                    self._shutdown_pools()
                    keeper, self._keeper = self._keeper, None
                    if keeper is not None:
                        await keeper.release()
                    if self._client is not None:
                        await self._client.close()

    def hurry(self) -> None:
        """Cut the phase of :meth:`stop` under way short (what a second signal does).

        Before or during the unregister: what is left of it gets the host's ``grace``
        seconds at most, so a slow registry cannot hold the process; the Unregister
        still goes out, as it is what keeps a stopped plugin out of the registry.
        Once unregistered: calls in flight are cancelled instead of getting the rest
        of their grace. So a signal sent twice at once (``timeout`` signals both the
        process and its group) bounds the unregister and leaves the calls their
        grace; one sent later ends them. Idempotent per phase; call it on the host's
        event loop.
        """
        if self._stopping_server is not None:
            if self._cut is None:
                log.warning("plugin %s: cancelling the calls in flight", self.info.name)
                # gRPC keeps the most restrictive grace of concurrent stops.
                self._cut = asyncio.ensure_future(self._stopping_server.stop(0))
        elif self._unregister_scope is not None:
            self._bound_unregister(self._unregister_scope)
        elif self._state is not _State.STOPPED:
            self._hurry_unregister = True

    async def wait_registered(self) -> str:
        """Wait until the registry has accepted this instance and return its id.

        Raises:
            InvalidArgument: the registry refused the registration for good.
            RegistryError: the host is stopped (or was never started).
        """
        while True:
            self._changed.clear()
            if self._failure is not None:
                raise self._failure
            if self._state is not _State.STARTED:
                raise RegistryError(f"the plugin host is {self._state.value}, not started")
            if self._plugin_id is not None:
                return self._plugin_id
            await self._changed.wait()

    async def wait(self) -> None:
        """Wait until the host stops.

        Raises:
            InvalidArgument: the registry refused the registration for good; the
                server keeps serving until :meth:`stop`.
        """
        while self._state is not _State.STOPPED:
            if self._failure is not None:
                raise self._failure
            self._changed.clear()
            await self._changed.wait()

    # -- registration ------------------------------------------------------------------------

    def _request(self, address: str) -> pb.RegisterRequest:
        return pb.RegisterRequest(
            info=self.info, address=address, lease_ttl_seconds=self._lease_ttl, labels=self._labels
        )

    async def _bound_address(self) -> str:
        if self.listen.startswith("unix:"):
            return self.listen
        host = self.listen.rpartition(":")[0]
        if host in _WILDCARD_HOSTS:
            host = await asyncio.to_thread(_route_host, self._registries[0])
        return f"{host}:{self.port}"

    def _set_plugin_id(self, plugin_id: str | None) -> None:
        self._plugin_id = plugin_id
        self._changed.set()

    async def _keep_registered(self) -> None:
        """Register, heartbeat until the registry forgets this instance, and again.

        Runs until cancelled (by :meth:`stop`) or until the registry refuses the
        registration as invalid. Anything else is logged and retried.
        """
        while True:
            try:
                response = await self._register()
                self._set_plugin_id(response.plugin_id)
                self._set_drained(False)  # a new instance is in routing
                log.info(
                    "plugin %s registered as %s (heartbeat every %ss)",
                    self.info.name,
                    response.plugin_id,
                    response.heartbeat_interval_seconds,
                )
                await self._heartbeat(response)
            except InvalidArgument as exc:
                log.error("registry refused plugin %s: %s", self.info.name, exc)
                self._failure = exc
                self._changed.set()
                return
            except Exception:
                log.exception("keeping plugin %s registered failed; starting over", self.info.name)
                await asyncio.sleep(self._backoff.maximum)
            self._set_plugin_id(None)

    async def _register(self) -> pb.RegisterResponse:
        """Register, retrying with backoff until accepted.

        Raises:
            InvalidArgument: the registry refused a field (retrying cannot help).
        """
        delays = self._backoff.delays()
        failures = 0
        while True:
            try:
                response = await self._register_once()
                if response.accepted:
                    return response
                problem: str | BaseException = response.message or "not accepted"
            except InvalidArgument:
                raise
            except RegistryError as exc:
                # Including AlreadyExists: it ends when the owner of the source goes.
                problem = exc
                await self._reset_client(exc)
            except Exception as exc:
                log.exception("registering plugin %s failed unexpectedly", self.info.name)
                problem = exc
            failures += 1
            delay = next(delays)
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(
                level,
                "cannot register plugin %s with %s (%s); retrying in %.1fs",
                self.info.name,
                self.registry,
                problem,
                delay,
            )
            await asyncio.sleep(delay)

    async def _register_once(self) -> pb.RegisterResponse:
        """One Register, shielded so that :meth:`stop` can still learn (and remove) the id."""
        assert self._client is not None
        pending = asyncio.ensure_future(
            self._client.register(
                self.info, self._address, lease_ttl_seconds=self._lease_ttl, labels=self._labels
            )
        )
        self._pending = pending
        try:
            response = await asyncio.shield(pending)
        except asyncio.CancelledError:
            raise  # stop() waits for the call and removes what it registered
        except BaseException:
            self._pending = None
            raise
        self._pending = None
        return response

    async def _heartbeat(self, registration: pb.RegisterResponse) -> None:
        """Heartbeat at the granted interval; return when the registry no longer knows us."""
        assert self._client is not None
        interval = float(registration.heartbeat_interval_seconds) or _FALLBACK_INTERVAL
        if registration.lease_ttl_seconds:
            # The interval is whole seconds: a 1 s lease is granted 1 s; beat thrice a TTL.
            interval = min(interval, registration.lease_ttl_seconds / 3)
        plugin_id = registration.plugin_id
        delay, delays, failures = interval, self._backoff.delays(), 0
        while True:
            await asyncio.sleep(delay)
            try:
                acknowledged = await self._renew(plugin_id)
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning("heartbeat of %s failed (%s); retrying", plugin_id, exc)
                await self._reset_client(exc)
                delay = min(interval, next(delays))
                continue
            if not acknowledged:
                log.warning(
                    "registry no longer knows %s (restarted, replaced or expired); registering",
                    plugin_id,
                )
                return
            if failures:
                log.info("heartbeat of %s acknowledged again", plugin_id)
            delay, delays, failures = interval, self._backoff.delays(), 0
            await self._check_drained(plugin_id, within=interval / 2)

    async def _renew(self, plugin_id: str) -> bool:
        """One renewal: over the process's KeepAlive stream, else a unary Heartbeat."""
        assert self._client is not None
        if self._keeper is None:
            return await self._client.heartbeat(plugin_id)
        return await self._keeper.renew(plugin_id, self._client.current_address)

    async def _check_drained(self, plugin_id: str, *, within: float) -> None:
        """Ask the registry whether it drained this instance; at most ``within`` seconds."""
        if not self._drain_readable or self._client is None:
            return
        try:
            async with asyncio.timeout(within):
                plugin = await self._client.get_plugin(plugin_id)
        except (TimeoutError, RegistryUnavailable, NotFound):
            return  # asked again after the next heartbeat, which tells if it is gone
        except RegistryError as exc:
            # No "read" scope, or a registry without GetPlugin: asking again cannot help.
            self._drain_readable = False
            log.info(
                "plugin %s cannot read its own status, so a drain goes unnoticed here: %s",
                self.info.name,
                exc,
            )
            return
        self._set_drained(plugin.status == pb.PLUGIN_STATUS_DRAINING)

    def _set_drained(self, drained: bool) -> None:
        if drained == self._drained:
            return
        self._drained = drained
        log.info(
            "plugin %s %s",
            self.info.name,
            "drained: out of routing, still registered" if drained else "back in routing",
        )
        if self._on_drain is not None:
            try:
                self._on_drain(drained)
            except Exception:
                log.exception("on_drain of plugin %s failed", self.info.name)

    async def _reset_client(self, exc: BaseException) -> None:
        """Start from a new channel after an unreachable registry.

        A channel that failed to connect waits out gRPC's own reconnect backoff (up to
        two minutes); a new one dials at once, so a restarted registry is found on the
        next attempt. With several replicas the new client starts where the old one
        had moved on to, past the one that failed last.
        """
        if not isinstance(exc, RegistryUnavailable) or self._client is None:
            return
        old = self._client
        self._client = self._new_client(old.current_address)
        await old.close()

    def _new_client(self, first: str | None = None) -> RegistryClient:
        addresses = self._registries
        if first is not None:
            at = addresses.index(first)
            addresses = addresses[at:] + addresses[:at]
        return RegistryClient(
            addresses, timeout=self._registry_timeout, token=self._token, tls=self._tls
        )

    async def _unregister_in_time(self) -> None:
        """Unregister; once hurried, within the grace (then the lease lapses instead)."""
        try:
            async with asyncio.timeout(None) as scope:
                self._unregister_scope = scope
                if self._hurry_unregister:
                    self._bound_unregister(scope)
                await self._unregister()
        except TimeoutError:
            if not scope.expired():
                raise
            log.warning(
                "plugin %s: unregistering took longer than the %gs grace (its lease will lapse)",
                self.info.name,
                self.grace,
            )
        finally:
            self._unregister_scope = None

    def _bound_unregister(self, scope: asyncio.Timeout) -> None:
        if scope.when() is None:
            log.info("plugin %s: unregistering within %gs at most", self.info.name, self.grace)
            scope.reschedule(asyncio.get_running_loop().time() + self.grace)

    async def _stop_server(self, server: grpc.aio.Server, grace: float) -> None:
        """Stop ``server``, letting calls in flight have ``grace`` (:meth:`hurry` cuts it).

        Ingest streams stop taking requests first: each ends once it has answered what
        it took, instead of holding the stop for the whole grace.
        """
        self._stopping_server = server
        log.info("plugin %s: stopping its server (grace %gs)", self.info.name, grace)
        if self._ingestor is not None:
            self._ingestor.end_streams()
        try:
            await server.stop(grace)
        finally:
            self._stopping_server = None
            cut, self._cut = self._cut, None
            if cut is not None:
                await cut

    async def _unregister(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        ids = [self._plugin_id] if self._plugin_id else []
        pending, self._pending = self._pending, None
        if pending is not None:
            # A Register still in flight may yet succeed: its id must go too.
            try:
                await asyncio.wait([pending])
            except asyncio.CancelledError:
                pending.cancel()  # out of time: the lease of what it registers lapses
                raise
            if not pending.cancelled() and pending.exception() is None:
                ids.append(pending.result().plugin_id)
        self._set_plugin_id(None)
        assert self._client is not None
        for plugin_id in dict.fromkeys(ids):
            try:
                await self._client.unregister(plugin_id)
            except RegistryError as exc:
                log.warning("cannot unregister %s (its lease will lapse): %s", plugin_id, exc)
            else:
                log.info("plugin %s unregistered %s", self.info.name, plugin_id)

    def _shutdown_pools(self) -> None:
        pools, self._pools = self._pools, []
        for pool in pools:
            # A handler still running in a thread after the grace is abandoned, not joined.
            pool.shutdown(wait=False, cancel_futures=True)
