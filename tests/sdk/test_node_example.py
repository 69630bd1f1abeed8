"""examples/node: a Node.js plugin that knows only the .proto follows the same contract.

Skipped, with the reason, when ``node`` is missing or its dependencies cannot be
installed (see the ``node_example`` fixture).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from ingestor import ExternalIngestor, IngestContext, RegistryResolver
from registry import RegistryClient, RegistryServer

from .conftest import Proc, WatchRecorder, wait_healthy


async def test_the_node_plugin_registers_serves_re_registers_and_leaves_on_sigterm(
    node_example: Path, registry: RegistryServer, procs: Callable[..., Proc]
) -> None:
    argv = ["node", "plugin.js", "--registry", registry.address, "--lease-ttl", "3"]
    plugin = procs("node plugin", [*argv, "--name", "node-lines", "--source", "node-lines"])
    plugin.cwd = node_example
    await plugin.start()
    listening = await plugin.wait_line(r"^out: listening on (\S+)$")
    registered = await plugin.wait_line(r"^out: registered (\S+)$")

    async with RegistryClient(registry.address) as client, WatchRecorder(client) as watch:
        found = await wait_healthy(client, "node-lines")
        assert (found.plugin_id, found.address) == (registered.group(1), listening.group(1))
        assert found.lease_ttl_seconds == 3

        async with (
            RegistryResolver(registry.address) as resolver,
            ExternalIngestor("node-lines", resolver=resolver) as ingestor,
        ):
            events = await ingestor.ingest_async(IngestContext("node-lines"), b"a\n\nb\r\nc")
        assert [(e.payload, e.source) for e in events] == [
            (b"a", "node-lines"),
            (b"b", "node-lines"),
            (b"c", "node-lines"),
        ]
        assert all(e.id and e.timestamp_unix_ns > 0 for e in events)

        # Forgotten by the registry: the next heartbeat is not acknowledged.
        await client.unregister(found.plugin_id)
        again = await wait_healthy(client, "node-lines")
        assert again.plugin_id != found.plugin_id

        plugin.send_signal(signal.SIGTERM)
        await watch.wait(lambda: again.plugin_id in watch.removed())
        assert await plugin.wait() == 0
        assert await client.list_plugins(name="node-lines") == []
