"""An async client of the PluginRegistry service, for operators, plugins and the gateway.

    async with RegistryClient("127.0.0.1:50051") as client:
        for plugin in await client.list_plugins(source="k8s"):
            print(plugin.plugin_id, plugin.address)

    async with RegistryClient("https://registry.internal:50051", token=token) as client:
        ...

Addresses: ``host:port``, ``[v6]:port`` and ``http://host:port`` are plaintext unless
``tls`` is given; ``https://host:port`` is TLS (the system roots unless ``tls.ca``);
``unix:/path`` is a local socket. A bearer ``token`` goes with every call, also those
made through :attr:`RegistryClient.stub`, and is never sent in clear off the host.

Status codes come back as the :mod:`registry.errors` tree. Thread rules: a client
belongs to the event loop it was first used on.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, cast

import grpc

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

DEFAULT_REGISTRY = "127.0.0.1:50051"
AUTHORIZATION = "authorization"


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


class RegistryClient:
    """A connection to one registry. Refuses use after :meth:`close`.

    ``token``: a bearer token sent as ``authorization`` metadata on every call (also
    through :attr:`stub`). ``tls``: the CA bundle to verify the registry with and, for
    mTLS, this client's certificate and key; given, the channel is TLS whatever the
    address form. Files are read here, once; construction never connects.

    Raises (constructor):
        RegistryError: a token over a plaintext channel to anything but loopback or a
            unix socket, a malformed token, or unusable TLS files (names the file).
    """

    def __init__(
        self,
        address: str = DEFAULT_REGISTRY,
        *,
        timeout: float = 5.0,
        channel_options: Iterable[tuple[str, int | str]] = (),
        token: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        target, https = dial_target(address)
        secure = https or tls is not None
        if token is not None:
            _check_token(token)
            if not secure and not is_loopback_target(target):
                raise RegistryError(
                    f"refusing to send a token in clear to {address}: "
                    "use https:// or TLS (--tls-ca, or tls= in code)"
                )
        try:
            credentials = channel_credentials(tls) if secure else None
        except ValueError as exc:
            raise RegistryError(str(exc)) from exc
        self.address = address
        self.timeout = timeout
        self._target = target
        self._credentials = credentials
        self._interceptors = _bearer_interceptors(token) if token is not None else []
        self._options = list(channel_options)
        self._state = _State.UNOPENED
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.PluginRegistryStub | None = None

    @property
    def secure(self) -> bool:
        """Whether the channel is TLS."""
        return self._credentials is not None

    @property
    def stub(self) -> pb_grpc.PluginRegistryStub:
        """The generated stub, for calls this client does not wrap (they carry the token)."""
        if self._state is _State.CLOSED:
            raise RegistryError("the registry client is closed")
        if self._stub is None:
            self._channel = self._open()
            self._stub = pb_grpc.PluginRegistryStub(self._channel)
            self._state = _State.OPEN
        return self._stub

    def _open(self) -> grpc.aio.Channel:
        interceptors = self._interceptors or None
        if self._credentials is not None:
            return grpc.aio.secure_channel(
                self._target, self._credentials, options=self._options, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(
            self._target, options=self._options, interceptors=interceptors
        )

    def __repr__(self) -> str:
        token = "<redacted>" if self._interceptors else None
        return (
            f"RegistryClient({self.address!r}, secure={self.secure}, token={token}, "
            f"state={self._state.value})"
        )

    async def close(self) -> None:
        """Close the channel. Idempotent."""
        self._state = _State.CLOSED
        channel, self._channel, self._stub = self._channel, None, None
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
        """
        request = pb.RegisterRequest(
            info=info,
            address=address,
            lease_ttl_seconds=lease_ttl_seconds,
            labels=labels,
            no_lease=no_lease,
        )
        response: pb.RegisterResponse = await self._call(self.stub.Register, request)
        return response

    async def heartbeat(self, plugin_id: str) -> bool:
        """Renew a lease; False means the registry no longer knows the id: register again."""
        response: pb.HeartbeatResponse = await self._call(
            self.stub.Heartbeat, pb.HeartbeatRequest(plugin_id=plugin_id)
        )
        return response.acknowledged

    async def unregister(self, plugin_id: str) -> None:
        """Remove a plugin; succeeds for ids already gone."""
        await self._call(self.stub.Unregister, pb.UnregisterRequest(plugin_id=plugin_id))

    async def get_plugin(self, plugin_id: str) -> pb.RegisteredPlugin:
        """One plugin. Raises NotFound for an unknown id."""
        plugin: pb.RegisteredPlugin = await self._call(
            self.stub.GetPlugin, pb.GetPluginRequest(plugin_id=plugin_id)
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
    ) -> list[pb.RegisteredPlugin]:
        """Every matching plugin, following pages to the end."""
        request = pb.ListPluginsRequest(
            type=cast(pb.PluginType, type),
            source=source,
            statuses=[cast(pb.PluginStatus, s) for s in statuses],
            name=name,
            page_size=page_size,
        )
        plugins: list[pb.RegisteredPlugin] = []
        while True:
            response: pb.ListPluginsResponse = await self._call(self.stub.ListPlugins, request)
            plugins.extend(response.plugins)
            if not response.next_page_token:
                return plugins
            request.page_token = response.next_page_token

    async def resolve(self, *, source: str = "", emitter_name: str = "") -> pb.ResolveResponse:
        """The routable endpoints of a source or an emitter name."""
        request = (
            pb.ResolveRequest(emitter_name=emitter_name)
            if emitter_name
            else pb.ResolveRequest(source=source)
        )
        response: pb.ResolveResponse = await self._call(self.stub.Resolve, request)
        return response

    async def release(self, name: str) -> pb.ReleaseResponse:
        """Free a plugin name and the sources it claimed from their owner (admin only).

        ``released`` is False when nobody owned the name.
        """
        response: pb.ReleaseResponse = await self._call(
            self.stub.Release, pb.ReleaseRequest(name=name)
        )
        return response

    async def watch(
        self, *, since_revision: int = 0, sources: Iterable[str] = ()
    ) -> AsyncIterator[pb.WatchResponse]:
        """Changes as they happen: a snapshot (unless resuming), then one message a change.

        Raises:
            RegistryError: the stream broke; resume with the last revision seen.
        """
        call = self.stub.Watch(
            pb.WatchRequest(since_revision=since_revision, sources=list(sources))
        )
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
