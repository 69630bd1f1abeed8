"""Leases: expiry without heartbeats, keep-alive, the grace after a restart, no-lease plugins.

The default lease is the smallest allowed (1 s, SPEC §7) and the reaper ticks every
50 ms; tests that need time between their steps ask for 3 s leases. How long a test
runs is set by control plugins that are left to expire, never by a fixed sleep: when
a control plugin has expired, the reaper has judged every other lease of the same
age too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from registry import PluginStatus, RegistryClient
from registry.storage.store import SqlStore
from registry.storage.tables import LeaseRow, PluginRow
from registry.testing import FakePlugin, running_registry
from registry.wire import pb

from .conftest import plugin_info, recording, resolved_ids, status_of, steps, wait_status

UNKNOWN, HEALTHY, EXPIRED = PluginStatus.UNKNOWN, PluginStatus.HEALTHY, PluginStatus.EXPIRED
TTL = 1  # the smallest lease the registry grants, and the default here
SLOW_TTL = 3  # for plugins that must outlive a test's steps without heartbeats
BEAT = 0.1  # how often a kept plugin heartbeats: a tenth of the smallest lease

# Health checks only at registration (the plugins stay HEALTHY), nothing ever removed.
LEASES = {
    "lease_ttl": TTL,
    "reap_interval": 0.05,
    "health_interval": 60,
    "deregister_after": 0,
}


def expired(plugin_id: str) -> Callable[[list[pb.WatchResponse]], bool]:
    return lambda ms: EXPIRED in steps(ms, plugin_id)


@contextlib.asynccontextmanager
async def heartbeating(
    client: RegistryClient, plugin_id: str, every: float = BEAT
) -> AsyncIterator[list[bool]]:
    """Heartbeat ``plugin_id`` every ``every`` seconds (a plugin's timer); yields the acks."""
    acks: list[bool] = []

    async def beat() -> None:
        while True:
            acks.append(await client.heartbeat(plugin_id))
            await asyncio.sleep(every)  # the heartbeat period, not synchronisation

    task = asyncio.create_task(beat())
    try:
        yield acks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_lease_without_heartbeats_expires_and_the_plugin_can_register_again(tmp_path):
    async with (
        running_registry(tmp_path, **LEASES) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
        recording(client) as watch,
    ):
        leased = await client.register(plugin_info("leased"), plugin.address)
        unleased = await client.register(plugin_info("unleased"), plugin.address, no_lease=True)
        assert (leased.lease_ttl_seconds, leased.heartbeat_interval_seconds) == (TTL, 1)
        assert (unleased.lease_ttl_seconds, unleased.heartbeat_interval_seconds) == (0, 0)
        old_id = leased.plugin_id
        # Kept alive until it is HEALTHY (its lease is 1 s); from then on, silence.
        async with heartbeating(client, old_id):
            await wait_status(client, old_id, HEALTHY)
        await wait_status(client, unleased.plugin_id, HEALTHY)

        await watch.wait_for(expired(old_id), what="the lease to expire")

        gone = await client.get_plugin(old_id)
        assert PluginStatus(gone.status) is EXPIRED
        assert "lease expired" in gone.last_error
        assert await resolved_ids(client, "leased") == set()
        assert await client.heartbeat(old_id) is False
        # Registered at the same moment, judged by the same sweep: no lease, no expiry.
        assert await status_of(client, unleased.plugin_id) is HEALTHY
        assert await resolved_ids(client, "unleased") == {unleased.plugin_id}

        again = await client.register(plugin_info("leased"), plugin.address)
        new_id = again.plugin_id
        assert new_id != old_id
        # A 1 s lease: kept alive from the start, as a plugin would.
        async with heartbeating(client, new_id) as acks:
            replaced = await watch.wait_for(
                lambda ms: new_id in {p.plugin_id for m in ms for p in m.upserted}, what="new id"
            )
            change = next(m for m in replaced if any(p.plugin_id == new_id for p in m.upserted))
            assert list(change.removed_plugin_ids) == [old_id]  # replaced in one change
            await wait_status(client, new_id, HEALTHY)
            assert {p.plugin_id for p in await client.list_plugins()} == {
                new_id,
                unleased.plugin_id,
            }
            assert await resolved_ids(client, "leased") == {new_id}
            assert await client.heartbeat(new_id) is True
        assert acks
        assert all(acks)
        assert EXPIRED not in steps(watch.messages, unleased.plugin_id)
        assert EXPIRED not in steps(watch.messages, new_id)


async def test_heartbeats_keep_a_lease_alive_over_several_ttls(tmp_path):
    async with (
        running_registry(tmp_path, **LEASES) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
        recording(client) as watch,
    ):
        kept = (await client.register(plugin_info("kept"), plugin.address)).plugin_id
        async with heartbeating(client, kept) as acks:
            await wait_status(client, kept, HEALTHY)
            # Control leases one after the other, no heartbeats: when the last has
            # expired, the kept 1 s lease has lived through three TTLs of sweeps.
            for control in ("first-control", "second-control", "third-control"):
                control_id = (await client.register(plugin_info(control), "127.0.0.1:9")).plugin_id
                await watch.wait_for(expired(control_id), what=f"{control} to expire")
            assert acks
            assert all(acks)

        # Registered HEALTHY (its first check folded in); heartbeats pushed nothing.
        assert steps(watch.messages, kept) == [HEALTHY]
        assert await status_of(client, kept) is HEALTHY
        assert await resolved_ids(client, "kept") == {kept}


async def test_restart_gives_every_lease_one_ttl_of_grace(tmp_path):
    """A restart within the TTL expires nobody; a silent plugin expires only after the grace.

    The silent plugin's last heartbeat is moved an hour back in the database while
    the registry is down, as if the outage had lasted that long: without the grace
    it would expire at the first sweep after the restart.
    """
    async with FakePlugin() as plugin:
        async with (
            running_registry(tmp_path, **LEASES) as first,
            RegistryClient(first.address) as client,
        ):
            alive = (
                await client.register(
                    plugin_info("alive"), plugin.address, lease_ttl_seconds=SLOW_TTL
                )
            ).plugin_id
            silent = (
                await client.register(
                    plugin_info("silent"), plugin.address, lease_ttl_seconds=SLOW_TTL
                )
            ).plugin_id
            await wait_status(client, alive, HEALTHY)
            await wait_status(client, silent, HEALTHY)
            assert await client.heartbeat(alive)

        store = SqlStore.open(f"sqlite:///{tmp_path / 'registry.db'}")
        try:
            async with store.engine.begin() as conn:
                an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
                await conn.execute(
                    update(PluginRow)
                    .where(PluginRow.plugin_id == silent)
                    .values(registered_at=an_hour_ago)
                )
                await conn.execute(
                    update(LeaseRow)
                    .where(LeaseRow.plugin_id == silent)
                    .values(last_heartbeat_at=an_hour_ago)
                )
        finally:
            await store.close()

        async with (
            running_registry(tmp_path, **LEASES) as second,
            RegistryClient(second.address) as client,
            heartbeating(client, alive) as acks,
            recording(client) as watch,
        ):
            await watch.wait_for(expired(silent), what="the silent lease to expire")
            # The registry's own record of the decision, not a duration the test measured.
            expired_plugin = second.state.view.get(silent)
            assert expired_plugin is not None
            assert expired_plugin.status_since is not None
            grace_used = expired_plugin.status_since - second.state.started_at

            # The sweep that expired the silent plugin ran after the grace: from then
            # on only the heartbeats sent to the new registry kept this one alive.
            assert await client.heartbeat(alive) is True
            assert all(acks)
            assert await status_of(client, alive) is HEALTHY
            assert EXPIRED not in steps(watch.messages, alive)

        # The grace is one full TTL from the restart, whatever the last heartbeat said.
        assert grace_used.total_seconds() >= SLOW_TTL


async def test_heartbeats_that_change_nothing_push_nothing(tmp_path):
    async with (
        running_registry(tmp_path, **LEASES, watch_progress_interval=0.2) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
    ):
        plugin_id = (
            await client.register(plugin_info("steady"), plugin.address, lease_ttl_seconds=SLOW_TTL)
        ).plugin_id
        found = await wait_status(client, plugin_id, HEALTHY)
        async with recording(client) as watch:
            for _ in range(20):
                assert await client.heartbeat(plugin_id)
            # The stream is idle: its next message is a progress message at the same
            # revision, so no heartbeat produced a change.
            messages = await watch.wait_for(lambda ms: len(ms) >= 2, what="a progress message")
            assert messages[0].snapshot
            assert messages[0].revision == found.revision
            progress = messages[1]
            assert not progress.snapshot
            assert not progress.upserted
            assert not progress.removed_plugin_ids
            assert progress.revision == found.revision
        after = await client.get_plugin(plugin_id)
        assert after.revision == found.revision
        assert after.last_heartbeat_at.ToDatetime() > found.last_heartbeat_at.ToDatetime()
