"""Hub: static routes, routes from the registry, unknown sources."""

from __future__ import annotations

import asyncio

import pytest

from ingestor import (
    ExternalIngestor,
    Hub,
    IngestContext,
    PluginConnectionError,
    PluginError,
    RegistryResolver,
)
from registry.client import RegistryClient
from registry.server import RegistryServer
from registry.testing import FakePlugin
from registry.wire import event_pb, pb


def tagging(tag: str):
    def transform(request: pb.IngestRequest) -> pb.IngestResponse:
        return pb.IngestResponse(events=[event_pb.Event(id=tag, source=request.source)])

    return transform


async def test_static_routing() -> None:
    a = FakePlugin(name="a", sources=["a"], ingest=tagging("from-a"))
    b = FakePlugin(name="b", sources=["b"], ingest=tagging("from-b"))
    async with a, b:
        hub = Hub().ingestor(ExternalIngestor("a", a.address))
        hub = hub.ingestor(ExternalIngestor("b", b.address)).build()
        async with hub:
            assert hub.sources() == {"a", "b"}
            (event,) = await hub.ingest_async(IngestContext("b"), b"x")
            assert (event.id, event.source) == ("from-b", "b")
            (event,) = await hub.ingest_async(IngestContext("a"), b"x")
            assert event.id == "from-a"
            (event,) = await asyncio.to_thread(hub.ingest, IngestContext("a"), b"x")
            assert event.id == "from-a"
            with pytest.raises(PluginError, match="no ingestor for source 'c'") as info:
                await hub.ingest_async(IngestContext("c"), b"x")
            assert not isinstance(info.value, PluginConnectionError)
        with pytest.raises(PluginError, match="closed"):
            await hub.ingest_async(IngestContext("a"), b"x")


def test_building_rules() -> None:
    hub = Hub().ingestor(ExternalIngestor("a", "127.0.0.1:1"))
    with pytest.raises(ValueError, match="already has an ingestor"):
        hub.ingestor(ExternalIngestor("a", "127.0.0.1:2"))
    with pytest.raises(PluginError, match="not built"):
        hub.ingest(IngestContext("a"), b"x")
    hub.build()
    with pytest.raises(PluginError, match="built"):
        hub.ingestor(ExternalIngestor("b", "127.0.0.1:3"))
    hub.close()
    hub.close()


async def test_sync_ingest_inside_a_loop_is_refused() -> None:
    with Hub().build() as hub, pytest.raises(PluginError, match=r"await hub\.ingest_async"):
        hub.ingest(IngestContext("a"), b"x")


async def test_dynamic_routing(registry: RegistryServer, client: RegistryClient) -> None:
    static = FakePlugin(name="static", sources=["k8s"], ingest=tagging("static"))
    dynamic = FakePlugin(name="dyn", sources=["syslog"], ingest=tagging("dynamic"))
    async with static, dynamic, RegistryResolver(registry.address) as resolver:
        await client.register(dynamic.info(), dynamic.address)
        await resolver.wait_for_async(lambda v: bool(v.endpoints("syslog")), 10)
        hub = Hub(resolver).ingestor(ExternalIngestor("k8s", static.address)).build()
        async with hub:
            assert hub.sources() == {"k8s", "syslog"}
            (event,) = await hub.ingest_async(IngestContext("syslog"), b"x")
            assert event.id == "dynamic"
            (event,) = await hub.ingest_async(IngestContext("k8s"), b"x")
            assert event.id == "static"
            assert await hub.route_async("syslog") is await hub.route_async("syslog")
            with pytest.raises(PluginError, match="no registered plugin declares it") as info:
                await hub.ingest_async(IngestContext("nope"), b"x")
            assert not isinstance(info.value, PluginConnectionError)
            (event,) = await asyncio.to_thread(hub.ingest, IngestContext("syslog"), b"x")
            assert event.id == "dynamic"


async def test_dynamic_routing_of_a_declared_source_with_no_healthy_plugin(
    registry: RegistryServer, client: RegistryClient, free_port
) -> None:
    info = pb.PluginInfo(name="gone", version="1", type=pb.PLUGIN_TYPE_INGESTOR, sources=["gone"])
    async with RegistryResolver(registry.address) as resolver:
        await client.register(info, f"127.0.0.1:{free_port()}")
        await resolver.wait_for_async(lambda v: v.declares("gone"), 10)
        async with Hub(resolver).build() as hub:
            with pytest.raises(PluginConnectionError, match="none HEALTHY"):
                await hub.ingest_async(IngestContext("gone"), b"x")
