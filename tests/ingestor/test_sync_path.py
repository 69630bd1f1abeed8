"""The synchronous path: ``ingest()`` calls on the caller's thread over sync gRPC channels.

Same semantics as the async path (resolution, spreading, breakers, retries, error
mapping, metrics, TLS), proved against real plugin servers; nothing is run through the
private loop per call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import trustme
from google.protobuf.empty_pb2 import Empty
from prometheus_client import CollectorRegistry

from ingestor import (
    BreakerSettings,
    BreakerState,
    ExternalIngestor,
    Hub,
    IngestContext,
    PluginConnectionError,
    PluginError,
    PluginTransformError,
    RegistryResolver,
)
from registry.client import RegistryClient
from registry.server import RegistryServer
from registry.testing import FakePlugin, eventually
from registry.trust.addresses import AddressPolicy
from registry.trust.tls import TlsFiles
from registry.wire import event_pb, pb, pb_grpc

CTX = IngestContext("k8s")
INFO = pb.PluginInfo(name="k8s-plugin", version="1", type=pb.PLUGIN_TYPE_INGESTOR, sources=["k8s"])


def on_thread(fn, *args):
    """Run ``fn`` on a fresh thread without an event loop (as a sync caller would)."""
    return asyncio.to_thread(fn, *args)


async def test_eight_threads_at_once_each_on_its_own_thread(plugin: FakePlugin) -> None:
    ingestor = ExternalIngestor("k8s", plugin.address)
    start = threading.Barrier(8)
    callers: set[int] = set()

    def worker(n: int) -> tuple[list[int], int]:
        start.wait(timeout=30)
        callers.add(threading.get_ident())
        counts = [len(ingestor.ingest(CTX, b"x\n" * (n + 1))) for _ in range(25)]
        return counts, ingestor.channels()

    with ThreadPoolExecutor(8) as pool:
        futures = [asyncio.wrap_future(pool.submit(worker, n)) for n in range(8)]
        results = await asyncio.gather(*futures)
    assert [counts for counts, _ in results] == [[n + 1] * 25 for n in range(8)]
    assert {channels for _, channels in results} == {1}  # one sync channel, shared
    assert len(callers) == 8
    assert plugin.ingest_calls == 200
    assert ingestor.channels() == 0  # nothing was made on this loop
    assert not ingestor._pools  # nor on any other (the bridge's): no hand-off per call
    await on_thread(ingestor.close)


async def test_calling_from_a_running_loop_raises_and_calls_nothing(plugin: FakePlugin) -> None:
    ingestor = ExternalIngestor("k8s", plugin.address)
    with pytest.raises(PluginError, match=r"await ingest_async\(ctx, data\)"):
        ingestor.ingest(CTX, b"a")
    with pytest.raises(PluginError, match=r"await ingest_with_errors_async"):
        ingestor.ingest_with_errors(CTX, b"a")
    with pytest.raises(PluginError, match=r"await health_async"):
        ingestor.health()
    hub = Hub().ingestor(ingestor).build()
    with pytest.raises(PluginError, match=r"await hub\.ingest_async"):
        hub.ingest(CTX, b"a")
    assert plugin.ingest_calls == 0
    assert await on_thread(ingestor.channels) == 0
    await hub.aclose()


async def test_close_closes_the_sync_channels(plugin: FakePlugin) -> None:
    ingestor = ExternalIngestor("k8s", plugin.address)
    assert len(await on_thread(ingestor.ingest, CTX, b"a\nb")) == 2
    assert await on_thread(ingestor.channels) == 1
    channel = ingestor._sync.connections(plugin.address)[0].channel  # type: ignore[union-attr]
    await on_thread(ingestor.close)
    assert await on_thread(ingestor.channels) == 0
    with pytest.raises(ValueError, match="closed channel"):
        channel.unary_unary("/polku.v1.IngestorPlugin/Health")(b"")
    with pytest.raises(PluginError, match="closed"):
        await on_thread(ingestor.ingest, CTX, b"a")
    assert plugin.ingest_calls == 1


async def test_errors_map_as_on_the_async_path(plugin: FakePlugin, free_port) -> None:
    def broken(request: pb.IngestRequest) -> pb.IngestResponse:
        raise RuntimeError("plugin bug")

    def only_errors(request: pb.IngestRequest) -> pb.IngestResponse:
        return pb.IngestResponse(errors=[pb.IngestError(message="bad", offset=3)])

    def some_errors(request: pb.IngestRequest) -> pb.IngestResponse:
        return pb.IngestResponse(
            events=[event_pb.Event(id="1")], errors=[pb.IngestError(message="bad", offset=1)]
        )

    with ExternalIngestor("k8s", plugin.address) as ingestor:
        plugin.ingest = broken
        with pytest.raises(PluginTransformError) as info:
            await on_thread(ingestor.ingest, CTX, b"x")
        assert info.value.code == "UNKNOWN"
        assert await on_thread(ingestor.channels) == 1  # it answered: the channel is kept
        plugin.ingest = only_errors
        with pytest.raises(PluginTransformError, match="offset 3") as info:
            await on_thread(ingestor.ingest, CTX, b"x")
        assert [e.message for e in info.value.errors] == ["bad"]
        plugin.ingest = some_errors
        result = await on_thread(ingestor.ingest_with_errors, CTX, b"x")
        assert ([e.id for e in result.events], [e.offset for e in result.errors]) == (["1"], [1])
        assert ingestor.breaker_states() == {plugin.address: BreakerState.CLOSED}

    unreachable = ExternalIngestor("k8s", f"127.0.0.1:{free_port()}", connect_timeout=5)
    with pytest.raises(PluginConnectionError, match="cannot connect") as caught:
        await on_thread(unreachable.ingest, CTX, b"a")
    assert caught.value.address == unreachable.address
    assert await on_thread(unreachable.channels) == 0  # the broken channel was dropped
    await on_thread(unreachable.close)


async def test_the_breaker_opens_on_the_sync_path_and_both_paths_share_it(free_port) -> None:
    address = f"127.0.0.1:{free_port()}"
    ingestor = ExternalIngestor("k8s", address, breaker=BreakerSettings(2, reset_timeout=60))
    for _ in range(2):
        with pytest.raises(PluginConnectionError, match="cannot connect"):
            await on_thread(ingestor.ingest, CTX, b"a")
    assert ingestor.breaker_states() == {address: BreakerState.OPEN}
    with pytest.raises(PluginConnectionError, match="circuit open"):
        await on_thread(ingestor.ingest, CTX, b"a")
    with pytest.raises(PluginConnectionError, match="circuit open"):
        await ingestor.ingest_async(CTX, b"a")
    await ingestor.aclose()


async def test_a_refused_endpoint_is_never_dialled_on_the_sync_path(plugin: FakePlugin) -> None:
    policy = AddressPolicy.default("127.0.0.1:0", allow=["10.0.0.0/8"])
    with ExternalIngestor("k8s", plugin.address, address_policy=policy) as ingestor:
        for _ in range(2):
            with pytest.raises(PluginConnectionError, match="address policy"):
                await on_thread(ingestor.ingest, CTX, b"a")
        assert await on_thread(ingestor.channels) == 0
    assert plugin.ingest_calls == 0


async def test_sync_ingests_are_measured(plugin: FakePlugin) -> None:
    metrics = CollectorRegistry()
    with ExternalIngestor("k8s", plugin.address, metrics=metrics) as ingestor:
        for _ in range(3):
            await on_thread(ingestor.ingest, CTX, b"a")
        plugin.ingest = lambda request: pb.IngestResponse(errors=[pb.IngestError(message="x")])
        with pytest.raises(PluginTransformError):
            await on_thread(ingestor.ingest, CTX, b"a")

    def sample(name: str, **labels: str) -> float | None:
        return metrics.get_sample_value(f"polku_gateway_{name}", {"source": "k8s", **labels})

    assert sample("ingest_duration_seconds_count", result="ok") == 3
    assert sample("ingest_duration_seconds_count", result="error") == 1
    assert sample("ingest_errors_total", kind="no_events") == 1


async def test_fail_over_when_an_instance_dies(
    registry: RegistryServer, client: RegistryClient, spawn
) -> None:
    """Two plugin processes; one is SIGKILLed mid-stream: no sync call fails."""
    procs = [spawn(name="k8s-plugin", sources=("k8s",)) for _ in range(2)]
    await asyncio.gather(*(proc.start() for proc in procs))
    for proc in procs:
        await client.register(INFO, proc.address)
    async with RegistryResolver(registry.address) as resolver:
        await resolver.wait_for_async(lambda v: len(v.endpoints("k8s")) == 2, 10)
        ingestor = ExternalIngestor("k8s", resolver=resolver)
        loop = asyncio.get_running_loop()
        killed = threading.Event()
        done = 0
        lock = threading.Lock()

        def caller() -> int:
            nonlocal done
            served = 0
            while True:
                with lock:
                    if done >= 200:
                        return served
                    done += 1
                    kill = done == 60
                if kill:
                    asyncio.run_coroutine_threadsafe(procs[1].kill(), loop).result(30)
                    killed.set()
                assert len(ingestor.ingest(CTX, b"x\ny")) == 2
                served += 1

        served = await asyncio.gather(*(on_thread(caller) for _ in range(4)))
        assert killed.is_set()
        assert sum(served) == 200
        # Both instances had calls (spread), then the dead one dropped out of the view.
        await resolver.wait_for_async(lambda v: len(v.endpoints("k8s")) == 1, 10)

        async def one_channel() -> bool:
            return await on_thread(ingestor.channels) == 1

        await eventually(one_channel, what="the dead instance's channel to close")
        assert len(await on_thread(ingestor.ingest, CTX, b"z")) == 1
        assert await on_thread(ingestor.channels) == 1
        await on_thread(ingestor.close)


async def test_calls_spread_over_two_instances(
    registry: RegistryServer, client: RegistryClient
) -> None:
    async with (
        FakePlugin(name="k8s-plugin", sources=["k8s"]) as one,
        FakePlugin(name="k8s-plugin", sources=["k8s"]) as two,
        RegistryResolver(registry.address) as resolver,
    ):
        for plugin in (one, two):
            await client.register(plugin.info(), plugin.address)
        await resolver.wait_for_async(lambda v: len(v.endpoints("k8s")) == 2, 10)
        ingestor = ExternalIngestor("k8s", resolver=resolver)

        def use() -> int:
            for _ in range(20):
                ingestor.ingest(CTX, b"a")
            return ingestor.channels()

        assert await on_thread(use) == 2
        assert (one.ingest_calls, two.ingest_calls) == (10, 10)
        await on_thread(ingestor.close)


async def test_hub_sync_ingest_routes_on_the_callers_thread(
    registry: RegistryServer, client: RegistryClient, plugin: FakePlugin
) -> None:
    await client.register(plugin.info(), plugin.address)
    async with RegistryResolver(registry.address) as resolver:
        await resolver.wait_for_async(lambda v: bool(v.endpoints("k8s")), 10)
        hub = Hub(resolver=resolver).build()
        result = await on_thread(hub.ingest_with_errors, CTX, b"a\nb")
        assert len(result.events) == 2
        with pytest.raises(PluginError, match="no ingestor for source 'nope'"):
            await on_thread(hub.ingest, IngestContext("nope"), b"a")
        await on_thread(hub.close)


# -- TLS ---------------------------------------------------------------------------------


class StubResolver:
    """Resolves plugin.test to 127.0.0.1 without the network."""

    async def resolve(self, host: str, port: int) -> list[ipaddress.IPv4Address]:
        if host != "plugin.test":
            raise OSError(f"{host}: not in the stub's table")
        return [ipaddress.IPv4Address("127.0.0.1")]


class Echo(pb_grpc.IngestorPluginServicer):
    def __init__(self) -> None:
        self.ingest_calls = 0

    async def Health(self, request: Empty, context: object) -> pb.PluginHealthResponse:
        return pb.PluginHealthResponse(healthy=True)

    async def Ingest(self, request: pb.IngestRequest, context: object) -> pb.IngestResponse:
        self.ingest_calls += 1
        return pb.IngestResponse(events=[event_pb.Event(id="1", payload=request.data)])


@pytest.fixture
async def tls_plugin(tmp_path):
    """An https plugin for plugin.test (mTLS required); yields (port, servicer, files)."""
    ca, foreign = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("plugin.test")
    client = ca.issue_cert("gateway.test")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "foreign", "cert", "key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    foreign.cert_pem.write_to_path(str(files["foreign"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    servicer = Echo()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_IngestorPluginServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(leaf.private_key_pem.bytes(), b"".join(p.bytes() for p in leaf.cert_chain_pems))],
        root_certificates=ca.cert_pem.bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port, servicer, files
    finally:
        await server.stop(None)


async def test_tls_and_the_client_certificate_are_honoured_on_the_sync_channel(
    tls_plugin,
) -> None:
    port, servicer, files = tls_plugin
    address = f"https://plugin.test:{port}"

    def ingestor(**tls: object) -> ExternalIngestor:
        return ExternalIngestor(
            "k8s",
            address,
            address_policy=AddressPolicy.default("127.0.0.1:0", allow=["127.0.0.1/32"]),
            host_resolver=StubResolver(),
            tls=TlsFiles(**tls),  # type: ignore[arg-type]
            connect_timeout=3,
        )

    with ingestor(ca=files["ca"], cert=files["cert"], key=files["key"]) as mutual:
        events = await on_thread(mutual.ingest, CTX, b"over tls")
        assert [e.payload for e in events] == [b"over tls"]
        assert (await on_thread(mutual.health)).healthy
    # The name is verified at the vetted IP: a foreign CA, or no client certificate, fails.
    foreign = ingestor(ca=files["foreign"], cert=files["cert"], key=files["key"])
    with foreign, pytest.raises(PluginConnectionError):
        await on_thread(foreign.ingest, CTX, b"over tls")
    anonymous = ingestor(ca=files["ca"])
    with anonymous, pytest.raises(PluginConnectionError):
        await on_thread(anonymous.ingest, CTX, b"over tls")
    assert servicer.ingest_calls == 1
