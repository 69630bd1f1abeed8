"""Active health checks: the first check, hysteresis, broken channels, hangs, recovery.

Each test runs a real registry (SQLite under tmp_path) and real plugin servers,
in process (FakePlugin) or as processes that are killed or stopped. Deadlines
only bound failures; where a path must be told apart from the periodic checks,
the interval is 60 s so that nothing else can explain what is observed.
"""

from __future__ import annotations

import signal

import pytest

from registry import PluginStatus, RegistryClient
from registry.testing import FakePlugin, running_registry
from registry.wire import pb

from .conftest import (
    eventually,
    history,
    plugin_info,
    plugin_process,
    recording,
    resolved_ids,
    status_of,
    steps,
    wait_status,
)

UNKNOWN, HEALTHY, UNHEALTHY = PluginStatus.UNKNOWN, PluginStatus.HEALTHY, PluginStatus.UNHEALTHY

# Checks every 0.2 s, each with a 0.2 s deadline, 3 failures / 2 successes to flip.
FAST = {
    "health_interval": 0.2,
    "health_timeout": 0.2,
    "unhealthy_threshold": 3,
    "healthy_threshold": 2,
    "reap_interval": 0.05,
}


async def test_healthy_plugin_is_healthy_right_after_registering(tmp_path):
    async with (
        running_registry(tmp_path, health_interval=60) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
    ):
        plugin_id = (
            await client.register(plugin_info("quick"), plugin.address, no_lease=True)
        ).plugin_id

        # The next periodic check is a minute away: only the check made at
        # registration can have done this, folded into the registration itself:
        # HEALTHY as soon as Register is answered.
        found = await client.get_plugin(plugin_id)
        assert PluginStatus(found.status) is HEALTHY

        assert plugin.health_calls == 1
        assert found.HasField("last_check_at")
        assert found.last_error == ""
        assert await resolved_ids(client, "quick") == {plugin_id}


async def test_unknown_plugin_is_not_resolved(tmp_path):
    async with (
        running_registry(tmp_path, health_interval=60) as registry,
        RegistryClient(registry.address) as client,
    ):
        down = FakePlugin()
        await down.start()
        await down.stop()  # its port, with nothing listening on it
        plugin_id = (await client.register(plugin_info("down"), down.address)).plugin_id

        async def checked() -> pb.RegisteredPlugin | None:
            plugin = await client.get_plugin(plugin_id)
            return plugin if plugin.HasField("last_check_at") else None

        # One failed check is not enough to be UNHEALTHY: it stays UNKNOWN.
        plugin = await eventually(checked, what="the first check")
        assert plugin is not None
        assert PluginStatus(plugin.status) is UNKNOWN
        assert plugin.last_error.startswith("UNAVAILABLE")
        assert await resolved_ids(client, "down") == set()


async def test_resolve_returns_a_plugin_only_while_it_is_healthy(tmp_path):
    """Every Resolve answer agrees with the plugin's status at the revision it reports."""
    async with (
        running_registry(tmp_path, **FAST) as registry,
        RegistryClient(registry.address) as client,
        recording(client) as watch,
    ):
        plugin = FakePlugin(sources=["flow"])
        await plugin.start()
        await plugin.stop()  # registered while down: UNKNOWN, then UNHEALTHY
        answers: list[tuple[int, set[str]]] = []

        async def resolve() -> set[str]:
            response = await client.resolve(source="flow")
            ids = {e.plugin_id for e in response.endpoints}
            answers.append((response.revision, ids))
            return ids

        try:
            plugin_id = (await client.register(plugin_info("flow"), plugin.address)).plugin_id
            await resolve()
            await watch.wait_for(lambda ms: UNHEALTHY in steps(ms, plugin_id), what="UNHEALTHY")
            await resolve()
            await plugin.start()  # same port: it answers from now on
            await eventually(resolve, what="the plugin in Resolve")
            await watch.wait_revision(answers[-1][0])
        finally:
            await plugin.stop()

    changes = history(watch.messages, plugin_id)
    assert [status for _, status in changes] == [UNKNOWN, UNHEALTHY, HEALTHY]
    seen = set()
    for revision, ids in answers:
        status = [s for r, s in changes if r <= revision][-1]
        assert (plugin_id in ids) == (status is HEALTHY), (revision, status, ids)
        seen.add(status)
    assert seen >= {UNHEALTHY, HEALTHY}


async def test_plugin_answering_unhealthy_becomes_unhealthy_with_its_message(tmp_path):
    async with (
        running_registry(tmp_path, **FAST) as registry,
        FakePlugin(healthy=False, health_message="disk full") as plugin,
        RegistryClient(registry.address) as client,
        recording(client) as watch,
    ):
        plugin_id = (await client.register(plugin_info("sick"), plugin.address)).plugin_id

        found = await wait_status(client, plugin_id, UNHEALTHY)

        assert found.last_error == "disk full"
        assert plugin.health_calls >= 3  # the threshold: never on the first failures
        assert await resolved_ids(client, "sick") == set()
        await watch.wait_revision(found.revision)
        assert steps(watch.messages, plugin_id) == [UNKNOWN, UNHEALTHY]


