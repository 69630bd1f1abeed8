"""An async client of the PluginRegistry service, for operators, plugins and the gateway.

    async with RegistryClient("127.0.0.1:50051") as client:
        for plugin in await client.list_plugins(source="k8s"):
            print(plugin.plugin_id, plugin.address)

    async with RegistryClient("https://registry.internal:50051", token=token) as client:
        ...

    async with RegistryClient("10.0.0.1:50051,10.0.0.2:50051", tls=files) as client:
        ...  # the replicas of one registry (SPEC §8): calls fail over between them

Addresses: ``host:port``, ``[v6]:port`` and ``http://host:port`` are plaintext unless
``tls`` is given; ``https://host:port`` is TLS (the system roots unless ``tls.ca``);
``unix:/path`` is a local socket. Several addresses (a comma-separated string, or a
sequence) are replicas of one registry. A bearer ``token`` goes with every call, also
those made through :attr:`RegistryClient.stub`, and is never sent in clear off the host.

Status codes come back as the :mod:`registry.errors` tree. Thread rules: a client
belongs to the event loop it was first used on.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import random
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf.empty_pb2 import Empty

from registry.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RegistryError,
    RegistryUnavailable,
    ResourceExhausted,
    Unauthenticated,
)
from registry.trust.tls import TlsFiles, channel_credentials
from registry.wire import pb, pb_grpc

if TYPE_CHECKING:
    from registry.keeper import KeepAliveStream

DEFAULT_REGISTRY = "127.0.0.1:50051"
AUTHORIZATION = "authorization"

# Calls that may be sent again to another replica when one attempt timed out: they
# change nothing (Heartbeat only renews a lease, which a second renewal does again).
RETRYABLE_ON_TIMEOUT = frozenset({"ListPlugins", "GetPlugin", "Resolve", "GetStatus", "Heartbeat"})
# Fail-over pauses between attempts: jittered, from FAILOVER_BACKOFF to FAILOVER_BACKOFF_MAX.
FAILOVER_BACKOFF = 0.05
FAILOVER_BACKOFF_MAX = 1.0
# A read attempt gets its share of the time left, but never less than this.
MIN_ATTEMPT = 0.1
# A channel to a replica that went away redials within this (gRPC's default: up to 120 s).
_RECONNECT_OPTIONS = (("grpc.max_reconnect_backoff_ms", 1000),)


def parse_addresses(address: str | Sequence[str]) -> tuple[str, ...]:
    """The registry addresses in ``address``: a comma-separated string or a sequence.

    Blanks are stripped and repeats dropped, the order kept. Items of a sequence are
    taken whole (a gRPC target that itself holds commas can go that way).

    Raises:
        RegistryError: no address at all.
    """
    items = address.split(",") if isinstance(address, str) else list(address)
    addresses = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not addresses:
        raise RegistryError("registry address: none given; give host:port (or several, a,b,c)")
    return addresses


def dial_target(address: str) -> tuple[str, bool]:
    """A registered address as a gRPC target, and whether it wants TLS.

    ``http://h:p`` → ``h:p``; ``https://h:p`` → ``h:p`` with TLS; others unchanged.
    """
    if address.startswith("https://"):
        return address.removeprefix("https://"), True
    return address.removeprefix("http://"), False


def open_channel(address: str, options: Iterable[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
    """A channel to a registered address (no connection is made yet)."""
    target, tls = dial_target(address)
    if tls:
        return grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(), options=list(options)
        )
    return grpc.aio.insecure_channel(target, options=list(options))


def error_from_rpc(exc: grpc.aio.AioRpcError) -> RegistryError:
    """The registry error for a failed call; the caller chains it."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, reason = details.partition(": ")
        return InvalidArgument(field, reason) if reason else InvalidArgument("request", details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return AlreadyExists(details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        limit, _, reason = details.partition(": ")
        return ResourceExhausted(limit, reason) if reason else ResourceExhausted("limit", details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return RegistryUnavailable(f"registry unavailable ({code.name}): {details}")
    return RegistryError(f"{code.name}: {details}")


def is_loopback_target(target: str) -> bool:
    """Whether a gRPC target stays on this host: 127.0.0.0/8, ::1, localhost or unix:.

    Anything this cannot read (a host name, a resolver scheme such as ``dns:``, a
    bracketless IPv6 address with a port) counts as off the host.
    """
    if target.startswith("unix:"):
        return True
    host = _host_of(target)
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _host_of(target: str) -> str:
    if target.startswith("["):
        host, closed, rest = target[1:].partition("]")
        return host if closed and (not rest or rest.startswith(":")) else ""
    with_port = target.rpartition(":")
    if not with_port[1]:
        return target
    try:
        ipaddress.IPv6Address(target)  # a bare ::1: the whole target is the host
    except ValueError:
        return "" if ":" in with_port[0] else with_port[0]
    return target


def _check_token(token: str) -> None:
    # What may follow "Bearer " in a header; anything else is a mistake (a stray newline
    # from a file, a pasted space) that gRPC would only reject at the first call.
    if not token:
        raise RegistryError("token: empty; give the token, or none for an open registry")
    if not all("!" <= char <= "~" for char in token):
        raise RegistryError("token: only printable ASCII without spaces can be a bearer token")


class _Bearer:
    """Adds ``authorization: Bearer <token>`` to a call's metadata. Never shows the token."""

    __slots__ = ("_value",)

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(
            *((key, value) for key, value in details.metadata or () if key != AUTHORIZATION),
            (AUTHORIZATION, self._value),
        )
        return details._replace(metadata=metadata)

    def __repr__(self) -> str:
        return "_Bearer(<redacted>)"


# One interceptor per call kind: grpc.aio files each interceptor under one kind only.
class _BearerUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, bearer: _Bearer) -> None:
        self._bearer = bearer

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._bearer.details(details), request)


class _BearerUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, bearer: _Bearer) -> None:
        self._bearer = bearer

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._bearer.details(details), request)


