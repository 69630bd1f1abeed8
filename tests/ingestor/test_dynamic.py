"""ExternalIngestor resolved through a real registry, following its Watch stream."""

from __future__ import annotations

import asyncio

import pytest

from ingestor import (
    ExternalIngestor,
    IngestContext,
    PluginConnectionError,
    PluginError,
    RegistryResolver,
    ResolverView,
)
from registry.client import RegistryClient
from registry.server import RegistryServer
from registry.testing import FakePlugin, running_registry
from registry.wire import pb

CTX = IngestContext("k8s")
INFO = pb.PluginInfo(name="k8s-plugin", version="1", type=pb.PLUGIN_TYPE_INGESTOR, sources=["k8s"])


def addresses(view: ResolverView, source: str = "k8s") -> set[str]:
    return {e.address for e in view.endpoints(source)}


async def test_plugin_registered_after_the_ingestor_was_built(
    registry: RegistryServer, client: RegistryClient
) -> None:
    async with RegistryResolver(registry.address) as resolver:
        ingestor = ExternalIngestor("k8s", resolver=resolver)
        await resolver.wait_synced_async(10)
        with pytest.raises(PluginConnectionError, match="no registered plugin declares"):
            await ingestor.ingest_async(CTX, b"a")

        async with FakePlugin(name="k8s-plugin", sources=["k8s"]) as plugin:
            await client.register(plugin.info(), plugin.address)
            await resolver.wait_for_async(lambda v: plugin.address in addresses(v), 10)
            events = await ingestor.ingest_async(CTX, b"a\nb")
            assert [e.payload for e in events] == [b"a", b"b"]
            assert plugin.ingest_calls == 1
            await ingestor.aclose()


async def test_first_call_waits_for_the_first_snapshot(
    registry: RegistryServer, client: RegistryClient, plugin: FakePlugin, wait_for
) -> None:
    await client.register(plugin.info(), plugin.address)
    await wait_for(lambda: registry.state.catalog.revision > 0)
    async with RegistryResolver(registry.address) as resolver:
        await resolver.wait_for_async(lambda v: bool(v.endpoints("k8s")), 10)
    # A fresh resolver, used lazily on the first call: no explicit start or wait.
    resolver = RegistryResolver(registry.address)
    async with ExternalIngestor("k8s", resolver=resolver) as ingestor:
        assert len(await ingestor.ingest_async(CTX, b"a")) == 1
    await resolver.aclose()


async def test_reregistered_on_a_new_port_gets_the_next_calls(
    registry: RegistryServer, client: RegistryClient
) -> None:
    async with RegistryResolver(registry.address) as resolver:
        ingestor = ExternalIngestor("k8s", resolver=resolver)
        old = FakePlugin(name="k8s-plugin", sources=["k8s"])
        await old.start()
        first = await client.register(old.info(), old.address)
        await resolver.wait_for_async(lambda v: addresses(v) == {old.address}, 10)
        await ingestor.ingest_async(CTX, b"a")
        assert old.ingest_calls == 1

        # The plugin restarts elsewhere: the old instance goes, a new one registers.
        await old.stop()
        async with FakePlugin(name="k8s-plugin", sources=["k8s"]) as new:
            await client.unregister(first.plugin_id)
            await client.register(new.info(), new.address)
            await resolver.wait_for_async(lambda v: addresses(v) == {new.address}, 10)
            for _ in range(5):
                await ingestor.ingest_async(CTX, b"a")
            assert new.ingest_calls == 5
        assert old.ingest_calls == 1
        await ingestor.aclose()


async def test_calls_spread_over_two_replicas(
    registry: RegistryServer, client: RegistryClient
) -> None:
    one = FakePlugin(name="k8s-plugin", sources=["k8s"])
    two = FakePlugin(name="k8s-plugin", sources=["k8s"])
    async with one, two, RegistryResolver(registry.address) as resolver:
        for plugin in (one, two):
            await client.register(plugin.info(), plugin.address)
        await resolver.wait_for_async(lambda v: len(v.endpoints("k8s")) == 2, 10)
        async with ExternalIngestor("k8s", resolver=resolver) as ingestor:
            for _ in range(20):
                await ingestor.ingest_async(CTX, b"a")
            assert ingestor.channels() == 2
        assert one.ingest_calls == 10
        assert two.ingest_calls == 10


async def test_unhealthy_replica_stops_getting_calls_and_its_channel_closes(
    tmp_path, wait_for
) -> None:
    fast = {"health_interval": 0.05, "unhealthy_threshold": 1, "watch_progress_interval": 0.2}
    one = FakePlugin(name="k8s-plugin", sources=["k8s"])
    two = FakePlugin(name="k8s-plugin", sources=["k8s"])
    async with (
        running_registry(tmp_path, **fast) as registry,
        RegistryClient(registry.address) as client,
        one,
        two,
        RegistryResolver(registry.address) as resolver,
        ExternalIngestor("k8s", resolver=resolver) as ingestor,
    ):
        for plugin in (one, two):
            await client.register(plugin.info(), plugin.address)
        await resolver.wait_for_async(lambda v: len(v.endpoints("k8s")) == 2, 10)
        for _ in range(4):
            await ingestor.ingest_async(CTX, b"a")
        assert ingestor.channels() == 2

        two.healthy = False
        await resolver.wait_for_async(lambda v: addresses(v) == {one.address}, 10)
        await wait_for(lambda: ingestor.channels() == 1, message="channel to two not closed")
        before = two.ingest_calls
        for _ in range(10):
            await ingestor.ingest_async(CTX, b"a")
        assert two.ingest_calls == before


