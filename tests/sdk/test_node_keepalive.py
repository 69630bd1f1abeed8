"""examples/node renews over KeepAlive (SPEC §1.3), and heartbeats against a registry
without it.

Skipped, with the reason, when ``node`` is missing or its dependencies cannot be
installed (see the ``node_example`` fixture).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from registry import RegistryClient
from registry.testing import running_registry

from .conftest import Proc, eventually
from .test_host_keepalive import OldRegistry, lived, unary_heartbeats
from .test_host_keepalive import old_registry as old_registry


async def test_the_node_plugin_renews_its_lease_over_the_stream(
    node_example: Path, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    async with (
        running_registry(tmp_path, metrics_listen="127.0.0.1:0", reap_interval=0.1) as registry,
        RegistryClient(registry.address) as client,
    ):
        argv = ["node", "plugin.js", "--registry", registry.address, "--lease-ttl", "1"]
        plugin = procs("node plugin", [*argv, "--name", "node-ka", "--source", "node-ka"])
        plugin.cwd = node_example
        await plugin.start()
        plugin_id = (await plugin.wait_line(r"^out: registered (\S+)$")).group(1)
        await eventually(lambda: lived(client, plugin_id, 3), what="three TTLs of renewals")
        assert unary_heartbeats(registry) == 0
        plugin.send_signal(signal.SIGTERM)
        assert await plugin.wait() == 0
        assert await client.list_plugins(name="node-ka") == []


async def test_the_node_plugin_heartbeats_against_a_registry_without_keepalive(
    node_example: Path,
    old_registry: tuple[str, OldRegistry],
    procs: Callable[..., Proc],
) -> None:
    address, servicer = old_registry
    plugin = procs("node plugin", ["node", "plugin.js", "--registry", address])
    plugin.cwd = node_example
    await plugin.start()
    plugin_id = (await plugin.wait_line(r"^out: registered (\S+)$")).group(1)
    await eventually(lambda: servicer.heartbeats >= 3, what="three unary heartbeats")
    await plugin.wait_line("does not serve KeepAlive")
    plugin.send_signal(signal.SIGTERM)
    assert await plugin.wait() == 0
    assert servicer.unregistered == [plugin_id]