class _BearerStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, bearer: _Bearer) -> None:
        self._bearer = bearer

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._bearer.details(details), request_iterator)


class _BearerStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, bearer: _Bearer) -> None:
        self._bearer = bearer

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._bearer.details(details), request_iterator)


def _bearer_interceptors(token: str) -> list[Any]:
    bearer = _Bearer(token)
    return [
        _BearerUnaryUnary(bearer),
        _BearerUnaryStream(bearer),
        _BearerStreamUnary(bearer),
        _BearerStreamStream(bearer),
    ]


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class _Replica:
    """One address of the registry: its dial target and, once used, its channel and stub."""

    __slots__ = ("address", "channel", "credentials", "stub", "target")

    def __init__(
        self, address: str, target: str, credentials: grpc.ChannelCredentials | None
    ) -> None:
        self.address = address
        self.target = target
        self.credentials = credentials
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.PluginRegistryStub | None = None


class RegistryClient:
    """A connection to one registry, through one or several of its replicas.

    ``address``: ``host:port`` (see the module docstring for the forms), or several
    replicas of one registry as ``"a:1,b:2"`` or a sequence. ``token``: a bearer token
    sent as ``authorization`` metadata on every call (also through :attr:`stub`).
    ``tls``: the CA bundle to verify the registry with and, for mTLS, this client's
    certificate and key; given, every channel is TLS whatever the address form. Files
    are read here, once; construction never connects. Refuses use after :meth:`close`.

    With one address a call is one attempt with ``timeout`` seconds, and fails at once.
    With several, each call fails over until its ``timeout`` is spent: an attempt that
    ends ``UNAVAILABLE`` (connection refused or reset, or a replica that knows no leader
    yet) is made again on the next address, round robin, after a short jittered pause
    (50 ms growing to 1 s). Reads (ListPlugins, GetPlugin, Resolve, GetStatus) and
    Heartbeat give each attempt a share of the time left (divided by the replicas this
    call has not tried yet, at least 0.1 s) and move on from one that timed out (a hung
    replica), so the first replica tried of two must answer within half of ``timeout``.
    Register, Unregister and Release give each attempt all the time left and are never
    sent again after a timeout: the write may have happened, so the call fails with
    RegistryUnavailable and the caller decides. An ``UNAVAILABLE`` write is sent again:
    a refused connection or a replica without a leader committed nothing, and a
    connection lost mid-call at worst repeats a write that is safe to repeat (Register
    on the same name and address replaces the instance; the other two are idempotent).
    Every call starts at the address that last answered; a failed attempt moves that
    start on, so a caller's own retry goes to the next replica.

    Raises (constructor):
        RegistryError: no address, a token over a plaintext channel to anything but
            loopback or a unix socket (names the address), a malformed token, or
            unusable TLS files (names the file).
    """

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_REGISTRY,
        *,
        timeout: float = 5.0,
        channel_options: Iterable[tuple[str, int | str]] = (),
        token: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        addresses = parse_addresses(address)
        targets = [(one, *dial_target(one)) for one in addresses]
        if token is not None:
            _check_token(token)
            for one, target, https in targets:
                if not (https or tls is not None) and not is_loopback_target(target):
                    raise RegistryError(
                        f"refusing to send a token in clear to {one}: "
                        "use https:// or TLS (--tls-ca, or tls= in code)"
                    )
        try:
            credentials = (
                channel_credentials(tls)
                if tls is not None or any(https for _, _, https in targets)
                else None
            )
        except ValueError as exc:
            raise RegistryError(str(exc)) from exc
        self.addresses: tuple[str, ...] = addresses
        self.address = ",".join(addresses)
        self.timeout = timeout
        self._replicas = tuple(
            _Replica(one, target, credentials if https or tls is not None else None)
            for one, target, https in targets
        )
        self._current = 0
        self._interceptors = _bearer_interceptors(token) if token is not None else []
        options = list(channel_options)
        if len(addresses) > 1:
            given = {name for name, _ in options}
            options += [option for option in _RECONNECT_OPTIONS if option[0] not in given]
        self._options = options
        self._state = _State.UNOPENED

    @property
    def secure(self) -> bool:
        """Whether the channels are TLS (every one of them, with several addresses)."""
        return all(replica.credentials is not None for replica in self._replicas)

    @property
    def current_address(self) -> str:
        """The address the next call tries first: the one that last answered."""
        return self._replicas[self._current].address

    # The current replica's target and channel, where a one-address client kept its own.
    @property
    def _target(self) -> str:
        return self._replicas[self._current].target

    @property
    def _channel(self) -> grpc.aio.Channel | None:
        return self._replicas[self._current].channel

    @property
    def stub(self) -> pb_grpc.PluginRegistryStub:
        """The generated stub of :attr:`current_address` (it adds the token; no fail-over)."""
        return self._stub(self._replicas[self._current])

    def _stub(self, replica: _Replica) -> pb_grpc.PluginRegistryStub:
        if self._state is _State.CLOSED:
            raise RegistryError("the registry client is closed")
        if replica.stub is None:
            replica.channel = self._open(replica)
            replica.stub = pb_grpc.PluginRegistryStub(replica.channel)
            self._state = _State.OPEN
        return replica.stub

    def _open(self, replica: _Replica) -> grpc.aio.Channel:
        interceptors = self._interceptors or None
        if replica.credentials is not None:
            return grpc.aio.secure_channel(
                replica.target,
                replica.credentials,
                options=self._options,
                interceptors=interceptors,
            )
        return grpc.aio.insecure_channel(
            replica.target, options=self._options, interceptors=interceptors
        )

    def __repr__(self) -> str:
        token = "<redacted>" if self._interceptors else None
        return (
            f"RegistryClient({self.address!r}, secure={self.secure}, token={token}, "
            f"state={self._state.value})"
        )

    async def close(self) -> None:
        """Close every channel. Idempotent."""
        self._state = _State.CLOSED
        for replica in self._replicas:
            channel, replica.channel, replica.stub = replica.channel, None, None
            if channel is not None:
                await channel.close()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def register(
        self,
        info: pb.PluginInfo,
        address: str,
        *,
        lease_ttl_seconds: int = 0,
        labels: Mapping[str, str] | None = None,
        no_lease: bool = False,
    ) -> pb.RegisterResponse:
        """Register a plugin instance.

        ``lease_ttl_seconds=0`` takes the server's default; ``no_lease=True`` registers
        on a plugin's behalf (an operator): no heartbeats, health checks alone.

        Raises:
            RegistryUnavailable: no replica answered, or one timed out (the instance
                may then be registered: see the class docstring).
        """
        request = pb.RegisterRequest(
            info=info,
            address=address,
            lease_ttl_seconds=lease_ttl_seconds,
            labels=labels,
            no_lease=no_lease,
        )
        response: pb.RegisterResponse = await self._call("Register", request)
        return response

    async def heartbeat(self, plugin_id: str) -> bool:
        """Renew a lease; False means the registry no longer knows the id: register again."""
        response: pb.HeartbeatResponse = await self._call(
            "Heartbeat", pb.HeartbeatRequest(plugin_id=plugin_id)
        )
        return response.acknowledged

    async def unregister(self, plugin_id: str) -> None:
        """Remove a plugin; succeeds for ids already gone."""
        await self._call("Unregister", pb.UnregisterRequest(plugin_id=plugin_id))

    async def drain(
        self, *, plugin_id: str = "", name: str = "", undrain: bool = False
    ) -> pb.DrainResponse:
        """Take one instance (``plugin_id``) or every instance of ``name`` out of routing
        (DRAINING), or put it back with ``undrain=True``. Idempotent.

        The response holds the instances as they are now and the revision of the
        change (the current one when nothing changed).

        Raises:
            InvalidArgument: neither or both of ``plugin_id`` and ``name`` (checked
                here), or one the registry refuses.
            NotFound: no such instance, or no instance of the name.
            PermissionDenied: the instances belong to another principal.
        """
        if bool(plugin_id) == bool(name):
            raise InvalidArgument("target", "give exactly one of plugin_id or name")
        request = (
            pb.DrainRequest(plugin_id=plugin_id, undrain=undrain)
            if plugin_id
            else pb.DrainRequest(name=name, undrain=undrain)
        )
        response: pb.DrainResponse = await self._call("Drain", request)
        return response

    async def get_plugin(self, plugin_id: str) -> pb.RegisteredPlugin:
        """One plugin. Raises NotFound for an unknown id."""
        plugin: pb.RegisteredPlugin = await self._call(
            "GetPlugin", pb.GetPluginRequest(plugin_id=plugin_id)
        )
        return plugin

    async def list_plugins(
        self,
        *,
        type: int = 0,
        source: str = "",
        statuses: Iterable[int] = (),
        name: str = "",
        page_size: int = 0,
        label_selector: str = "",
    ) -> list[pb.RegisteredPlugin]:
        """Every matching plugin, following pages to the end.

        ``label_selector``: e.g. ``"zone=a,!canary"`` (SPEC §1.3); bad syntax raises
        InvalidArgument naming ``label_selector``.
        """
        request = pb.ListPluginsRequest(
            type=cast(pb.PluginType, type),
            source=source,
            statuses=[cast(pb.PluginStatus, s) for s in statuses],
            name=name,
            page_size=page_size,
            label_selector=label_selector,
        )
        plugins: list[pb.RegisteredPlugin] = []
        while True:
            response: pb.ListPluginsResponse = await self._call("ListPlugins", request)
            plugins.extend(response.plugins)
            if not response.next_page_token:
                return plugins
            request.page_token = response.next_page_token

    async def resolve(
        self, *, source: str = "", emitter_name: str = "", label_selector: str = ""
    ) -> pb.ResolveResponse:
        """The routable endpoints of a source or an emitter name.

        ``label_selector`` keeps those whose labels match (all, when empty).
        """
        request = (
            pb.ResolveRequest(emitter_name=emitter_name, label_selector=label_selector)
            if emitter_name
            else pb.ResolveRequest(source=source, label_selector=label_selector)
        )
        response: pb.ResolveResponse = await self._call("Resolve", request)
        return response

    async def release(self, name: str) -> pb.ReleaseResponse:
        """Free a plugin name and the sources it claimed from their owner (admin only).

        ``released`` is False when nobody owned the name.
        """
        response: pb.ReleaseResponse = await self._call("Release", pb.ReleaseRequest(name=name))
        return response

    async def get_status(self) -> pb.RegistryStatus:
        """The registry's replicas as the one that answers sees them (SPEC §8).

        A single SQLite registry answers one replica, the leader, backend ``sqlite``.
        """
        status: pb.RegistryStatus = await self._call("GetStatus", Empty())
        return status

    async def watch(
        self, *, since_revision: int = 0, sources: Iterable[str] = (), label_selector: str = ""
    ) -> AsyncIterator[pb.WatchResponse]:
        """Changes as they happen: a snapshot (unless resuming), then one message a change.

        ``sources`` and ``label_selector`` narrow the stream; a plugin that stops
        matching comes as removed.

        The stream is opened on :attr:`current_address` and does not fail over by
        itself; when it ends ``UNAVAILABLE`` the current address moves on, so the next
        ``watch()`` (from the last revision seen: every replica has the same history)
        tries the next replica.

        Raises:
            RegistryError: the stream broke; resume with the last revision seen.
        """
        index = self._current
        call = self.stub.Watch(
            pb.WatchRequest(
                since_revision=since_revision,
                sources=list(sources),
                label_selector=label_selector,
            )
        )
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            if len(self._replicas) == 1:
                raise error_from_rpc(exc) from exc
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._move_on(index)
            raise self._error_at(index, exc) from exc
        finally:
            call.cancel()

    def keep_alive(self, *, timeout: float | None = None) -> KeepAliveStream:
        """A KeepAlive stream (SPEC §1.3): renew many leases over one stream.

        Opened on :attr:`current_address` at its first renewal and again after it
        breaks; each renewal waits ``timeout`` seconds at most (default: the client's).
        See :mod:`registry.keeper`.
        """
        from registry.keeper import KeepAliveStream  # it builds on this module

        return KeepAliveStream(self, timeout=timeout)

    def skip(self, address: str) -> None:
        """A stream to ``address`` broke (UNAVAILABLE): start the next call past it."""
        for index, replica in enumerate(self._replicas):
            if replica.address == address:
                self._move_on(index)
                return

    async def _call(self, name: str, request: Any) -> Any:
        if len(self._replicas) == 1:
            method = getattr(self.stub, name)
            try:
                return await method(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc) from exc
        return await self._fail_over(name, request)

    async def _fail_over(self, name: str, request: Any) -> Any:
        """One call over the replicas, until one answers or ``timeout`` is spent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        read = name in RETRYABLE_ON_TIMEOUT
        pauses = _pauses()
        tried: list[str] = []
        while True:
            index = self._current
            replica = self._replicas[index]
            left = deadline - loop.time()
            if read:  # the time left, shared by the replicas this call has not tried yet
                untried = len(self._replicas) - len(set(tried)) or len(self._replicas)
                left = min(left, max(left / untried, MIN_ATTEMPT))
            try:
                return await getattr(self._stub(replica), name)(request, timeout=left)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise error_from_rpc(exc) from exc  # an answer: this replica stays current
                self._move_on(index)
                tried.append(replica.address)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and not read:
                    raise RegistryUnavailable(
                        f"registry unavailable: {replica.address} did not answer {name} "
                        f"within {self.timeout:g}s; not sent again, it may have happened"
                    ) from exc
                pause = next(pauses)
                if deadline - loop.time() <= pause:
                    raise RegistryUnavailable(
                        f"registry unavailable: no replica answered within {self.timeout:g}s "
                        f"(tried {', '.join(dict.fromkeys(tried))}); last, {replica.address}: "
                        f"{code.name}: {exc.details() or ''}"
                    ) from exc
                await asyncio.sleep(pause)

    def _move_on(self, index: int) -> None:
        # Only from the address that failed: a concurrent call may have moved on already.
        if self._current == index:
            self._current = (index + 1) % len(self._replicas)

    def _error_at(self, index: int, exc: grpc.aio.AioRpcError) -> RegistryError:
        error = error_from_rpc(exc)
        if isinstance(error, RegistryUnavailable):
            return RegistryUnavailable(f"{error} (at {self._replicas[index].address})")
        return error


def _pauses() -> Iterator[float]:
    pause = FAILOVER_BACKOFF
    while True:
        yield random.uniform(pause / 2, pause)
        pause = min(FAILOVER_BACKOFF_MAX, pause * 2)
