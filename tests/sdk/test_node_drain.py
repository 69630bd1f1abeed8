"""examples/node drained (SPEC §9): a plugin that knows only the .proto stays drained.

Its heartbeats are still acknowledged, so it keeps its id and never registers again
while an operator holds it out of routing; undrained, the gateway routes to it again.
Skipped, with the reason, when ``node`` is missing (see the ``node_example`` fixture).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from ingestor import ExternalIngestor, IngestContext, RegistryResolver
from registry import RegistryClient, RegistryServer
from registry.wire import pb

from .conftest import Proc, WatchRecorder, eventually, wait_healthy

LEASE = 2  # seconds; the registry grants heartbeats every second


def statuses(watch: WatchRecorder, plugin_id: str) -> list[int]:
    """The statuses of one plugin's changes as the watcher saw them."""
    return [
        p.status
        for m in watch.messages
        if not m.snapshot
        for p in m.upserted
        if p.plugin_id == plugin_id
    ]


async def test_the_node_plugin_drained_keeps_its_id_and_comes_back_on_undrain(
    node_example: Path, registry: RegistryServer, procs: Callable[..., Proc]
) -> None:
    argv = ["node", "plugin.js", "--registry", registry.address, "--lease-ttl", str(LEASE)]
    plugin = procs("node plugin", [*argv, "--name", "node-drain", "--source", "node-drain"])
    plugin.cwd = node_example
    await plugin.start()
    registered = await plugin.wait_line(r"^out: registered (\S+)$")

    async with RegistryClient(registry.address) as client, WatchRecorder(client) as watch:
        found = await wait_healthy(client, "node-drain")
        plugin_id = found.plugin_id
        assert plugin_id == registered.group(1)

        drained = await client.drain(name="node-drain")
        assert [(p.plugin_id, p.status) for p in drained.plugins] == [
            (plugin_id, pb.PLUGIN_STATUS_DRAINING)
        ]
        assert not (await client.resolve(source="node-drain")).endpoints
        since = drained.plugins[0].last_heartbeat_at.ToDatetime()

        async def renewed_past_the_lease() -> bool:
            now = await client.get_plugin(plugin_id)
            return (now.last_heartbeat_at.ToDatetime() - since).total_seconds() > LEASE + 0.5

        await eventually(renewed_past_the_lease, what="heartbeats past the lease")
        listed = await client.list_plugins(name="node-drain")
        assert [(p.plugin_id, p.status) for p in listed] == [(plugin_id, pb.PLUGIN_STATUS_DRAINING)]
        assert [line for line in plugin.lines if line.startswith("out: registered")] == [
            f"out: registered {plugin_id}"
        ]  # it never registered again

        back = await client.drain(plugin_id=plugin_id, undrain=True)
        assert [p.status for p in back.plugins] == [pb.PLUGIN_STATUS_HEALTHY]
        both = [pb.PLUGIN_STATUS_DRAINING, pb.PLUGIN_STATUS_HEALTHY]
        await watch.wait(lambda: statuses(watch, plugin_id)[-2:] == both)

        async with (
            RegistryResolver(registry.address) as resolver,
            ExternalIngestor("node-drain", resolver=resolver) as ingestor,
        ):
            events = await ingestor.ingest_async(IngestContext("node-drain"), b"a\nb")
        assert [e.payload for e in events] == [b"a", b"b"]

        plugin.send_signal(signal.SIGTERM)
        await watch.wait(lambda: plugin_id in watch.removed())
        assert await plugin.wait() == 0
