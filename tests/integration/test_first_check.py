"""One watch message per registration: the first health check folded in (issue 13).

Register, on the leader and past every cheap refusal, makes the plugin's first check
through the health checker (vetted address, cached channel, fast-lane slot) and stores
the plugin with its result: watchers see it once, already HEALTHY (or UNKNOWN/UNHEALTHY
with its error), never UNKNOWN and then HEALTHY a few ms later. A plugin that does not
answer within ``first_check_wait`` is stored UNKNOWN; the call in flight gives it its
first result when it ends, and it is checked as before from then on.

Real registries on 127.0.0.1:0 over SQLite under tmp_path, real plugin servers
(FakePlugin); every wait is on a condition with a deadline. ``first_check_wait`` is
generous wherever the plugin answers, so a slow machine cannot change what is seen.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from watch_helpers import WatchRecorder

from registry import poller
from registry.client import RegistryClient
from registry.errors import AlreadyExists
from registry.testing import FakePlugin, eventually, running_registry
from registry.wire import pb

DEADLINE = 15.0  # a bound on a failure, never a measure
DEAD = "127.0.0.1:9"  # nothing listens there: connections are refused at once
PROMPT = {"first_check_wait": 5.0, "health_interval": 60}
UNKNOWN, HEALTHY = pb.PLUGIN_STATUS_UNKNOWN, pb.PLUGIN_STATUS_HEALTHY
UNHEALTHY, DRAINING = pb.PLUGIN_STATUS_UNHEALTHY, pb.PLUGIN_STATUS_DRAINING


def info(name: str, source: str) -> pb.PluginInfo:
    return pb.PluginInfo(name=name, version="1.0.0", type=pb.PLUGIN_TYPE_INGESTOR, sources=[source])


def holding(watch: WatchRecorder, plugin_id: str) -> list[pb.RegisteredPlugin]:
    """Every state of ``plugin_id`` that a change message (not a snapshot) carried."""
    return [
        p for m in watch.messages if not m.snapshot for p in m.upserted if p.plugin_id == plugin_id
    ]


async def marked(client: RegistryClient, watch: WatchRecorder) -> None:
    """Register a marker and wait for its message: every earlier change has arrived."""
    marker = await client.register(info("marker", "marker"), DEAD, no_lease=True)
    revision = (await client.get_plugin(marker.plugin_id)).revision
    await watch.wait(lambda: any(m.revision >= revision for m in watch.messages))


async def test_a_registration_is_one_watch_message_already_healthy(tmp_path: Path) -> None:
    async with (
        running_registry(tmp_path, **PROMPT) as registry,
        FakePlugin(name="lines", sources=["lines"]) as plugin,
        RegistryClient(registry.address) as client,
        WatchRecorder(client, within=DEADLINE) as watch,
    ):
        registered = await client.register(plugin.info(), plugin.address, lease_ttl_seconds=30)
        # Answered once stored with its check: HEALTHY, routable, at once.
        stored = await client.get_plugin(registered.plugin_id)
        assert stored.status == HEALTHY
        assert stored.HasField("last_check_at")
        assert stored.last_error == ""
        resolved = await client.resolve(source="lines")
        assert [e.plugin_id for e in resolved.endpoints] == [registered.plugin_id]

        await marked(client, watch)

        seen = holding(watch, registered.plugin_id)
        assert [p.status for p in seen] == [HEALTHY]
        assert seen[0].revision == stored.revision
        assert plugin.health_calls == 1  # the next check is an interval away


async def test_heartbeat_less_registration_is_one_message_too(tmp_path: Path) -> None:
    async with (
        running_registry(tmp_path, **PROMPT) as registry,
        FakePlugin(name="static", sources=["static"]) as plugin,
        RegistryClient(registry.address) as client,
        WatchRecorder(client, within=DEADLINE) as watch,
    ):
        registered = await client.register(plugin.info(), plugin.address, no_lease=True)
        await marked(client, watch)
        assert [p.status for p in holding(watch, registered.plugin_id)] == [HEALTHY]


@pytest.mark.parametrize(
    ("threshold", "status"), [(1, UNHEALTHY), (3, UNKNOWN)], ids=["threshold-1", "threshold-3"]
)
async def test_a_plugin_answering_not_serving_is_one_message_with_its_error(
    tmp_path: Path, threshold: int, status: int
) -> None:
    """UNHEALTHY at once when one failure is the threshold; else (hysteresis, SPEC §2)
    UNKNOWN with the check's error, in that one message all the same."""
    async with (
        running_registry(tmp_path, unhealthy_threshold=threshold, **PROMPT) as registry,
        FakePlugin(
            name="sick", sources=["sick"], healthy=False, health_message="disk full"
        ) as sick,
        RegistryClient(registry.address) as client,
        WatchRecorder(client, within=DEADLINE) as watch,
    ):
        registered = await client.register(sick.info(), sick.address)
        await marked(client, watch)

        seen = holding(watch, registered.plugin_id)
        assert [(p.status, p.last_error) for p in seen] == [(status, "disk full")]
        assert seen[0].HasField("last_check_at")
        assert sick.health_calls == 1


