"""examples/node in emitter mode (``--emitter NAME``): an EmitterPlugin in Node.js,
routed to through the Hub, deduplicating by id, told to Shutdown when the gateway closes.

Skipped, with the reason, when ``node`` is missing (see the ``node_example`` fixture).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ingestor import ExternalEmitter, Hub, PluginEmitError, RegistryResolver
from registry import RegistryClient, RegistryServer
from registry.wire import event_pb, pb

from .conftest import Proc, wait_healthy


def emitted(plugin: Proc) -> list[dict[str, str]]:
    prefix = "out: emitted "
    return [json.loads(line[len(prefix) :]) for line in plugin.lines if line.startswith(prefix)]


async def test_the_node_emitter_serves_emit_and_shutdown_end_to_end(
    node_example: Path, registry: RegistryServer, procs: Callable[..., Proc]
) -> None:
    argv = ["node", "plugin.js", "--registry", registry.address, "--emitter", "node-out"]
    plugin = procs("node emitter", argv)
    plugin.cwd = node_example
    await plugin.start()
    await plugin.wait_line(r"^out: registered (\S+)$")

    async with RegistryClient(registry.address) as client:
        found = await wait_healthy(client, "node-node-out")
        assert found.info.type == pb.PLUGIN_TYPE_EMITTER
        assert found.info.emitter_name == "node-out"

        async with RegistryResolver(registry.address) as resolver:
            await resolver.wait_for_async(lambda v: bool(v.emitter_endpoints("node-out")), 10)
            async with Hub(resolver=resolver).build() as hub:
                events = [
                    event_pb.Event(id="a", source="s", event_type="t", payload=b"one"),
                    event_pb.Event(id="b", source="s", payload=b"two", route_to=["node-out"]),
                    event_pb.Event(id="c", route_to=["elsewhere"]),
                ]
                result = await hub.emit_async(events)
                assert result.ok
                assert (result.delivered, result.dropped) == ({"node-out": 2}, 1)
                await hub.emit_async(events[:1])  # a resend: acknowledged, printed once
                await plugin.wait_line(r"^out: emitted .*\"b\"")
            # Leaving the hub closed its emitter: Shutdown reached the plugin.
            await plugin.wait_line(r"^out: shutdown$")

            # An event without an id is refused (it could not be deduplicated).
            async with ExternalEmitter("node-out", resolver=resolver) as emitter:
                with pytest.raises(PluginEmitError, match=r"1 of 1 event\(s\) not delivered"):
                    await emitter.emit_async([event_pb.Event(source="s", payload=b"?")])

    assert emitted(plugin) == [
        {"id": "a", "source": "s", "type": "t", "payload": "one"},
        {"id": "b", "source": "s", "type": "", "payload": "two"},
    ]
    plugin.send_signal(signal.SIGTERM)
    assert await plugin.wait() == 0
