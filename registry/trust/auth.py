"""Identity, authorization and per-caller limits at the edge (SPEC §6): one server interceptor.

:class:`AuthInterceptor` wraps every method handler of the server. Per call, in order:

1. ``max_concurrent_rpcs``: calls in flight across the server (always on).
2. ``max_connections_per_peer``: connections with calls in flight per peer IP (always
   on). grpc-python shows a server neither connections nor their ends, only calls and
   their peer address (``ipv4:10.0.0.7:53211``), so a connection is counted while one of
   its calls is in flight; idle connections are not seen, and unix-socket peers (all
   ``unix:``) are not counted.
3. Identity, only while a policy is loaded and only for ``polku.v1.PluginRegistry``
   (``grpc.health.v1`` and reflection stay open): exactly one ``authorization``
   metadata value ``Bearer <token>``, else the verified client certificate (the single
   ``spiffe://`` URI SAN, else the first DNS SAN, else the CN). Nothing else a caller
   sends (other headers, its address, request fields) is ever trusted. Then the scope
   of the method (:data:`METHOD_SCOPES`).
4. Per principal (per peer host in open mode, where there is no principal):
   ``register_rate`` for Register, ``max_streams_per_principal`` for Watch and
   KeepAlive. The per-principal bound on live instances is not here: the catalog
   enforces it, since only it knows which instances are live.

Replicas (SPEC §8): a follower forwards a write to the leader with the cluster token
(``x-polku-cluster-token``) and the name of the principal it verified
(``x-polku-forwarded-for``). With a token that matches ``cluster_token``, the leader
takes that principal from its own policy (scopes included); without one, the header
counts for nothing and the call needs its own identity. ``polku.v1.RegistryReplica``
(heartbeat batches) needs the cluster token whenever one is set or a policy is in
force.

5. Undecodable requests of admitted calls answer INVALID_ARGUMENT
   (:mod:`registry.trust.decoding`).

A refusal aborts with UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED and a
message naming what is missing or the limit. Everything counted is released when the
call ends, however it ends. The handler sees the caller through
:func:`current_principal`; handlers and the state never read metadata. Tokens are never
logged or echoed.

Certificates: grpc-python's server credentials (``ssl_server_credentials`` and
``dynamic_ssl_server_credentials`` alike) either require *and verify* a client
certificate or do not ask for one (checked with grpc 1.85), so x509 properties in a
call's auth context always come from a certificate that chained to the client CA.
"""

from __future__ import annotations

import contextvars
import hmac
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn
from urllib.parse import unquote

import grpc

from registry.interception import Behaviour, WrappingInterceptor, handler_parts
from registry.model import Principal
from registry.trust.decoding import DecodingGuard
from registry.trust.limits import BucketsByKey, KeyedCounter, PeerConnections
from registry.trust.policy import AuthPolicy

log = logging.getLogger(__name__)

SERVICE = "polku.v1.PluginRegistry"
_PREFIX = f"/{SERVICE}/"
REPLICA_SERVICE = "polku.v1.RegistryReplica"
_REPLICA_PREFIX = f"/{REPLICA_SERVICE}/"
# The scope of RegistryReplica's methods: only the other replicas hold it.
CLUSTER_SCOPE = "cluster"
# Metadata of a forwarded call (registry.replica.forward).
CLUSTER_TOKEN_KEY = "x-polku-cluster-token"
FORWARDED_FOR_KEY = "x-polku-forwarded-for"
FORWARDED_PEER_KEY = "x-polku-forwarded-peer"

# The scope each PluginRegistry method needs. Methods of the service that are not
# listed need "admin": a method added to the proto is closed until someone opens it.
METHOD_SCOPES: Mapping[str, str] = MappingProxyType(
    {
        **{
            f"{_PREFIX}{m}": "register"
            for m in ("Register", "Heartbeat", "Unregister", "KeepAlive", "Drain")
        },
        **{
            f"{_PREFIX}{m}": "read"
            for m in ("ListPlugins", "GetPlugin", "Resolve", "Watch", "GetStatus")
        },
        f"{_PREFIX}Release": "admin",
    }
)
_REGISTER = f"{_PREFIX}Register"
# Long-lived streams, counted per principal.
_STREAMS = frozenset({f"{_PREFIX}Watch", f"{_PREFIX}KeepAlive"})

