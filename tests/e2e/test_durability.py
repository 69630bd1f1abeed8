"""SPEC §2 Durability: an acknowledged Register/Unregister survives ``kill -9``.

The registry runs as its own process (the CLI), is SIGKILLed right after the last
acknowledgement (no shutdown, no final flush), and is started again on the same
database: every acknowledged plugin is back, every acknowledged removal stays removed.
"""

from __future__ import annotations

import asyncio
import signal

from helpers import RegistryProcess

from registry import RegistryClient
from registry.wire import pb

COUNT = 200
REMOVED = 20


def info(i: int) -> pb.PluginInfo:
    name = f"durable-{i}"
    return pb.PluginInfo(name=name, type=pb.PLUGIN_TYPE_INGESTOR, sources=[name])


async def test_acknowledged_writes_survive_kill_9(database_url):
    first = RegistryProcess(database_url)
    try:
        address = await asyncio.to_thread(first.start)
        async with RegistryClient(address, timeout=60) as client:
            responses = await asyncio.gather(
                *(client.register(info(i), f"127.0.0.1:{20000 + i}") for i in range(COUNT))
            )
            assert all(r.accepted for r in responses)
            ids = [r.plugin_id for r in responses]
            assert len(set(ids)) == COUNT
            removed = ids[:REMOVED]
            await asyncio.gather(*(client.unregister(i) for i in removed))
            revision = (await client.stub.ListPlugins(pb.ListPluginsRequest(page_size=1))).revision
            await asyncio.to_thread(first.kill)
    finally:
        await asyncio.to_thread(first.kill)
    assert first.returncode == -signal.SIGKILL

    second = RegistryProcess(database_url)
    try:
        address = await asyncio.to_thread(second.start)
        async with RegistryClient(address, timeout=60) as client:
            listed = await client.list_plugins()
            after = (await client.stub.ListPlugins(pb.ListPluginsRequest(page_size=1))).revision
            kept = ids[REMOVED]
            plugin = await client.get_plugin(kept)
            # A lease survives the restart (one TTL of grace), so the plugin can go on.
            assert await client.heartbeat(kept)
    finally:
        await asyncio.to_thread(second.stop)

    listed_ids = [p.plugin_id for p in listed]
    assert len(listed_ids) == len(set(listed_ids))
    assert set(listed_ids) == set(ids[REMOVED:])
    assert after >= revision >= COUNT + REMOVED
    assert plugin.info == info(REMOVED)
    assert plugin.address == f"127.0.0.1:{20000 + REMOVED}"
    for process in (first, second):
        assert "database is locked" not in process.output
        assert "Traceback" not in process.output