async def test_sigkill_of_a_replica_fails_no_call(
    registry: RegistryServer, client: RegistryClient, spawn
) -> None:
    procs = [spawn(name="k8s-plugin", sources=("k8s",)) for _ in range(2)]
    await asyncio.gather(*(proc.start() for proc in procs))
    for proc in procs:
        await client.register(INFO, proc.address)
    async with RegistryResolver(registry.address) as resolver:
        await resolver.wait_for_async(lambda v: len(v.endpoints("k8s")) == 2, 10)
        async with ExternalIngestor("k8s", resolver=resolver) as ingestor:
            done = 0
            killed = asyncio.Event()

            async def caller() -> None:
                nonlocal done
                while done < 200:
                    done += 1
                    if done == 60:
                        await procs[1].kill()
                        killed.set()
                    assert len(await ingestor.ingest_async(CTX, b"x\ny")) == 2

            await asyncio.gather(*(caller() for _ in range(4)))
            assert killed.is_set()
            # The registry notices too, and the resolver drops the dead replica.
            await resolver.wait_for_async(lambda v: addresses(v) == {procs[0].address}, 10)


async def test_registry_outage_keeps_known_endpoints(
    registry_process, plugin: FakePlugin, wait_for
) -> None:
    async with RegistryClient(registry_process.address) as client:
        await client.register(plugin.info(), plugin.address)
    resolver = RegistryResolver(registry_process.address, backoff_max=0.2)
    await resolver.start_async()
    await resolver.wait_for_async(lambda v: plugin.address in addresses(v), 10)
    async with ExternalIngestor("k8s", resolver=resolver) as ingestor:
        await registry_process.kill()
        await wait_for(lambda: not resolver.connected, message="resolver did not notice")
        for _ in range(100):
            assert len(await ingestor.ingest_async(CTX, b"a")) == 1
        assert plugin.ingest_calls == 100

        # The registry comes back on the same database and port: the resolver catches up.
        await registry_process.start()
        async with FakePlugin(name="late", sources=["late"]) as late:
            async with RegistryClient(registry_process.address) as client:
                await client.register(late.info(), late.address)
            view = await resolver.wait_for_async(lambda v: late.address in addresses(v, "late"))
            assert plugin.address in addresses(view) or view.declares("k8s")
            async with ExternalIngestor("late", resolver=resolver) as late_ingestor:
                assert len(await late_ingestor.ingest_async(IngestContext("late"), b"z")) == 1
    await resolver.aclose()


async def test_max_staleness_turns_an_old_view_into_an_error(
    registry_process, plugin: FakePlugin, wait_for
) -> None:
    async with RegistryClient(registry_process.address) as client:
        await client.register(plugin.info(), plugin.address)
    # The registry's idle progress interval is 5 s: keep the limit above it.
    resolver = RegistryResolver(registry_process.address, max_staleness=6)
    async with resolver, ExternalIngestor("k8s", resolver=resolver) as ingestor:
        await resolver.wait_for_async(lambda v: plugin.address in addresses(v), 10)
        assert len(await ingestor.ingest_async(CTX, b"a")) == 1
        await registry_process.kill()
        await wait_for(lambda: resolver.staleness > 6, within=30)
        with pytest.raises(PluginConnectionError, match="max_staleness"):
            await ingestor.ingest_async(CTX, b"a")


async def test_never_synced_is_a_clear_connection_error(free_port) -> None:
    resolver = RegistryResolver(f"127.0.0.1:{free_port()}", connect_timeout=0.3)
    with pytest.raises(PluginConnectionError, match="no view of registry"):
        resolver.resolve("k8s")
    async with ExternalIngestor("k8s", resolver=resolver) as ingestor:
        with pytest.raises(PluginConnectionError, match="no view of registry") as info:
            await ingestor.ingest_async(CTX, b"a")
    assert "last error" in str(info.value)
    assert resolver.staleness == float("inf")
    await resolver.aclose()
    with pytest.raises(PluginError, match="closed"):
        resolver.resolve("k8s")


async def test_sync_resolver_from_a_thread(registry: RegistryServer, client, plugin) -> None:
    await client.register(plugin.info(), plugin.address)

    def use() -> int:
        with RegistryResolver(registry.address) as resolver:
            resolver.wait_synced(10)
            resolver.wait_for(lambda v: bool(v.endpoints("k8s")), 10)
            with ExternalIngestor("k8s", resolver=resolver) as ingestor:
                return len(ingestor.ingest(CTX, b"a\nb"))

    assert await asyncio.to_thread(use) == 2


async def test_hooks_see_every_change(registry: RegistryServer, client, plugin) -> None:
    seen: list[int] = []
    async with RegistryResolver(registry.address) as resolver:
        unsubscribe = resolver.subscribe(lambda view: seen.append(view.revision))
        await resolver.wait_synced_async(10)
        await client.register(plugin.info(), plugin.address)
        await resolver.wait_for_async(lambda v: bool(v.endpoints("k8s")), 10)
        unsubscribe()
    assert seen == sorted(seen)
    assert len(seen) >= 2  # the snapshot, then the registration (and its health)
