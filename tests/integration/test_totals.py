"""SPEC §7 Totals: ``max_plugins`` and ``max_bytes_per_plugin`` refuse before anything
is stored, resolved or dialled.

A registration over a total answers RESOURCE_EXHAUSTED naming the limit. Its
address (a host name pointing at a canary listener on loopback) is never resolved
(the resolver's lookups) nor dialled (the canary's connections): a registration
made afterwards with room is both, which bounds how long the refused one had to be.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from registry import RegistryClient
from registry.service import REGISTERED_OVERHEAD, registered_size
from registry.testing import FakePlugin, StaticResolver, eventually, running_registry
from registry.wire import pb


class Canary:
    """A TCP listener on loopback that counts the connections it gets."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"  # a name: vetting it means resolving it


@contextlib.asynccontextmanager
async def canary() -> AsyncIterator[Canary]:
    bird = Canary()
    server = await asyncio.start_server(bird._accept, "127.0.0.1", 0)
    bird.port = server.sockets[0].getsockname()[1]
    try:
        yield bird
    finally:
        server.close()
        await server.wait_closed()


def info(name: str, description: str = "") -> pb.PluginInfo:
    return pb.PluginInfo(
        name=name,
        version="1.0.0",
        type=pb.PLUGIN_TYPE_INGESTOR,
        sources=[name],
        description=description,
    )


async def refused(client: RegistryClient, request: pb.RegisterRequest) -> str:
    """Register; expect RESOURCE_EXHAUSTED and return its message."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.stub.Register(request)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
    return str(caught.value.details())


async def ids(client: RegistryClient) -> set[str]:
    return {p.plugin_id for p in await client.list_plugins()}


async def dialled_later(client: RegistryClient, refused_at: Canary) -> None:
    """The positive control: a registration with room is dialled; the refused one was not."""
    async with canary() as control:
        await client.register(info("control"), control.address)
        await eventually(lambda: control.connections, what="the control's first health check")
    assert refused_at.connections == 0


async def test_max_plugins_refuses_one_more_but_not_a_replacement(tmp_path):
    resolver = StaticResolver()
    async with (
        running_registry(tmp_path, max_plugins=5, resolver=resolver) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
        canary() as bird,
    ):
        for i in range(5):
            await client.register(info(f"p{i}"), plugin.address)

        async def all_healthy() -> bool:  # first checks done: no status change to come
            plugins = await client.list_plugins()
            return all(p.status == pb.PLUGIN_STATUS_HEALTHY for p in plugins)

        await eventually(all_healthy, what="the first health checks")
        held = await ids(client)
        revision = registry.state.view.revision

        message = await refused(client, pb.RegisterRequest(info=info("p5"), address=bird.address))
        assert message.startswith("max_plugins: "), message
        assert "5" in message
        assert await ids(client) == held  # nothing stored
        assert registry.state.view.revision == revision
        assert resolver.lookups == []  # nor vetted

        # A replacement takes its old place: accepted at the limit.
        again = await client.register(info("p0"), plugin.address)
        assert again.accepted
        assert len(await ids(client)) == 5
        assert again.plugin_id in await ids(client)

        # Room again: one more is accepted (and that one is resolved and dialled).
        await client.unregister(again.plugin_id)
        await dialled_later(client, bird)
        assert len(await ids(client)) == 5
        assert resolver.lookups  # the control was vetted; the refused one never was


async def test_max_bytes_per_plugin_refuses_a_big_registration(tmp_path):
    resolver = StaticResolver()
    async with (
        running_registry(tmp_path, max_bytes_per_plugin=2048, resolver=resolver) as registry,
        RegistryClient(registry.address) as client,
        canary() as bird,
    ):
        # 1,000 characters of three bytes each: within the field's limit of 1,024
        # characters, over the plugin's limit of 2,048 bytes.
        big = pb.RegisterRequest(info=info("big", "€" * 1000), address=bird.address)
        message = await refused(client, big)
        assert message.startswith("max_bytes_per_plugin: "), message
        assert "2048" in message
        assert await ids(client) == set()
        assert resolver.lookups == []
        await dialled_later(client, bird)


async def test_the_size_limit_is_exact_on_the_bound_and_the_bound_is_close(tmp_path):
    """A registration whose bound is the limit is accepted, one byte more is not; the
    bound is within REGISTERED_OVERHEAD bytes of the plugin's real encoding."""
    limit = 2048

    def request(description_length: int) -> pb.RegisterRequest:
        return pb.RegisterRequest(
            info=info("sized", "d" * description_length),
            address=plugin.address,
            labels={key: key[0] * 250 for key in ("zone", "rack", "room", "site")},
        )

    async with (
        running_registry(tmp_path, max_bytes_per_plugin=limit) as registry,
        FakePlugin(name="sized", sources=["sized"]) as plugin,
        RegistryClient(registry.address) as client,
    ):
        length = next(n for n in range(1025) if registered_size(request(n)) == limit)
        message = await refused(client, request(length + 1))
        assert message.startswith("max_bytes_per_plugin: ")
        accepted = await client.stub.Register(request(length))
        assert accepted.accepted

        async def checked() -> pb.RegisteredPlugin | None:
            stored = await client.get_plugin(accepted.plugin_id)
            return stored if stored.HasField("last_check_at") else None

        stored = await eventually(checked, what="the first health check")
        assert stored.last_error == ""
        real = stored.ByteSize()
        assert real <= limit
        assert limit - REGISTERED_OVERHEAD <= real
