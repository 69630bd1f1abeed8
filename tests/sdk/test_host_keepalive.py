"""PluginHost renews over KeepAlive (SPEC §1.3): one stream per process, unary against
an older registry, a new stream after the registry comes back.

Real registries on 127.0.0.1:0 over SQLite under tmp_path, real PluginHosts; every
wait is on a condition with a deadline (:func:`eventually`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from registry import RegistryClient, RegistryServer
from registry.sdk import PluginHost
from registry.testing import running_registry
from registry.wire import pb, pb_grpc

from .conftest import eventually, free_port
from .test_host import FAST, lines


def host_for(address: str, name: str, **kwargs: Any) -> PluginHost:
    info = {"name": name, "sources": [name]}
    return PluginHost(info, ingest=lines, registry=address, backoff=FAST, **kwargs)


def sample(registry: RegistryServer, name: str, **labels: str) -> float:
    metrics = registry.metrics
    assert metrics is not None
    return metrics.registry.get_sample_value(name, labels) or 0.0


def unary_heartbeats(registry: RegistryServer) -> float:
    return sample(
        registry,
        "polku_registry_rpcs_total",
        service="polku.v1.PluginRegistry",
        method="Heartbeat",
        code="OK",
    )


async def lived(client: RegistryClient, plugin_id: str, seconds: float) -> bool:
    """Whether ``plugin_id`` is alive and was renewed ``seconds`` after it registered."""
    plugin = await client.get_plugin(plugin_id)
    assert plugin.status != pb.PLUGIN_STATUS_EXPIRED, plugin
    renewed = plugin.last_heartbeat_at.ToDatetime() - plugin.registered_at.ToDatetime()
    return renewed.total_seconds() > seconds


async def test_hosts_of_one_process_renew_over_one_stream_and_no_unary_heartbeat(
    tmp_path: Path,
) -> None:
    # One KeepAlive stream allowed per peer host: a second stream would be refused,
    # and its host's lease would run out.
    async with (
        running_registry(
            tmp_path,
            max_streams_per_principal=1,
            metrics_listen="127.0.0.1:0",
            reap_interval=0.1,
        ) as registry,
        RegistryClient(registry.address) as client,
        host_for(registry.address, "one", lease_ttl_seconds=1) as one,
        host_for(registry.address, "two", lease_ttl_seconds=1) as two,
    ):
        ids = [await one.wait_registered(), await two.wait_registered()]
        for plugin_id in ids:
            await eventually(lambda i=plugin_id: lived(client, i, 3), what=f"{plugin_id} renewed")
        assert [one.plugin_id, two.plugin_id] == ids  # never registered again
        assert unary_heartbeats(registry) == 0
        renewals = sample(registry, "polku_registry_heartbeats_total", acknowledged="true")
        assert renewals >= 6


class OldRegistry(pb_grpc.PluginRegistryServicer):  # type: ignore[misc]
    """A registry from before KeepAlive: Register, Heartbeat and Unregister only.

    KeepAlive is the generated default, which answers UNIMPLEMENTED.
    """

    def __init__(self) -> None:
        self.heartbeats = 0
        self.unregistered: list[str] = []

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        return pb.RegisterResponse(
            accepted=True,
            plugin_id="01HOLDREGISTRY000000000000",
            lease_ttl_seconds=1,
            heartbeat_interval_seconds=1,
        )

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        self.heartbeats += 1
        return pb.HeartbeatResponse(acknowledged=True)

    async def Unregister(
        self, request: pb.UnregisterRequest, context: grpc.aio.ServicerContext
    ) -> Empty:
        self.unregistered.append(request.plugin_id)
        return Empty()


@pytest.fixture
async def old_registry() -> AsyncIterator[tuple[str, OldRegistry]]:
    servicer = OldRegistry()
    server = grpc.aio.server()
    pb_grpc.add_PluginRegistryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


async def test_against_a_registry_without_keepalive_the_host_heartbeats(
    old_registry: tuple[str, OldRegistry],
) -> None:
    address, servicer = old_registry
    async with host_for(address, "old", lease_ttl_seconds=1) as host:
        plugin_id = await host.wait_registered()
        await eventually(lambda: servicer.heartbeats >= 3, what="three unary heartbeats")
        assert host.plugin_id == plugin_id
    assert servicer.unregistered == [plugin_id]


async def test_after_the_registry_restarts_the_host_renews_over_a_new_stream(
    tmp_path: Path,
) -> None:
    port = free_port()
    settings: dict[str, Any] = {"listen": f"127.0.0.1:{port}", "metrics_listen": "127.0.0.1:0"}
    async with host_for(f"127.0.0.1:{port}", "back", lease_ttl_seconds=2) as host:
        async with running_registry(tmp_path, **settings):
            plugin_id = await host.wait_registered()
        restarted = datetime.now(UTC).replace(tzinfo=None)
        async with (
            running_registry(tmp_path, **settings) as registry,
            RegistryClient(registry.address) as client,
        ):

            async def renewed_since_restart() -> bool:
                plugin = await client.get_plugin(plugin_id)
                return plugin.last_heartbeat_at.ToDatetime() > restarted

            # Same id (one TTL of grace after a restart), renewed over the stream.
            await eventually(renewed_since_restart, what="a renewal after the restart")
            assert host.plugin_id == plugin_id
            assert unary_heartbeats(registry) == 0
