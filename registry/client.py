"""An async client of the PluginRegistry service, for operators, plugins and the gateway.

    async with RegistryClient("127.0.0.1:50051") as client:
        for plugin in await client.list_plugins(source="k8s"):
            print(plugin.plugin_id, plugin.address)

Status codes come back as the :mod:`registry.errors` tree. Thread rules: a client
belongs to the event loop it was first used on.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, cast

import grpc

from registry.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    RegistryError,
    RegistryUnavailable,
)
from registry.wire import pb, pb_grpc

DEFAULT_REGISTRY = "127.0.0.1:50051"


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
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return RegistryUnavailable(f"registry unavailable ({code.name}): {details}")
    return RegistryError(f"{code.name}: {details}")


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class RegistryClient:
    """A connection to one registry. Refuses use after :meth:`close`."""

    def __init__(
        self,
        address: str = DEFAULT_REGISTRY,
        *,
        timeout: float = 5.0,
        channel_options: Iterable[tuple[str, int | str]] = (),
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._options = list(channel_options)
        self._state = _State.UNOPENED
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.PluginRegistryStub | None = None

    @property
    def stub(self) -> pb_grpc.PluginRegistryStub:
        """The generated stub, for calls this client does not wrap."""
        if self._state is _State.CLOSED:
            raise RegistryError("the registry client is closed")
        if self._stub is None:
            self._channel = open_channel(self.address, self._options)
            self._stub = pb_grpc.PluginRegistryStub(self._channel)
            self._state = _State.OPEN
        return self._stub

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