# The per-principal defaults while a policy is in force (SPEC §6).
POLICY_REGISTER_RATE = 20.0
POLICY_REGISTER_BURST = 100
POLICY_MAX_STREAMS = 64
# How many callers' Register buckets are remembered (least recently used go first).
_MAX_BUCKETS = 10_000

_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
_UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
_NO_IDENTITY = (
    "no identity: send metadata 'authorization: Bearer <token>' or a client certificate "
    "that the auth policy names"
)

# A call's invocation metadata, read once per call.
Metadata = tuple[tuple[str, Any], ...]

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "polku_registry_principal", default=None
)
_origin: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "polku_registry_origin", default=None
)


def current_principal() -> Principal | None:
    """The verified principal of the call being handled; None in open mode (no policy).

    Set by :class:`AuthInterceptor` in the call's own context, so it holds in the
    handler and in whatever the handler awaits, also across a streaming response.
    """
    return _principal.get()


def method_scope(method: str) -> str | None:
    """The scope a full method name needs; None for methods of other services (open)."""
    scope = METHOD_SCOPES.get(method)
    if scope is None and method.startswith(_PREFIX):
        return "admin"
    if method.startswith(_REPLICA_PREFIX):
        return CLUSTER_SCOPE
    return scope


def current_origin() -> str | None:
    """The original caller's peer of a verified forwarded call; None otherwise."""
    return _origin.get()


def parse_peer(peer: str) -> tuple[str, str] | None:
    """``(host, connection)`` of a gRPC peer string; None for unix sockets and the unknown.

    ``ipv4:127.0.0.1:5`` → ``("127.0.0.1", "127.0.0.1:5")``; ``ipv6:%5B::1%5D:5`` (grpc
    escapes the brackets) or ``ipv6:[::1]:5`` → ``("::1", "[::1]:5")``; an IPv4-mapped
    address counts as its IPv4 host.
    """
    scheme, _, address = peer.partition(":")
    if scheme == "ipv4":
        host = address.rpartition(":")[0]
    elif scheme == "ipv6":
        if "%" in address:
            address = unquote(address)
        host = address.rpartition(":")[0].removeprefix("[").removesuffix("]")
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on a dual-stack socket is the same host
    else:
        return None
    return (host, address) if host else None


@dataclass(frozen=True, slots=True)
class CallerLimits:
    """The limits :class:`AuthInterceptor` enforces.

    ``max_concurrent_rpcs`` and ``max_connections_per_peer`` are always on. The others
    are per principal: None means the default for the mode (with a policy: Register at
    20/s with a burst of 100, 64 Watch and KeepAlive streams; in open mode: off), 0
    means off. In open mode, when set, they count per peer host. (The per-principal
    bound on live instances is the catalog's.)

    Raises:
        ValueError: a field is out of range (the message names it).
    """

    max_concurrent_rpcs: int = 1024
    max_connections_per_peer: int = 256
    register_rate: float | None = None
    register_burst: int | None = None
    max_streams_per_principal: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_concurrent_rpcs", "max_connections_per_peer"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}: {value!r} must be an integer of at least 1")
        for name in ("register_burst", "max_streams_per_principal"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name}: {value!r} must be a non-negative integer (0: off)")
        rate = self.register_rate
        if rate is not None and (
            isinstance(rate, bool)
            or not isinstance(rate, int | float)
            or not math.isfinite(rate)
            or rate < 0
        ):
            raise ValueError(f"register_rate: {rate!r} must be a non-negative number (0: off)")

    def register_bucket(self, secured: bool) -> tuple[float, int] | None:
        """``(rate, burst)`` of the Register bucket in a mode; None when it is off."""
        rate = self.register_rate
        if rate is None:
            rate = POLICY_REGISTER_RATE if secured else 0.0
        burst = POLICY_REGISTER_BURST if self.register_burst is None else self.register_burst
        return (float(rate), burst) if rate > 0 and burst > 0 else None

    def max_streams(self, secured: bool) -> int | None:
        """Watch and KeepAlive streams per principal in a mode; None when off."""
        streams = self.max_streams_per_principal
        if streams is None:
            streams = POLICY_MAX_STREAMS if secured else 0
        return streams or None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Mode:
    """The per-caller counters of one mode (with a policy, or open)."""

    __slots__ = ("buckets", "streams")

    def __init__(self, limits: CallerLimits, secured: bool) -> None:
        bucket = limits.register_bucket(secured)
        self.buckets = BucketsByKey(*bucket, max_keys=_MAX_BUCKETS) if bucket else None
        streams = limits.max_streams(secured)
        self.streams = KeyedCounter(streams) if streams else None


