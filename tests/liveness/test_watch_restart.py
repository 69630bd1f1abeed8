"""Watch resumes across a restart: the change log loaded at start sends what the live one did.

The loaded log shares the catalogue's objects (registry.interning); a state changed or
touched since its change must still be sent as that change made it.
"""

from __future__ import annotations

from registry import RegistryClient
from registry.testing import FakePlugin, running_registry

from .conftest import eventually, plugin_info, recording


async def test_a_resume_after_a_restart_gets_what_it_got_before(tmp_path):
    """States changed (HEALTHY) and touched (heartbeats) since their change are sent as
    the change made them, before a restart and after."""
    async with FakePlugin() as live:
        async with (
            running_registry(tmp_path, health_interval=60) as registry,
            RegistryClient(registry.address) as client,
            recording(client) as steady,
        ):
            await client.register(plugin_info("first", ["s"]), live.address)
            start = registry.state.view.revision  # resumed from here: 0 would be a snapshot
            ids = []
            for i in range(3):
                response = await client.register(plugin_info(f"p{i}", [f"s{i}"]), live.address)
                ids.append(response.plugin_id)
            await client.unregister(ids[2])
            final = registry.state.view.revision
            await steady.wait_revision(final)
            for plugin_id in ids[:2]:
                assert await client.heartbeat(plugin_id)
            before = [m for m in steady.deltas if m.revision > start]

        async with (
            running_registry(tmp_path, health_interval=60) as registry,
            RegistryClient(registry.address) as client,
            recording(client, since_revision=start) as back,
        ):
            await back.wait_revision(final)
            await eventually(lambda: len(back.deltas) >= len(before))
            assert back.deltas[: len(before)] == before
            assert not any(m.snapshot for m in back.messages)
