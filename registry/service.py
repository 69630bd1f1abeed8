"""The PluginRegistry gRPC servicer: wire messages in, one state call, wire messages out.

Only this module turns domain errors into status codes. Nothing a client sends can
produce UNKNOWN: unexpected failures answer INTERNAL and are logged.

Replicas (SPEC §8): on a follower, writes are checked here as on the leader, then
forwarded to it (``registry.replica.forward``) and answered once this replica's
catalogue holds the revision the leader named; heartbeats are answered here and
reach the leader in batches. Reads and Watch are this replica's own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty

from registry import convert, keepalive
from registry.catalog import FirstCheck
from registry.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RegistryUnavailable,
    ResourceExhausted,
    StoreError,
    Unauthenticated,
)
from registry.labels import parse_selector
from registry.model import Principal
from registry.poller import HealthChecker
from registry.replica.forward import REVISION_KEY
from registry.replica.node import Replication
from registry.settings import POLICY_MAX_INSTANCES, RegistrySettings
from registry.state import RegistryState
from registry.trust.addresses import (
    AddressPolicy,
    HostResolver,
    Unresolvable,
    parse_address,
    vet,
)
from registry.trust.auth import FORWARDED_FOR_KEY, current_origin, current_principal
from registry.validation import (
    check_plugin_id,
    check_plugin_name,
    check_sources,
    plugin_type_filter,
    registration_from_request,
    status_filter,
)
from registry.watch import WatchHub
from registry.wire import pb, pb_grpc

if TYPE_CHECKING:
    from registry.metrics import RegistryMetrics

log = logging.getLogger(__name__)
# Every accepted write: who, from where, what (SPEC §6 "Audit").
audit = logging.getLogger("registry.audit")

DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
# A page also ends before this many bytes, so it fits a client's default 4 MiB limit.
PAGE_BYTES = 3 * 1024 * 1024
_TOKEN_PREFIX = b"after:"

BYTES_LIMIT = "max_bytes_per_plugin"
# What a RegisteredPlugin holds beyond the RegisterRequest it is made from, at most
# (tag, length and widest value of each field): plugin_id 1+1+26; status 1+1;
# registered_at, last_heartbeat_at and last_check_at 3 x (1+1 + seconds 1+10 + nanos
# 1+5); revision 1+10; lease_ttl_seconds 1+5 when the default fills it in. info,
# address and labels encode alike in both messages (same types, one-byte tags).
REGISTERED_OVERHEAD = 28 + 2 + 3 * 19 + 11 + 6

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),
]
# What a client hears of a database failure: the details (SQL, parameters, paths) go
# to the log only.
STORE_FAILED = "the registry cannot store changes right now; retry shortly"
# How long a follower waits for its catalogue to hold a write the leader answered.
APPLIED_TIMEOUT = 2.0
INTERNAL_ERROR = "internal error; see the registry's log"
CANCELLED_UNDER = "the registry could not finish this call (a role change); retry shortly"

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def _status_mapped(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Answer domain errors with their status code, anything else with INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the client went away (or the server stops): nobody to answer
            # Something awaited was cancelled, not this call: gRPC would answer nothing
            # and the client would wait out its deadline.
            log.warning("%s: an awaited operation was cancelled", method.__name__)
            await context.abort(grpc.StatusCode.UNAVAILABLE, CANCELLED_UNDER)
            raise  # unreachable: abort raises
        except Exception as exc:
            code = next((c for kind, c in _CODES if isinstance(exc, kind)), None)
            message = str(exc)
            if code is None:
                log.exception("%s failed", method.__name__)
                code, message = grpc.StatusCode.INTERNAL, INTERNAL_ERROR
            elif isinstance(exc, StoreError):
                log.warning("%s not stored: %s", method.__name__, exc)
                message = STORE_FAILED
            await context.abort(code, message)
            raise  # unreachable: abort raises

    return wrapper


def _audit(
    context: grpc.aio.ServicerContext,
    principal: Principal | None,
    action: str,
    name: str,
    detail: str,
) -> None:
    origin = current_origin()
    audit.info(
        "%s principal=%s peer=%s name=%s %s",
        action,
        principal.name if principal is not None else "-",
        context.peer() if origin is None else f"{origin} via {context.peer()}",
        name,
        detail,
    )


def page_token(after: str) -> str:
    return base64.urlsafe_b64encode(_TOKEN_PREFIX + after.encode()).decode()


def _after(token: str) -> str:
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token.encode())
    except (binascii.Error, ValueError):
        raw = b""
    if not raw.startswith(_TOKEN_PREFIX):
        raise InvalidArgument("page_token", "is not a next_page_token from ListPlugins")
    return raw[len(_TOKEN_PREFIX) :].decode(errors="replace")


def registered_size(request: pb.RegisterRequest) -> int:
    """An upper bound of the encoded RegisteredPlugin that ``request`` would become.

    The request's own size plus :data:`REGISTERED_OVERHEAD`: at most that many bytes
    over the truth (less what the request carries that the plugin does not: its
    ``no_lease`` flag, fields unknown to this registry). ``last_error`` is left out:
    the registry writes it later, in its own words of bounded length.
    """
    size: int = request.ByteSize()
    return size + REGISTERED_OVERHEAD


class RegistryService(pb_grpc.PluginRegistryServicer):  # type: ignore[misc]
    """Maps each RPC of ``polku.v1.PluginRegistry`` to one call on the state."""

    def __init__(
        self,
        state: RegistryState,
        hub: WatchHub,
        messages: convert.MessageCache,
        settings: RegistrySettings,
        *,
        address_policy: AddressPolicy,
        resolver: HostResolver,
        replication: Replication | None = None,
        status: Callable[[], Awaitable[pb.RegistryStatus]] | None = None,
        metrics: RegistryMetrics | None = None,
        checker: HealthChecker | None = None,
    ) -> None:
        self._state = state
        # Told of the plugins a KeepAlive stream renewed when the stream ends.
        self._checker = checker
        self._replication = replication
        self._status = status
        self._hub = hub
        self._messages = messages
        self._settings = settings
        self._address_policy = address_policy
        self._resolver = resolver
        self._metrics = metrics
        self._max_instances = int(
            settings.per_principal(settings.max_instances_per_principal, POLICY_MAX_INSTANCES)
        )

    def _instance(self, plugin_id: str) -> tuple[Principal | None, str]:
        """The caller and a plugin id it may act on (its own instance, or any as admin).

        Raises:
            InvalidArgument: the id is malformed.
            PermissionDenied: the instance belongs to another principal's plugin.
        """
        plugin_id = check_plugin_id("plugin_id", plugin_id, self._settings.limits)
        principal = current_principal()
        if principal is not None:
            self._state.check_instance_access(principal, plugin_id)
        return principal, plugin_id

    def _follower(self) -> Replication | None:
        """The replication while this replica follows (writes go to the leader)."""
        replication = self._replication
        return replication if replication is not None and not replication.leading else None

    async def _forward(
        self, replication: Replication, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        """Have the leader answer ``request`` as the caller; answer once applied here.

        A call that was forwarded already is not sent on again: the replica that
        forwarded it took this one for the leader, and chains must not form.
        """
        metadata = context.invocation_metadata() or ()
        if any(key == FORWARDED_FOR_KEY for key, _ in metadata):
            raise RegistryUnavailable("this replica is not the leader (any more); retry shortly")
        try:
            response, revision = await replication.link.forward(
                method, request, current_principal(), context.peer()
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        if revision and not await self._state.wait_applied(revision, APPLIED_TIMEOUT):
            log.warning("revision %d not applied here within %ss", revision, APPLIED_TIMEOUT)
        return response

    def _name_revision(self, context: grpc.aio.ServicerContext, revision: int) -> None:
        """Leading among replicas: name the revision of a write, for the follower."""
        if self._replication is not None and revision:
            context.set_trailing_metadata(((REVISION_KEY, str(revision)),))

    @_status_mapped
    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        settings = self._settings
        registration = registration_from_request(request, settings.lease_ttl, settings.limits)
        # Totals (SPEC §7): before the address is vetted (resolved) or anything stored.
        self._state.check_room(registration, settings.max_plugins)
        size = registered_size(request)
        if size > settings.max_bytes_per_plugin:
            raise ResourceExhausted(
                BYTES_LIMIT,
                f"the registration would take up to {size} bytes encoded; "
                f"the limit is {settings.max_bytes_per_plugin}",
            )
        # Vetted here (names resolved), and again before every dial of the plugin.
        address = parse_address("address", registration.address)
        with contextlib.suppress(Unresolvable):  # accepted; vetted again at every dial
            await vet(address, self._address_policy, self._resolver)
        follower = self._follower()
        if follower is not None:
            answer: pb.RegisterResponse = await self._forward(
                follower, "Register", request, context
            )
            return answer
        principal = current_principal()
        # The first health check is folded into the one change that stores the plugin
        # (SPEC §5: one watch message per registration), once every cheap refusal is
        # past: a registration that would be refused makes the registry dial nothing.
        wait = settings.first_check_wait
        checker = self._checker if wait else None
        first: contextlib.AbstractAsyncContextManager[FirstCheck | None]
        if checker is not None:
            self._state.check_register(
                registration,
                principal,
                max_live_instances=self._max_instances,
                max_plugins=settings.max_plugins,
            )
            first = checker.first_check(registration.address, registration.type, wait)
        else:
            first = contextlib.nullcontext(None)
        async with first as check:
            # The rules again (max_plugins too), where nothing can come between the
            # checks and the store.
            plugin = await self._state.register(
                registration,
                principal,
                max_live_instances=self._max_instances,
                max_plugins=settings.max_plugins,
                first_check=check,
            )
        _audit(
            context,
            principal,
            "register",
            plugin.name,
            f"id={plugin.plugin_id} revision={plugin.revision}",
        )
        self._name_revision(context, plugin.revision)
        ttl = registration.lease_ttl_seconds
        return pb.RegisterResponse(
            accepted=True,
            message="registered",
            plugin_id=plugin.plugin_id,
            lease_ttl_seconds=ttl,
            heartbeat_interval_seconds=ttl and max(1, ttl // 3),
        )

    @_status_mapped
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        follower = self._follower()
        if follower is not None:
            answer = await self._follower_heartbeat(follower, request, context)
        else:
            _, plugin_id = self._instance(request.plugin_id)
            answer = pb.HeartbeatResponse(acknowledged=self._state.heartbeat(plugin_id) is not None)
        if self._metrics is not None:
            self._metrics.heartbeat(answer.acknowledged)
        return answer

    async def _follower_heartbeat(
        self,
        follower: Replication,
        request: pb.HeartbeatRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.HeartbeatResponse:
        """Answered here when this replica knows the caller may renew the instance
        (open mode, an admin, or the owner the leader last confirmed), and handed to
        the leader in the next batch; otherwise the leader answers, and its yes
        teaches this replica the owner."""
        plugin_id = check_plugin_id("plugin_id", request.plugin_id, self._settings.limits)
        principal = current_principal()
        plugin = self._state.view.get(plugin_id)
        if (
            plugin is not None
            and follower.may_renew(principal, plugin.name)
            and self._state.heartbeat(plugin_id) is not None
        ):
            follower.link.heartbeat(plugin_id, principal)
            return pb.HeartbeatResponse(acknowledged=True)
        # Unknown here (yet), expired, or an owner this replica has not learnt.
        answer: pb.HeartbeatResponse = await self._forward(follower, "Heartbeat", request, context)
        if answer.acknowledged and plugin is not None:
            follower.learn_owner(plugin.name, principal)
        return answer

    @_status_mapped
    async def KeepAlive(
        self, requests: AsyncIterator[pb.KeepAliveRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Renew leases over one stream, one answer per request, in order (SPEC §1.3).

        Each request as a Heartbeat (same checks, same metrics); the stream's end
        checks the plugins it renewed at once (:mod:`registry.keepalive`).
        """
        await keepalive.serve(context, functools.partial(self._renew, context), self._checker)

    def _renew(
        self, context: grpc.aio.ServicerContext, plugin_id: str
    ) -> pb.KeepAliveResponse | Awaitable[pb.KeepAliveResponse]:
        """One KeepAlive request: answered here, or awaitable on a follower."""
        follower = self._follower()
        if follower is not None:
            return self._follower_renew(follower, plugin_id, context)
        _, plugin_id = self._instance(plugin_id)
        plugin = self._state.heartbeat(plugin_id)
        if self._metrics is not None:
            self._metrics.heartbeat(plugin is not None)
        if plugin is None:
            return pb.KeepAliveResponse(plugin_id=plugin_id)
        return pb.KeepAliveResponse(
            plugin_id=plugin_id,
            acknowledged=True,
            lease_ttl_seconds=plugin.registration.lease_ttl_seconds,
        )

    async def _follower_renew(
        self, follower: Replication, plugin_id: str, context: grpc.aio.ServicerContext
    ) -> pb.KeepAliveResponse:
        """A renewal on a follower: as its Heartbeat (:meth:`_follower_heartbeat`)."""
        answer = await self._follower_heartbeat(
            follower, pb.HeartbeatRequest(plugin_id=plugin_id), context
        )
        if self._metrics is not None:
            self._metrics.heartbeat(answer.acknowledged)
        plugin = self._state.view.get(plugin_id) if answer.acknowledged else None
        return pb.KeepAliveResponse(
            plugin_id=plugin_id,
            acknowledged=answer.acknowledged,
            lease_ttl_seconds=plugin.registration.lease_ttl_seconds if plugin else 0,
        )

    @_status_mapped
    async def Unregister(
        self, request: pb.UnregisterRequest, context: grpc.aio.ServicerContext
    ) -> Empty:
        principal, plugin_id = self._instance(request.plugin_id)
        follower = self._follower()
        if follower is not None:
            answer: Empty = await self._forward(follower, "Unregister", request, context)
            return answer
        plugin = self._state.catalog.get(plugin_id)
        revision = await self._state.remove([plugin_id])
        self._name_revision(context, revision)
        if plugin is not None:
            _audit(
                context, principal, "unregister", plugin.name, f"id={plugin_id} revision={revision}"
            )
        return Empty()

    @_status_mapped
    async def Drain(
        self, request: pb.DrainRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainResponse:
        """Take one instance (``plugin_id``), or every instance of a ``name``, out of
        routing, or put it back (``undrain``): one revision for all that changed.

        By name, the instances held now; one registered later is not drained.
        Idempotent: a drain that changes nothing makes no revision (the response
        names the current one) and no audit line.
        """
        limits = self._settings.limits
        target = request.WhichOneof("target")
        principal = current_principal()
        if target == "plugin_id":
            principal, plugin_id = self._instance(request.plugin_id)
            name = ""
        elif target == "name":
            plugin_id, name = "", check_plugin_name("name", request.name, limits)
            self._state.check_name_access(principal, name)
        else:
            raise InvalidArgument("target", "set plugin_id or name")
        follower = self._follower()
        if follower is not None:
            answer: pb.DrainResponse = await self._forward(follower, "Drain", request, context)
            return answer
        if name:
            plugin_ids = self._state.instances_of(name)
            if not plugin_ids:
                raise NotFound(f"name: no instance of plugin {name!r} is registered")
        else:
            held = self._state.catalog.get(plugin_id)
            if held is None:
                raise NotFound(f"plugin_id: no plugin {plugin_id!r} is registered")
            name, plugin_ids = held.name, [plugin_id]
        revision = await self._state.drain(plugin_ids, drained=not request.undrain)
        view = self._state.view
        plugins = [p for p in map(view.get, plugin_ids) if p is not None]
        if revision:
            changed = ",".join(p.plugin_id for p in plugins if p.revision == revision)
            action = "undrain" if request.undrain else "drain"
            _audit(context, principal, action, name, f"id={changed} revision={revision}")
        self._name_revision(context, revision or view.revision)
        return pb.DrainResponse(
            plugins=[self._messages.get(p) for p in plugins], revision=revision or view.revision
        )

    @_status_mapped
    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        name = check_plugin_name("name", request.name, self._settings.limits)
        follower = self._follower()
        if follower is not None:
            answer: pb.ReleaseResponse = await self._forward(follower, "Release", request, context)
            return answer
        released = await self._state.release(name)
        if released is None:
            return pb.ReleaseResponse(released=False)
        _audit(
            context,
            current_principal(),
            "release",
            name,
            f"owner={released.principal} id=- revision={self._state.catalog.revision}",
        )
        return pb.ReleaseResponse(
            released=True,
            principal=released.principal,
            sources=list(released.sources),
            emitter_names=list(released.emitter_names),
        )

    @_status_mapped
    async def ListPlugins(
        self, request: pb.ListPluginsRequest, context: grpc.aio.ServicerContext
    ) -> bytes:  # an encoded ListPluginsResponse (registry.server)
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        # A keyset walk from the token's id: O(log n + page), whatever page it is.
        matching = self._state.view.select(
            type=plugin_type_filter(request.type),
            source=request.source,
            statuses=status_filter(request.statuses),
            name=request.name,
            labels=parse_selector(request.label_selector, self._settings.limits),
            after=_after(request.page_token),
        )
        page: list[bytes] = []
        budget = PAGE_BYTES
        last = ""
        for plugin in matching:
            item = self._messages.encoded(plugin)
            budget -= len(item)
            if len(page) == size or (page and budget < 0):
                # More exists: hand out a token for the rest.
                return convert.plugin_list(page, self._state.view.revision, page_token(last))
            page.append(item)
            last = plugin.plugin_id
        return convert.plugin_list(page, self._state.view.revision, "")

    @_status_mapped
    async def GetPlugin(
        self, request: pb.GetPluginRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisteredPlugin:
        plugin_id = check_plugin_id("plugin_id", request.plugin_id, self._settings.limits)
        plugin = self._state.view.get(plugin_id)
        if plugin is None:
            raise NotFound(f"plugin_id: no plugin {plugin_id!r} is registered")
        return self._messages.get(plugin)

    @_status_mapped
    async def Resolve(
        self, request: pb.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveResponse:
        selector = parse_selector(request.label_selector, self._settings.limits)
        target = request.WhichOneof("target")
        if target == "source" and request.source:
            plugins = self._state.view.by_source(request.source)
        elif target == "emitter_name" and request.emitter_name:
            plugins = self._state.view.by_emitter(request.emitter_name)
        else:
            raise InvalidArgument("target", "set source or emitter_name")
        return pb.ResolveResponse(
            endpoints=[
                convert.endpoint(p)
                for p in plugins
                if p.routable and (not selector or selector.matches(p.registration.labels))
            ],
            revision=self._state.view.revision,
        )

    @_status_mapped
    async def GetStatus(
        self, request: Empty, context: grpc.aio.ServicerContext
    ) -> pb.RegistryStatus:
        if self._status is None:
            raise RegistryUnavailable("the registry's status is not available")
        return await self._status()

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:  # encoded WatchResponses (registry.server)
        try:
            if request.since_revision < 0:
                raise InvalidArgument("since_revision", "must not be negative")
            sources = check_sources("sources", request.sources, self._settings.limits)
            selector = parse_selector(request.label_selector, self._settings.limits)
        except InvalidArgument as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        async for message in self._hub.stream(request.since_revision, frozenset(sources), selector):
            yield message
