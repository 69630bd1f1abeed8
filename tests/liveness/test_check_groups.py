"""Plugins that shared one Health call stay due together (one call again next round)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from registry.client import RegistryClient
from registry.testing import FakePlugin, eventually, running_registry
from registry.wire import pb

DEADLINE = 10.0


async def test_a_group_that_shared_a_call_is_due_again_at_one_time(tmp_path: Path) -> None:
    # No first check in Register: the poller's first round makes the call they share.
    async with (
        running_registry(tmp_path, first_check_wait=0, health_interval=3600) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
    ):
        checker = registry.checker
        infos = [pb.PluginInfo(name=f"g-{i}", type=1, sources=[f"g-{i}"]) for i in range(12)]
        registered = await asyncio.gather(*(client.register(i, plugin.address) for i in infos))
        ids = [r.plugin_id for r in registered]
        await eventually(lambda: checker.results >= len(ids), within=DEADLINE)
        await eventually(
            lambda: all(checker._timers.deadline(i) is not None for i in ids), within=DEADLINE
        )
        deadlines = {checker._timers.deadline(i) for i in ids}
        # As many distinct deadlines as calls were made: one per group, never one each.
        assert len(deadlines) <= plugin.health_calls < len(ids)
