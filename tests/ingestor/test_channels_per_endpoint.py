"""``channels_per_endpoint``: several HTTP/2 connections to one plugin instance.

Proved at the plugin, a real gRPC server that records each call's peer (the client's
address and ephemeral port: one per TCP connection), and in the kernel's own table of
TCP connections (/proc/net/tcp) for the closing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from ingestor import ExternalIngestor, Hub, IngestContext, RegistryResolver
from ingestor.connection import ConnectionPool
from registry.client import RegistryClient
from registry.server import RegistryServer
from registry.testing import eventually
from registry.wire import event_pb, pb, pb_grpc

CTX = IngestContext("k8s")
INFO = pb.PluginInfo(name="k8s-plugin", version="1", type=pb.PLUGIN_TYPE_INGESTOR, sources=["k8s"])


class PeerPlugin(pb_grpc.IngestorPluginServicer):
    """An ingestor plugin that counts the calls on each TCP connection (by peer)."""

    def __init__(self) -> None:
        self.peers: Counter[str] = Counter()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> PeerPlugin:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_IngestorPluginServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(None)

    async def Ingest(
        self, request: pb.IngestRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestResponse:
        self.peers[context.peer()] += 1
        return pb.IngestResponse(events=[event_pb.Event(id="1", payload=request.data)])

    async def Health(
        self, request: Empty, context: grpc.aio.ServicerContext
    ) -> pb.PluginHealthResponse:
        return pb.PluginHealthResponse(healthy=True)


def established_to(port: int) -> int:
    """Established TCP connections whose remote end is local ``port`` (Linux /proc)."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rpartition(":")[2], 16) == port:
                count += 1
    return count


needs_proc = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="counts TCP connections in Linux /proc/net/tcp"
)


@pytest.fixture
async def peer_plugin() -> PeerPlugin:
    async with PeerPlugin() as plugin:
        yield plugin  # type: ignore[misc]


@needs_proc
async def test_async_calls_take_n_connections_in_turn_and_close_closes_them(
    peer_plugin: PeerPlugin,
) -> None:
    ingestor = ExternalIngestor("k8s", peer_plugin.address, channels_per_endpoint=4)
    for _ in range(40):
        assert len(await ingestor.ingest_async(CTX, b"a")) == 1
    assert len(peer_plugin.peers) == 4  # four TCP connections: four client ports
    assert sorted(peer_plugin.peers.values()) == [10, 10, 10, 10]
    assert ingestor.channels() == 4
    assert established_to(peer_plugin.port) == 4

    await ingestor.aclose()
    assert ingestor.channels() == 0
    await eventually(lambda: established_to(peer_plugin.port) == 0, what="connections closed")


@needs_proc
async def test_sync_calls_take_n_connections_in_turn_and_close_closes_them(
    peer_plugin: PeerPlugin,
) -> None:
    ingestor = ExternalIngestor("k8s", peer_plugin.address, channels_per_endpoint=3)

    def calls() -> int:
        for _ in range(30):
            assert len(ingestor.ingest(CTX, b"a")) == 1
        return ingestor.channels()

    assert await asyncio.to_thread(calls) == 3
    assert len(peer_plugin.peers) == 3
    assert sorted(peer_plugin.peers.values()) == [10, 10, 10]
    assert established_to(peer_plugin.port) == 3

    await asyncio.to_thread(ingestor.close)
    assert await asyncio.to_thread(ingestor.channels) == 0
    await eventually(lambda: established_to(peer_plugin.port) == 0, what="connections closed")


async def test_default_is_one_connection(peer_plugin: PeerPlugin) -> None:
    async with ExternalIngestor("k8s", peer_plugin.address) as ingestor:
        assert ingestor.channels_per_endpoint == 1
        await asyncio.gather(*(ingestor.ingest_async(CTX, b"a") for _ in range(20)))
        await asyncio.to_thread(lambda: [ingestor.ingest(CTX, b"a") for _ in range(5)])
        assert ingestor.channels() == 1
    assert sum(peer_plugin.peers.values()) == 25
    assert len(peer_plugin.peers) == 2  # one async connection, one sync one


async def test_calls_in_flight_spread_over_the_connections(peer_plugin: PeerPlugin) -> None:
    async with ExternalIngestor("k8s", peer_plugin.address, channels_per_endpoint=4) as ingestor:
        await asyncio.gather(*(ingestor.ingest_async(CTX, b"a") for _ in range(64)))
        assert ingestor.channels() == 4
    assert sum(peer_plugin.peers.values()) == 64
    assert len(peer_plugin.peers) == 4


async def test_a_dropped_channel_empties_only_its_slot(peer_plugin: PeerPlugin) -> None:
    async with ExternalIngestor("k8s", peer_plugin.address, channels_per_endpoint=2) as ingestor:
        for _ in range(2):
            await ingestor.ingest_async(CTX, b"a")
        pool: ConnectionPool = ingestor._pool()
        first, second = pool.connections(peer_plugin.address)
        pool.drop(first, None)
        assert pool.connections(peer_plugin.address) == [second]
        assert ingestor.channels() == 1
        for _ in range(2):  # the empty slot is made anew when its turn comes
            await ingestor.ingest_async(CTX, b"a")
        assert ingestor.channels() == 2
        assert second in pool.connections(peer_plugin.address)
    assert len(peer_plugin.peers) == 3


async def test_hub_gives_its_resolved_ingestors_the_setting(
    registry: RegistryServer, client: RegistryClient, peer_plugin: PeerPlugin
) -> None:
    await client.register(INFO, peer_plugin.address)
    async with RegistryResolver(registry.address) as resolver:
        await resolver.wait_for_async(lambda v: bool(v.endpoints("k8s")), 10)
        hub = Hub(resolver, channels_per_endpoint=2).build()
        for _ in range(4):
            await hub.ingest_async(CTX, b"a")
        ingestor = await hub.route_async("k8s")
        assert ingestor.channels_per_endpoint == 2
        assert ingestor.channels() == 2
        await hub.aclose()
    assert len(peer_plugin.peers) == 2


@pytest.mark.parametrize("value", [0, -1, 65, 1000, True, 2.0, "2", None])
def test_bad_values_are_refused_naming_the_setting(value: object) -> None:
    with pytest.raises(ValueError, match="channels_per_endpoint"):
        ExternalIngestor("k8s", "127.0.0.1:1", channels_per_endpoint=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels_per_endpoint"):
        Hub(channels_per_endpoint=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1, 64])
def test_the_bounds_are_accepted(value: int) -> None:
    ingestor = ExternalIngestor("k8s", "127.0.0.1:1", channels_per_endpoint=value)
    assert ingestor.channels_per_endpoint == value
    ingestor.close()