async def test_a_hanging_plugin_is_registered_unknown_and_checked_as_before(
    tmp_path: Path,
) -> None:
    """Register does not wait past ``first_check_wait``; the call in flight gives the
    plugin its first result (no second call for it); later checks go on as ever."""
    settings = {"first_check_wait": 0.2, "health_timeout": 1.0, "health_interval": 60}
    async with (
        running_registry(tmp_path, **settings) as registry,
        FakePlugin(name="frozen", sources=["frozen"]) as plugin,
        RegistryClient(registry.address) as client,
        WatchRecorder(client, within=DEADLINE) as watch,
    ):
        plugin.health_delay = 30.0  # far over the check's deadline
        registered = await client.register(plugin.info(), plugin.address)
        plugin_id = registered.plugin_id
        stored = await client.get_plugin(plugin_id)
        assert stored.status == UNKNOWN
        assert not stored.HasField("last_check_at")  # its check is still in flight

        async def timed_out() -> pb.RegisteredPlugin | None:
            found = await client.get_plugin(plugin_id)
            return found if "DEADLINE_EXCEEDED" in found.last_error else None

        await eventually(timed_out, within=DEADLINE, what="the first check's timeout")
        assert plugin.health_calls == 1  # that one call, recorded when it ended

        # Later checks as before: undrained after a failed check, it is checked at once.
        plugin.health_delay = 0.0
        await client.drain(plugin_id=plugin_id)
        await client.drain(plugin_id=plugin_id, undrain=True)

        await watch.wait(lambda: HEALTHY in [p.status for p in holding(watch, plugin_id)])
        # Its first result (one failure of three) changed no status: no message of its own.
        assert [p.status for p in holding(watch, plugin_id)] == [
            UNKNOWN,
            DRAINING,
            UNKNOWN,
            HEALTHY,
        ]


async def test_registrations_at_one_address_share_one_first_check(tmp_path: Path) -> None:
    count = 20
    async with (
        running_registry(tmp_path, **PROMPT) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
    ):
        plugin.health_delay = 0.5  # a call that the others come to while it is in flight
        registered = await asyncio.gather(
            *(client.register(info(f"many-{i}", f"s-{i}"), plugin.address) for i in range(count))
        )
        stored = [await client.get_plugin(r.plugin_id) for r in registered]
        assert all(p.status == HEALTHY for p in stored)
        assert plugin.health_calls < count


@pytest.mark.parametrize(("fresh", "calls"), [(3600.0, 1), (0.0, 5)])
async def test_a_recent_pass_at_an_address_stands_for_the_next_registrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: float, calls: int
) -> None:
    """One after another: within FIRST_CHECK_FRESH of a pass, no new Health call."""
    monkeypatch.setattr(poller, "FIRST_CHECK_FRESH", fresh)
    async with (
        running_registry(tmp_path, **PROMPT) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
    ):
        for i in range(5):
            registered = await client.register(info(f"seq-{i}", f"q-{i}"), plugin.address)
            assert (await client.get_plugin(registered.plugin_id)).status == HEALTHY
        assert plugin.health_calls == calls


async def test_a_refused_registration_makes_no_check(tmp_path: Path) -> None:
    """Every cheap refusal comes before the dial: a refused caller cannot make it."""
    async with (
        running_registry(tmp_path, **PROMPT) as registry,
        FakePlugin(name="owner", sources=["taken"]) as owner,
        FakePlugin(name="other", sources=["taken"]) as other,
        RegistryClient(registry.address) as client,
    ):
        await client.register(owner.info(), owner.address)
        with pytest.raises(AlreadyExists):
            await client.register(other.info(), other.address)
        assert other.health_calls == 0


async def test_without_the_wait_the_poller_makes_the_first_check(tmp_path: Path) -> None:
    """``first_check_wait=0`` (off): stored UNKNOWN, then HEALTHY by the poller."""
    async with (
        running_registry(tmp_path, first_check_wait=0, health_interval=60) as registry,
        FakePlugin(name="lines", sources=["lines"]) as plugin,
        RegistryClient(registry.address) as client,
        WatchRecorder(client, within=DEADLINE) as watch,
    ):
        registered = await client.register(plugin.info(), plugin.address)
        await watch.wait(
            lambda: HEALTHY in [p.status for p in holding(watch, registered.plugin_id)]
        )
        assert [p.status for p in holding(watch, registered.plugin_id)] == [UNKNOWN, HEALTHY]


async def test_a_dead_address_is_refused_at_once_and_stays_unknown(tmp_path: Path) -> None:
    """A refused connection answers the first check at once: one message, UNKNOWN with
    the error (one failure of three), checked again after the interval."""
    async with (
        running_registry(tmp_path, **PROMPT) as registry,
        RegistryClient(registry.address) as client,
    ):
        registered = await client.register(info("dead", "dead"), DEAD)
        stored = await client.get_plugin(registered.plugin_id)
        assert stored.status == UNKNOWN
        assert stored.last_error.startswith(grpc.StatusCode.UNAVAILABLE.name)
