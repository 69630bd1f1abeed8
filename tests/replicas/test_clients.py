"""SPEC §8 "Clients take several registry addresses": a gateway resolver and an SDK plugin
given all three replicas keep working while each replica in turn is SIGKILLed.

After each death (and before the replica is started again on its old address): the
plugin still has the plugin id it first got (its lease never lapsed, it never
registered again), it stays routable, and the resolver's view follows a registration
made after the death.
"""

from __future__ import annotations

import asyncio

import pytest

from ingestor import RegistryResolver, ResolverView
from registry.client import RegistryClient
from registry.errors import RegistryUnavailable
from registry.sdk import PluginHost
from registry.sdk.host import Backoff
from registry.wire import pb

from .cluster import Cluster
from .common import DEADLINE, until
from .conftest import MakeCluster
from .load import LONG_LEASE

pytestmark = pytest.mark.postgres

# Short enough to lapse during the test if the plugin's renewals stopped at a death
# (the test watches it for two leases after the last one).
PLUGIN_LEASE = 5
SOURCE = "steady"


def routable(view: ResolverView, plugin_id: str) -> bool:
    return any(e.plugin_id == plugin_id for e in view.endpoints(SOURCE))


async def register_probe(client: RegistryClient, n: int, victim: str) -> pb.RegisterResponse:
    """Register ``probe-n`` through the multi-address client, retrying UNAVAILABLE."""
    errors: list[str] = []

    async def attempt() -> pb.RegisterResponse | None:
        try:
            return await client.register(
                pb.PluginInfo(
                    name=f"probe-{n}", type=pb.PLUGIN_TYPE_INGESTOR, sources=[f"probe-{n}"]
                ),
                f"127.0.0.1:{28000 + n}",
                lease_ttl_seconds=LONG_LEASE,
            )
        except RegistryUnavailable as exc:
            errors.append(str(exc))
            return None

    response: pb.RegisterResponse = await until(
        attempt,
        what=lambda: (
            f"a Register through {client!r} after {victim} died; last errors {errors[-3:]}"
        ),
        interval=0.1,
    )
    return response


async def survive_death(
    cluster: Cluster,
    victim: str,
    n: int,
    resolver: RegistryResolver,
    client: RegistryClient,
    host: PluginHost,
    plugin_id: str,
) -> None:
    """SIGKILL ``victim``; check the plugin, the resolver and the client through it."""
    await asyncio.to_thread(cluster.replica(victim).kill)
    survivors = [a for a in cluster.addresses if a != victim]
    await cluster.leader(survivors)
    probe = await register_probe(client, n, victim)
    try:
        await resolver.wait_for_async(lambda v: probe.plugin_id in v.plugins, DEADLINE)
    except TimeoutError:
        raise AssertionError(
            f"the resolver did not see probe-{n} ({probe.plugin_id}) after {victim} died; "
            f"it is at revision {resolver.revision}, connected {resolver.connected}"
        ) from None
    try:
        await resolver.wait_for_async(lambda v: routable(v, plugin_id), DEADLINE)
    except TimeoutError:
        raise AssertionError(
            f"the plugin {plugin_id} is not routable after {victim} died; the resolver has "
            f"{resolver.view.plugins.get(plugin_id) if resolver.view else 'no view'}"
        ) from None
    assert host.plugin_id == plugin_id, (
        f"the plugin registered again after {victim} died: {plugin_id} -> {host.plugin_id}"
    )


async def stays_routable(
    resolver: RegistryResolver, host: PluginHost, plugin_id: str, window: float
) -> None:
    """Watch for ``window`` seconds that the plugin keeps its id and stays routable.

    An invariant observed over a window (a lease that lapses shows within one), not a
    wait for something to happen.

    Raises:
        AssertionError: at the first moment it does not hold.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + window
    while loop.time() < end:
        assert host.plugin_id == plugin_id, f"the plugin registered again as {host.plugin_id}"
        view = resolver.current_view()
        assert routable(view, plugin_id), (
            f"the plugin {plugin_id} stopped being routable at revision {view.revision}: "
            f"{view.plugins.get(plugin_id)}"
        )
        await asyncio.sleep(0.2)  # the sampling rate of the observation


async def test_resolver_and_plugin_given_every_address_survive_each_replica_death(
    make_cluster: MakeCluster,
) -> None:
    # Health checks every second, so the plugin is HEALTHY (routable) soon after each take-over.
    cluster = await make_cluster(extra_args=("--health-interval", "1s"))
    await cluster.leader()
    addresses = list(cluster.addresses)
    statuses: list[str] = []  # the plugin's status in every view the resolver built

    async with RegistryResolver(addresses) as resolver, RegistryClient(addresses) as client:
        host = PluginHost(
            {"name": "steady", "sources": [SOURCE]},
            ingest=lambda request: [],
            registry=addresses,
            lease_ttl_seconds=PLUGIN_LEASE,
            backoff=Backoff(initial=0.05, maximum=0.5),
        )
        async with host:
            plugin_id = await asyncio.wait_for(host.wait_registered(), DEADLINE)
            await resolver.wait_for_async(lambda v: routable(v, plugin_id), DEADLINE)

            def record(view: ResolverView) -> None:
                plugin = view.plugins.get(plugin_id)
                statuses.append("gone" if plugin is None else pb.PluginStatus.Name(plugin.status))

            unsubscribe = resolver.subscribe(record)
            for n, victim in enumerate(addresses):
                await survive_death(cluster, victim, n, resolver, client, host, plugin_id)
                await cluster.restart(victim)
                await cluster.wait_agreed()
            await stays_routable(resolver, host, plugin_id, 2 * PLUGIN_LEASE)
            unsubscribe()

            assert host.plugin_id == plugin_id
            agreed = await cluster.wait_agreed()
            entry = agreed.listing.plugins.get(plugin_id)
            assert entry is not None, f"the plugin {plugin_id} is not listed"
            assert entry.status == "PLUGIN_STATUS_HEALTHY", entry
            steady = [i for i, e in agreed.listing.plugins.items() if e.name == "steady"]
            assert steady == [plugin_id], f"the plugin is listed as {steady}"
            lapsed = {"PLUGIN_STATUS_EXPIRED", "gone"} & set(statuses)
            assert not lapsed, f"the plugin's status in the resolver's views: {statuses}"