@dataclass(frozen=True, slots=True)
class _Rule:
    """What the interceptor does for one method, worked out once."""

    method: str
    short: str  # "Register", for messages
    scope: str | None  # None: open, no identity needed
    register: bool
    stream: bool


class _Ticket:
    """What one admitted call holds, to give back when it ends."""

    __slots__ = ("connection", "host", "key", "origin", "streams", "var")

    def __init__(self) -> None:
        self.host: str | None = None
        self.connection = ""
        self.streams: KeyedCounter | None = None
        self.key: str = ""
        self.var: contextvars.Token[Principal | None] | None = None
        self.origin: contextvars.Token[str | None] | None = None


class AuthInterceptor(WrappingInterceptor):
    """Turns a bearer token or a verified client certificate into a principal; enforces limits.

    ``policy`` is asked on every call (a :class:`~registry.trust.policy.PolicyHolder`
    fits), so a reload applies to the next call; None means open mode. The counters
    live on the event loop; the interceptor serves one ``grpc.aio`` server.

    Handlers must be async (coroutine functions or async generators, as all of
    ``grpc.aio``'s are); a sync handler is refused with UNIMPLEMENTED rather than
    served unguarded.
    """

    def __init__(
        self,
        policy: Callable[[], AuthPolicy | None],
        limits: CallerLimits,
        cluster_token: str | None = None,
    ) -> None:
        super().__init__()
        self._policy = policy
        self._cluster_token = cluster_token.encode() if cluster_token else None
        self.limits = limits
        self._max_rpcs = limits.max_concurrent_rpcs
        self._in_flight = 0
        self._peers = PeerConnections(limits.max_connections_per_peer)
        self._secured = _Mode(limits, secured=True)
        self._open = _Mode(limits, secured=False)
        # Undecodable requests answer INVALID_ARGUMENT once admitted (SPEC §7).
        self.decoding = DecodingGuard(parse_peer)

    # -- what tests and metrics read --

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet ended."""
        return self._in_flight

    def connections(self, host: str) -> int:
        """Connections of ``host`` with calls in flight."""
        return self._peers.connections(host)

    def streams(self, caller: str, *, secured: bool = True) -> int:
        """Watch and KeepAlive streams held by a principal (or, open mode, a peer host)."""
        counter = (self._secured if secured else self._open).streams
        return counter.count(caller) if counter is not None else 0

    # -- the interceptor --

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        rule = _Rule(
            method=method,
            short=method.rpartition("/")[2],
            scope=method_scope(method),
            register=method == _REGISTER,
            stream=method in _STREAMS,
        )
        factory, behaviour = handler_parts(handler)
        behaviour, deserializer = self.decoding.wrap(handler, behaviour)
        return factory(
            self._guard(rule, behaviour),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guard(self, rule: _Rule, behaviour: Behaviour) -> Behaviour:
        """``behaviour`` wrapped in admission and release, of the same kind (coroutine or gen)."""
        admit, leave = self._admit, self._leave

        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                ticket = await admit(rule, context)
                responses = behaviour(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    leave(ticket)
                    await responses.aclose()

            return streaming

        if inspect.iscoroutinefunction(behaviour):

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                ticket = await admit(rule, context)
                try:
                    return await behaviour(request, context)
                finally:
                    leave(ticket)

            return call

        log.error("%s: a sync handler; AuthInterceptor serves async handlers only", rule.method)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rule.short}: not available")

        return refuse

    async def _admit(self, rule: _Rule, context: grpc.aio.ServicerContext) -> _Ticket:
        """Check the call against every limit and the policy; count what it holds.

        Raises:
            grpc.aio.AbortError: refused (the call has been answered); nothing stays counted.
        """
        if self._in_flight >= self._max_rpcs:
            await _deny(
                context,
                _EXHAUSTED,
                f"max_concurrent_rpcs: {self._max_rpcs} calls are in flight; retry later",
            )
        self._in_flight += 1
        ticket = _Ticket()
        try:
            peer = parse_peer(context.peer())
            if peer is not None:
                host, connection = peer
                if not self._peers.acquire(host, connection):
                    await _deny(
                        context,
                        _EXHAUSTED,
                        f"max_connections_per_peer: {host} has "
                        f"{self._peers.limit} connections with calls in flight",
                    )
                ticket.host, ticket.connection = host, connection
            policy = self._policy()
            principal: Principal | None = None
            if rule.scope == CLUSTER_SCOPE:
                if policy is not None or self._cluster_token is not None:
                    await self._check_cluster_token(
                        context, tuple(context.invocation_metadata() or ())
                    )
                return ticket  # another replica: no principal, no per-principal limits
            if policy is None:
                mode = self._open
                caller = peer[0] if peer is not None else "unix"
            else:
                mode = self._secured
                if rule.scope is None:
                    return ticket  # an open service: no identity, no per-principal limits
                # Read once: the forwarded identity and the caller's own both come from it.
                metadata = tuple(context.invocation_metadata() or ())
                forwarded = _forwarded(metadata)
                if forwarded is not None:
                    await self._check_cluster_token(context, metadata)
                    principal = policy.principal_named(forwarded[0])
                    if principal is None:
                        await _deny(
                            context,
                            _UNAUTHENTICATED,
                            f"forwarded principal {forwarded[0]!r} is not in the auth policy",
                        )
                    ticket.origin = _origin.set(forwarded[1])
                else:
                    principal = await _identify(policy, context, metadata)
                if not principal.allows(rule.scope):
                    await _deny(
                        context,
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"principal {principal.name!r} lacks scope {rule.scope!r} ({rule.short})",
                    )
                caller = principal.name
            if rule.register and mode.buckets is not None and not mode.buckets.take(caller):
                await _deny(
                    context,
                    _EXHAUSTED,
                    f"register_rate: {_who(principal, caller)} is over "
                    f"{mode.buckets.rate:g} Register calls a second "
                    f"(burst {mode.buckets.burst}); retry later",
                )
            if rule.stream and mode.streams is not None:
                if not mode.streams.acquire(caller):
                    await _deny(
                        context,
                        _EXHAUSTED,
                        f"max_streams_per_principal: {_who(principal, caller)} holds "
                        f"{mode.streams.limit} Watch and KeepAlive streams already",
                    )
                ticket.streams, ticket.key = mode.streams, caller
            if principal is not None:
                ticket.var = _principal.set(principal)
            return ticket
        except BaseException:
            self._leave(ticket)
            raise

    async def _check_cluster_token(
        self, context: grpc.aio.ServicerContext, metadata: Metadata
    ) -> None:
        """Refuse a call that does not carry this registry's cluster token.

        Raises:
            grpc.aio.AbortError: UNAUTHENTICATED.
        """
        expected = self._cluster_token
        if expected is None:
            await _deny(
                context, _UNAUTHENTICATED, "this replica has no cluster token: start it with one"
            )
        sent = [v for k, v in metadata if k == CLUSTER_TOKEN_KEY]
        given = str(sent[0]).encode() if len(sent) == 1 else b""
        if not hmac.compare_digest(given, expected):
            await _deny(context, _UNAUTHENTICATED, "the cluster token does not match")

    def _leave(self, ticket: _Ticket) -> None:
        """Give back what :meth:`_admit` counted for one call."""
        self._in_flight -= 1
        if ticket.host is not None:
            self._peers.release(ticket.host, ticket.connection)
        if ticket.streams is not None:
            ticket.streams.release(ticket.key)
        if ticket.var is not None:
            try:
                _principal.reset(ticket.var)
                if ticket.origin is not None:
                    _origin.reset(ticket.origin)
            except ValueError:
                # A stream finalised from another context (the loop's async-generator
                # hook): that context is not the call's, and the call's is gone.
                pass


def _who(principal: Principal | None, caller: str) -> str:
    return f"principal {caller!r}" if principal is not None else f"peer {caller}"


async def _deny(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Answer the call with ``code`` and ``message``.

    Raises:
        grpc.aio.AbortError: always (that is how grpc.aio ends a call from a handler).
    """
    await context.abort(code, message)
    raise AssertionError("unreachable: abort() raises")  # pragma: no cover


