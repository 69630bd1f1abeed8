"""The registry server: its wiring and lifecycle on one screen.

    async with RegistryServer(RegistrySettings(listen="127.0.0.1:0")) as server:
        print(server.address)
        await server.wait_closed()

Start order: store → migrations → state → watch hub → gRPC (registry, health,
reflection) → health checker, lease reaper, database monitor. Stop order: own
health NOT_SERVING → end Watch streams → ``server.stop(grace)`` → background
actors → state (final flush) → engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from registry import convert
from registry.errors import InvalidArgument, RegistryError, RegistryUnavailable, StoreError
from registry.lifecycle import AsyncService
from registry.metrics import RegistryMetrics
from registry.migrate import describe, upgrade
from registry.model import PluginStatus
from registry.poller import CheckSettings, HealthChecker
from registry.reaper import LeaseReaper
from registry.replica import status as replica_status
from registry.replica.lock import DatabaseLock, lock_for
from registry.replica.node import Replication
from registry.replica.servicer import ReplicaServicer
from registry.service import RegistryService
from registry.settings import RegistrySettings, default_database_url, is_loopback
from registry.state import RegistryState
from registry.storage.store import SqlStore
from registry.transitions import TransitionLog
from registry.trust.addresses import AddressPolicy, HostResolver, SystemResolver
from registry.trust.auth import AuthInterceptor, CallerLimits
from registry.trust.dial import PluginCredentials
from registry.trust.policy import PolicyError, PolicyHolder
from registry.trust.tls import ServerCredentials, TlsFiles, channel_credentials
from registry.validation import check_address
from registry.watch import WatchHub
from registry.wire import pb, pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["PluginRegistry"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# last_error of a stored plugin whose address the parser of this release refuses.
QUARANTINED = "quarantined: stored address no longer valid"
_QUARANTINE_SHOWN = 10  # plugins the one quarantine log line names


class _Registration:
    """Takes the method handlers the generated registration hands a server."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Built again from the method handlers (see :func:`add_registry_servicer`)."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_registry_servicer(service: RegistryService, server: grpc.aio.Server) -> None:
    """The generated registration of PluginRegistry, Watch and ListPlugins sending encoded
    messages as they are.

    The watch hub encodes each message once for every watcher that gets it and yields
    the bytes (registry.watch), and ListPlugins joins the message cache's encoded
    plugins (registry.convert.plugin_list); their response serializer is None, so gRPC
    sends them without parsing or serialising them again. The interceptors keep the
    serializer of the handler they wrap (registry.interception).
    """
    taken = _Registration()
    pb_grpc.add_PluginRegistryServicer_to_server(service, taken)
    handlers = taken.handlers
    watch = handlers["Watch"]
    handlers["Watch"] = grpc.unary_stream_rpc_method_handler(
        watch.unary_stream,
        request_deserializer=watch.request_deserializer,
        response_serializer=None,
    )
    listing = handlers["ListPlugins"]
    handlers["ListPlugins"] = grpc.unary_unary_rpc_method_handler(
        listing.unary_unary,
        request_deserializer=listing.request_deserializer,
        response_serializer=None,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(taken.service, handlers),)
    )
    server.add_registered_method_handlers(taken.service, handlers)


@dataclass(frozen=True, slots=True)
class _Trust:
    interceptor: AuthInterceptor
    credentials: ServerCredentials | None
    plugin_tls: PluginCredentials | None
    addresses: AddressPolicy