async def test_killed_plugin_process_is_unhealthy_then_removed(tmp_path):
    """SIGKILL breaks the cached channel: the plugin is re-checked at once, not in 60 s."""
    settings = {"health_interval": 60, "deregister_after": 0.5, "reap_interval": 0.05}
    async with (
        running_registry(tmp_path, **settings) as registry,
        RegistryClient(registry.address) as client,
        recording(client) as watch,
        plugin_process("doomed", "doomed") as process,
    ):
        plugin_id = (
            await client.register(plugin_info("doomed"), process.address, no_lease=True)
        ).plugin_id
        await watch.wait_for(lambda ms: HEALTHY in steps(ms, plugin_id), what="HEALTHY")

        process.signal(signal.SIGKILL)

        await watch.wait_for(lambda ms: None in steps(ms, plugin_id), what="the removal")
        assert steps(watch.messages, plugin_id) == [HEALTHY, UNHEALTHY, None]
        unhealthy = next(p for m in watch.deltas for p in m.upserted if p.status == int(UNHEALTHY))
        assert unhealthy.last_error.startswith("UNAVAILABLE")
        assert await client.list_plugins() == []


@pytest.mark.parametrize("hang", ["sigstop", "health_delay"])
async def test_hanging_plugin_becomes_unhealthy_after_threshold_timeouts(tmp_path, hang):
    """A plugin that keeps its connection open but never answers times out."""
    async with (
        running_registry(tmp_path, **FAST) as registry,
        RegistryClient(registry.address) as client,
        recording(client) as watch,
    ):
        if hang == "sigstop":
            async with plugin_process("frozen", "frozen") as process:
                plugin_id = (
                    await client.register(plugin_info("frozen"), process.address)
                ).plugin_id
                await wait_status(client, plugin_id, HEALTHY)
                process.signal(signal.SIGSTOP)  # continued and killed on exit
                found = await wait_status(client, plugin_id, UNHEALTHY)
        else:
            async with FakePlugin() as plugin:
                plugin_id = (await client.register(plugin_info("frozen"), plugin.address)).plugin_id
                await wait_status(client, plugin_id, HEALTHY)
                plugin.health_delay = 30.0  # far over the 0.2 s deadline
                calls = plugin.health_calls
                found = await wait_status(client, plugin_id, UNHEALTHY)
                assert plugin.health_calls - calls >= 3

        assert "DEADLINE_EXCEEDED" in found.last_error
        await watch.wait_revision(found.revision)
        assert steps(watch.messages, plugin_id) == [HEALTHY, UNHEALTHY]


class FlappingPlugin(FakePlugin):
    """Answers unhealthy, healthy, unhealthy, … : one flip per Health call."""

    @property
    def healthy(self) -> bool:
        # Read by the servicer right after it counted the call.
        return self.health_calls % 2 == 0

    @healthy.setter
    def healthy(self, value: bool) -> None:
        pass


async def test_flapping_plugin_does_not_flip_status_on_every_check(tmp_path):
    async with (
        running_registry(tmp_path, **{**FAST, "health_interval": 0.1}) as registry,
        FlappingPlugin() as plugin,
        RegistryClient(registry.address) as client,
        recording(client) as watch,
    ):
        plugin_id = (await client.register(plugin_info("flappy"), plugin.address)).plugin_id

        # The 13th call has begun, so the 12th answer has been recorded.
        async def thirteen_calls() -> bool:
            return plugin.health_calls >= 13

        await eventually(thirteen_calls, what="13 health checks")
        marker = await client.register(plugin_info("marker"), "127.0.0.1:9", no_lease=True)
        marker_revision = (await client.get_plugin(marker.plugin_id)).revision
        await watch.wait_revision(marker_revision)

        # Failure (the first check, folded into the registration: UNKNOWN), success,
        # failure, … never 3 failures in a row: one change only, the first success
        # taking it from UNKNOWN to HEALTHY.
        assert steps(watch.messages, plugin_id) == [UNKNOWN, HEALTHY]
        assert await status_of(client, plugin_id) is HEALTHY


async def test_unhealthy_plugin_recovers_after_healthy_threshold_successes(tmp_path):
    async with (
        running_registry(tmp_path, **FAST) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
        recording(client) as watch,
    ):
        plugin_id = (await client.register(plugin_info("phoenix"), plugin.address)).plugin_id
        await wait_status(client, plugin_id, HEALTHY)

        plugin.healthy, plugin.health_message, failing_from = False, "down", plugin.health_calls
        await wait_status(client, plugin_id, UNHEALTHY)
        assert plugin.health_calls - failing_from >= 3
        assert await resolved_ids(client, "phoenix") == set()

        plugin.healthy, passing_from = True, plugin.health_calls
        found = await wait_status(client, plugin_id, HEALTHY)
        assert plugin.health_calls - passing_from >= 2
        assert found.last_error == ""
        assert await resolved_ids(client, "phoenix") == {plugin_id}
        await watch.wait_revision(found.revision)
        assert steps(watch.messages, plugin_id) == [HEALTHY, UNHEALTHY, HEALTHY]