def _forwarded(metadata: Metadata) -> tuple[str, str] | None:
    """The principal name and original peer a forwarded call names; None if not forwarded."""
    name = peer = None
    for key, value in metadata:
        if key == FORWARDED_FOR_KEY:
            name = str(value)
        elif key == FORWARDED_PEER_KEY:
            peer = str(value)
    return None if name is None else (name, peer or "")


async def _identify(
    policy: AuthPolicy, context: grpc.aio.ServicerContext, metadata: Metadata
) -> Principal:
    """The principal of a call: its bearer token, else its verified client certificate.

    Raises:
        grpc.aio.AbortError: UNAUTHENTICATED, saying what to send.
    """
    authorization = [v for k, v in metadata if k == "authorization"]
    if authorization:
        if len(authorization) > 1:
            await _deny(
                context,
                _UNAUTHENTICATED,
                "authorization: send exactly one 'Bearer <token>' value",
            )
        scheme, _, token = str(authorization[0]).strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            await _deny(context, _UNAUTHENTICATED, "authorization: expected 'Bearer <token>'")
        principal = policy.identify_token(token)
        if principal is None:
            # A token that does not match never falls back to the certificate.
            await _deny(context, _UNAUTHENTICATED, "the bearer token is not in the auth policy")
        return principal
    identity = _certificate_identity(context.auth_context())
    if isinstance(identity, _Refusal):
        await _deny(context, _UNAUTHENTICATED, identity.reason)
    if identity is None:
        await _deny(context, _UNAUTHENTICATED, _NO_IDENTITY)
    principal = policy.identify_certificate(identity)
    if principal is None:
        await _deny(
            context,
            _UNAUTHENTICATED,
            f"client certificate {identity!r} is not in the auth policy",
        )
    return principal


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str


def _certificate_identity(auth: Mapping[str, list[bytes]]) -> str | _Refusal | None:
    """The identity of a verified client certificate in an auth context, if any.

    The keys are those grpc 1.85 fills from the peer's certificate: ``peer_uri``
    (URI SANs), ``peer_dns`` (DNS SANs, in certificate order), ``x509_common_name``.
    """
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    spiffe = [u for u in auth.get("peer_uri", ()) if u.startswith(b"spiffe://")]
    if len(spiffe) > 1:
        return _Refusal(
            f"client certificate: {len(spiffe)} spiffe:// URI SANs, expected one at most"
        )
    names = spiffe or auth.get("peer_dns") or auth.get("x509_common_name")
    if not names:
        return None
    try:
        return names[0].decode()
    except UnicodeDecodeError:
        return _Refusal("client certificate: its identity is not valid UTF-8")