class RegistryServer(AsyncService):
    """A running PluginRegistry: ``start()``, idempotent ``stop(grace)``, or ``async with``."""

    def __init__(
        self, settings: RegistrySettings | None = None, *, resolver: HostResolver | None = None
    ) -> None:
        """``resolver`` resolves plugins' host names (tests give a stub; default: the OS)."""
        self.settings = settings or RegistrySettings()
        self.resolver = resolver or SystemResolver()
        self.policy: PolicyHolder | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics: RegistryMetrics | None = None
        self._store: SqlStore | None = None
        self._db_lock: DatabaseLock | None = None
        self._state: RegistryState | None = None
        self._hub: WatchHub | None = None
        self._checker: HealthChecker | None = None
        self._reaper: LeaseReaper | None = None
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._tasks: list[asyncio.Task[None]] = []
        self._replication: Replication | None = None
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        """``host:port`` it listens on (the real port when started on port 0), or the
        ``unix:`` path it was given."""
        if self.settings.listen.startswith("unix:"):
            return self.settings.listen
        host = self.settings.listen.rpartition(":")[0] or "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def checker(self) -> HealthChecker:
        """The health checker (its counters are read by benchmarks and tests)."""
        if self._checker is None:
            raise RegistryError("the registry server is not started")
        return self._checker

    @property
    def metrics(self) -> RegistryMetrics | None:
        """The metrics (served on ``metrics_port``) when ``metrics_listen`` is set."""
        return self._metrics

    @property
    def state(self) -> RegistryState:
        if self._state is None:
            raise RegistryError("the registry server is not started")
        return self._state

    async def start(self) -> None:
        """Open and migrate the database, load the catalog, then serve.

        On PostgreSQL the registry is one replica among any number (SPEC §8): it
        binds its address, campaigns once (a free lease is taken before serving),
        and follows or leads from then on.

        Raises:
            StoreError: the database cannot be opened, migrated or read.
            RegistryError: the listen address cannot be bound.
        """
        settings = self.settings
        trust = self._trust()
        state = await self._open_database()
        metrics = self._metrics = RegistryMetrics() if settings.metrics_listen else None
        if metrics is not None:
            state.on_write = metrics.committed
        messages = convert.MessageCache()
        state.subscribe(messages.forget, on_reset=messages.clear)
        TransitionLog(state, deregister_after=settings.deregister_after).subscribe()
        self._hub = WatchHub(
            state,
            messages,
            retain=settings.change_log_size,
            max_backlog=settings.watch_max_backlog,
            progress_interval=settings.watch_progress_interval,
        )
        self._checker = HealthChecker(
            state,
            CheckSettings(
                interval=settings.health_interval,
                timeout=settings.health_timeout,
                unhealthy_threshold=settings.unhealthy_threshold,
                healthy_threshold=settings.healthy_threshold,
                concurrency=settings.health_concurrency,
                suspect_retry=settings.suspect_retry,
                address_policy=trust.addresses,
                resolver=self.resolver,
                plugin_tls=trust.plugin_tls,
                on_check=metrics.health_checked if metrics is not None else None,
            ),
        )
        self._reaper = LeaseReaper(
            state, deregister_after=settings.deregister_after, tick=settings.reap_interval
        )

        if metrics is not None and not self._store_replicated:
            metrics.track(state, self._hub, self._leadership)  # its view is loaded: count it
        server = grpc.aio.server(
            # Metrics first: they count the calls the trust interceptor refuses, too.
            interceptors=[*([metrics.interceptor] if metrics else []), trust.interceptor],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
        )
        try:
            if trust.credentials is not None:
                self.port = server.add_secure_port(settings.listen, trust.credentials.credentials())
            else:
                self.port = server.add_insecure_port(settings.listen)
        except RuntimeError as exc:
            await self.stop()
            raise RegistryError(f"cannot listen on {settings.listen}: {exc}") from exc
        self._server = server
        if metrics is not None and settings.metrics_listen:
            try:
                self.metrics_port = await metrics.serve(settings.metrics_listen)
            except RegistryError:
                await self.stop()
                raise
            host = settings.metrics_listen.rpartition(":")[0] or "0.0.0.0"
            log.info("metrics served at http://%s:%d/metrics", host, self.metrics_port)
        replication = self._replication = (
            self._replicate(state, trust) if self._store_replicated else None
        )
        service = RegistryService(
            state,
            self._hub,
            messages,
            settings,
            address_policy=trust.addresses,
            resolver=self.resolver,
            replication=replication,
            status=replication.status if replication is not None else self._single_status,
            metrics=metrics,
            checker=self._checker,
        )
        add_registry_servicer(service, server)
        policy = self.policy
        pb_grpc.add_RegistryReplicaServicer_to_server(
            ReplicaServicer(
                state,
                lambda: policy.current if policy else None,
                lambda: replication is not None and replication.leading,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if settings.reflection:
            reflection.enable_server_reflection(
                [
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                server,
            )
        try:
            if replication is not None:
                await replication.start()  # leads at once (on_lead) if the lease is free
                if metrics is not None:  # the follower's view is loaded now
                    metrics.track(state, self._hub, self._leadership)
            else:
                await self._lead()
        except BaseException:
            await self.stop()
            raise
        await server.start()
        await self._set_health(True)
        self._tasks.append(asyncio.create_task(self._watch_database(), name="registry-db-health"))
        self._tasks.append(asyncio.create_task(self._hub.load_history(), name="registry-history"))
        warm = messages.warm(list(state.view))
        self._tasks.append(asyncio.create_task(warm, name="registry-warm-messages"))
        database = describe(self._store.engine) if self._store is not None else "-"
        log.info(
            "registry serving on %s%s (database %s, revision %d, %s)",
            self.address,
            " with TLS" if trust.credentials is not None else "",
            database,
            state.view.revision,
            "auth policy " + str(settings.auth_policy) if settings.secured else "open mode",
            extra={"listen": self.address, "database": database},
        )
        if not settings.secured and not is_loopback(settings.listen):
            log.warning(
                "INSECURE: open mode on %s: anyone who reaches it may register, remove and "
                "redirect plugins; give --auth-policy",
                settings.listen,
            )

    @property
    def advertised(self) -> str:
        """The address other replicas and clients reach this one at."""
        if self.settings.advertise:
            return self.settings.advertise
        if self.settings.listen.startswith("unix:"):
            return self.settings.listen
        host = self.settings.listen.rpartition(":")[0]
        if host in ("", "0.0.0.0", "[::]", "::"):
            host = socket.gethostname()
        return f"{host}:{self.port}"

    @property
    def replication(self) -> Replication | None:
        """The replica's role among others (PostgreSQL); None on SQLite."""
        return self._replication

    def _replicate(self, state: RegistryState, trust: _Trust) -> Replication:
        settings = self.settings
        assert self._store is not None
        credentials = None
        if settings.tls is not None:
            # Replicas present their own certificate to each other and trust the
            # client CA they require of callers, if any, else the system roots.
            credentials = channel_credentials(
                TlsFiles(ca=settings.tls.ca, cert=settings.tls.cert, key=settings.tls.key)
            )
        return Replication(
            state,
            self._store,
            address=self.advertised,
            lease=settings.leader_lease,
            cluster_token=settings.cluster_token,
            credentials=credentials,
            on_lead=self._lead,
            on_follow=self._follow,
            poll_interval=settings.replica_poll_interval,
        )

    async def _lead(self) -> None:
        """Start the leader's work: quarantine, health checks, the reaper."""
        await self._quarantine(self.state)
        self.checker.start()
        if self._reaper is not None:
            self._reaper.start()

    async def _follow(self) -> None:
        """Stop the leader's work (a follower checks nothing and reaps nothing)."""
        for actor in (self._reaper, self._checker):
            if actor is not None:
                await actor.stop()

    def _leadership(self) -> tuple[bool, int]:
        """``(leading, epoch)`` for the metrics: one SQLite registry always leads."""
        replication = self._replication
        if replication is None:
            return True, 0
        return replication.leading, replication.election.epoch

    async def _single_status(self) -> pb.RegistryStatus:
        """GetStatus of the one registry an SQLite file holds."""
        revision = self.state.view.revision
        return replica_status.registry_status(
            address=self.advertised,
            leading=True,
            leader=self.advertised,
            epoch=0,
            head=revision,
            reports=[
                replica_status.Report(
                    self.advertised, "leader", 0, revision, datetime.now(UTC), True
                )
            ],
            backend="sqlite",
        )

    async def _open_database(self) -> RegistryState:
        """Open, check and migrate the database, load the catalog, quarantine bad rows.

        Refused with one line: a missing folder of an SQLite file (``--db`` never
        creates one; the embedded default's own folder is created), an SQLite file
        that exists but is empty, a database that is not this registry's, an SQLite
        file another registry (or a migration) holds the lock of.

        Raises:
            StoreError: the database cannot be opened, is refused, or cannot be
                migrated or read; nothing is left open.
        """
        settings = self.settings
        try:
            # The default's folder (under XDG_DATA_HOME) is the registry's own.
            own = settings.database_url == default_database_url()
            self._store = SqlStore.open(settings.database_url, create_folder=own)
        except ValueError as exc:
            raise StoreError(f"database URL: {exc}") from exc
        try:
            # Before migrating: one registry per SQLite file, and none migrated under another.
            self._db_lock = lock_for(settings.database_url)
            await upgrade(self._store.engine)
            state = RegistryState(
                self._store, flush_interval=settings.flush_interval, retain=settings.change_log_size
            )
            self._state = state
            if not self._store_replicated:
                await state.start()  # replicas start theirs as followers, once bound
        except BaseException:
            await self.stop()
            raise
        return state

    async def _quarantine(self, state: RegistryState) -> None:
        """Take stored plugins whose address no longer parses out of service.

        An earlier release accepted addresses the strict parser now refuses
        (``unix://x``). Such a plugin is logged once here, never dialled (the
        checker parses before it dials), made UNHEALTHY in one revision that
        watchers hear of, and removed after ``deregister_after`` like any dead one.
        """
        limits = self.settings.limits
        bad: list[tuple[str, str]] = []
        quarantined = []
        for plugin in state.catalog:
            try:
                check_address("address", plugin.address, limits)
            except InvalidArgument:
                bad.append((plugin.plugin_id, plugin.address))
                # Dead ones stay as they are: an EXPIRED one must not take its sources back.
                if plugin.status in (PluginStatus.HEALTHY, PluginStatus.UNKNOWN):
                    quarantined.append(
                        dataclasses.replace(
                            plugin, status=PluginStatus.UNHEALTHY, last_error=QUARANTINED
                        )
                    )
        if not bad:
            return
        shown = ", ".join(
            f"{plugin_id} at {address!r}" for plugin_id, address in bad[:_QUARANTINE_SHOWN]
        )
        more = f" and {len(bad) - _QUARANTINE_SHOWN} more" if len(bad) > _QUARANTINE_SHOWN else ""
        log.warning(
            "quarantined %d stored plugin(s) whose address is no longer valid (never "
            "dialled, removed after deregister_after): %s%s",
            len(bad),
            shown,
            more,
        )
        if not quarantined:
            return  # quarantined at an earlier start
        try:
            await state.update(quarantined)
        except RegistryUnavailable as exc:  # never dialled all the same
            log.warning("quarantine not stored: %s", exc)

    async def reload_policy(self) -> bool:
        """Re-read the auth policy file (SIGHUP); a bad file keeps the old policy."""
        return await self.policy.reload() if self.policy is not None else False

    def _trust(self) -> _Trust:
        """Build the policy, interceptor, credentials and address policy from settings.

        Raises:
            RegistryError: the policy file or a certificate cannot be loaded.
        """
        settings = self.settings
        try:
            if settings.auth_policy is not None:
                self.policy = PolicyHolder.from_file(settings.auth_policy)
            credentials = ServerCredentials(settings.tls) if settings.tls is not None else None
            plugin_tls = (
                PluginCredentials(settings.plugin_tls) if settings.plugin_tls is not None else None
            )
            addresses = AddressPolicy.default(
                settings.listen, settings.allow_addresses, settings.allow_unix_dirs
            )
        except (PolicyError, ValueError, OSError) as exc:
            raise RegistryError(str(exc)) from exc
        policy = self.policy
        limits = CallerLimits(
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
            max_connections_per_peer=settings.max_connections_per_peer,
            register_rate=settings.register_rate,
            register_burst=settings.register_burst,
            max_streams_per_principal=settings.max_streams_per_principal,
        )
        interceptor = AuthInterceptor(
            lambda: policy.current if policy else None, limits, settings.cluster_token
        )
        return _Trust(interceptor, credentials, plugin_tls, addresses)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving, letting calls in flight finish within ``grace`` seconds.

        Idempotent and safe before ``start``.
        """
        await self._health.enter_graceful_shutdown()
        if self._metrics is not None:
            await self._metrics.close()  # first: a stopping registry reports nothing more
        replication, self._replication = self._replication, None
        if replication is not None:
            # First: the lease goes to another replica while this one drains its calls.
            await replication.stop()
        if self._hub is not None:
            self._hub.close()  # Watch streams end now rather than at the grace deadline
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        if replication is not None:
            await replication.close()  # writes forwarded during the grace are answered
        for actor in (self._reaper, self._checker):
            if actor is not None:
                await actor.stop()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._state is not None:
            await self._state.stop()
        if self._store is not None:
            await self._store.close()
            self._store = None
        db_lock, self._db_lock = self._db_lock, None
        if db_lock is not None:  # last: the next registry on the file starts after this one
            db_lock.release()
        self._stopped.set()

    @property
    def _store_replicated(self) -> bool:
        return self._store is not None and self._store.dialect == "postgresql"

    async def wait_closed(self) -> None:
        """Wait until :meth:`stop` has finished."""
        await self._stopped.wait()

    async def _set_health(self, serving: bool) -> None:
        status = _SERVING if serving else _NOT_SERVING
        await self._health.set("", status)
        await self._health.set(SERVICE_NAME, status)

    async def _watch_database(self) -> None:
        """Own health follows the database: NOT_SERVING while it fails or takes no writes.

        A failed write turns it NOT_SERVING at once (a full disk answers pings but
        takes no writes). Then a probe write is tried every ``db_check_interval``,
        and the first write that succeeds, the probe's or the journal's, turns it
        SERVING again. While writes succeed, a ping each interval is enough.
        """
        store = self._store
        assert store is not None
        serving = True
        while True:
            changed = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(store.write_changed(), self.settings.db_check_interval)
                changed = True
            try:
                if store.write_error is None:
                    await store.ping()
                elif not changed:  # right after the failure: say so, probe next time
                    await store.probe_write()
                why = "its database takes no writes" if store.write_error else "recovering"
                ok = store.write_error is None and not self.state.recovering
            except StoreError as exc:
                ok, why = False, str(exc)
            except Exception:
                log.exception("database health check failed")
                continue
            if ok != serving:
                serving = ok
                if ok:
                    log.info("registry SERVING again: its database takes writes")
                else:
                    log.warning("registry NOT_SERVING: %s", store.write_error or why)
                await self._set_health(ok)
