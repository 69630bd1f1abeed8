"""The lease reaper's deadline heap, on a fake clock over a real SQLite store.

A sweep expires exactly the leases that lapsed, reschedules the renewed ones,
removes what was dead past ``deregister_after``, and pops only the entries that
came due (its ``examined`` counter), whatever the catalogue holds. A wake that
comes late by either clock gives every lease one TTL of grace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from registry.migrate import upgrade
from registry.model import PluginStatus, PluginType, Registration
from registry.reaper import Deadlines, LeaseReaper
from registry.state import RegistryState
from registry.storage.store import SqlStore
from registry.testing import eventually

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
EXPIRED, HEALTHY, UNHEALTHY = PluginStatus.EXPIRED, PluginStatus.HEALTHY, PluginStatus.UNHEALTHY


class Clocks:
    """A wall clock and a monotonic clock that move only when told."""

    def __init__(self) -> None:
        self.now = T0
        self.mono = 1000.0

    def wall(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float, *, monotonic: bool = True) -> None:
        self.now += timedelta(seconds=seconds)
        if monotonic:
            self.mono += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
async def state(tmp_path: Path, clocks: Clocks) -> AsyncIterator[RegistryState]:
    store = SqlStore.open(f"sqlite:///{tmp_path / 'registry.db'}")
    await upgrade(store.engine)
    registry = RegistryState(store, clock=clocks.wall)
    await registry.start()
    try:
        yield registry
    finally:
        await registry.stop()
        await store.close()


def leased(name: str, ttl: int) -> Registration:
    return Registration(
        name=name,
        type=PluginType.INGESTOR,
        address="127.0.0.1:9",
        sources=(name,),
        lease_ttl_seconds=ttl,
    )


async def register(state: RegistryState, count: int, ttl: int, prefix: str) -> list[str]:
    plugins = await asyncio.gather(
        *(state.register(leased(f"{prefix}{i}", ttl)) for i in range(count))
    )
    return [p.plugin_id for p in plugins]


def status(state: RegistryState, plugin_id: str) -> PluginStatus | None:
    plugin = state.catalog.get(plugin_id)
    return plugin.status if plugin is not None else None


def reaper_of(state: RegistryState, clocks: Clocks, deregister_after: float = 0) -> LeaseReaper:
    return LeaseReaper(
        state, deregister_after=deregister_after, tick=0.5, monotonic=clocks.monotonic
    )


async def set_status(state: RegistryState, plugin_id: str, new: PluginStatus) -> None:
    plugin = state.catalog.get(plugin_id)
    assert plugin is not None
    await state.update([dataclasses.replace(plugin, status=new)])


# -- expiry ------------------------------------------------------------------------


async def test_a_sweep_expires_exactly_the_due_leases_and_pops_only_them(state, clocks):
    reaper = reaper_of(state, clocks)
    long = await register(state, 500, 60, "long")
    short = await register(state, 5, 2, "short")
    await reaper.sweep()  # nothing due yet: nothing popped
    assert reaper.examined == 0
    assert reaper.scheduled == 505

    clocks.advance(2.5)
    await reaper.sweep()
    assert [status(state, i) for i in short] == [EXPIRED] * 5
    assert all(status(state, i) is PluginStatus.UNKNOWN for i in long)
    expired = state.catalog.get(short[0])
    assert expired is not None
    assert expired.last_error == "lease expired: no heartbeat for 2s"
    assert reaper.examined == 5  # the 500 others were not looked at
    assert reaper.scheduled == 500

    before = reaper.examined
    for _ in range(20):
        clocks.advance(0.5)
        await reaper.sweep()
    assert reaper.examined == before  # sweeps with nothing due cost nothing


async def test_a_lease_is_judged_strictly_after_its_ttl(state, clocks):
    reaper = reaper_of(state, clocks)
    (plugin_id,) = await register(state, 1, 1, "one-second")
    clocks.advance(1.0)
    await reaper.sweep()
    assert status(state, plugin_id) is PluginStatus.UNKNOWN  # exactly one TTL: not over it
    clocks.advance(0.001)
    await reaper.sweep()
    assert status(state, plugin_id) is EXPIRED


async def test_a_renewed_lease_is_rescheduled_not_expired(state, clocks):
    reaper = reaper_of(state, clocks)
    (kept,) = await register(state, 1, 2, "kept")
    scheduled = reaper.scheduled
    for _ in range(100):
        clocks.advance(0.015)
        assert state.heartbeat(kept) is not None
    assert reaper.scheduled == scheduled  # heartbeats schedule nothing

    clocks.advance(1.0)  # 2.5 s after registering, 1 s after the last heartbeat
    await reaper.sweep()
    assert status(state, kept) is PluginStatus.UNKNOWN
    assert reaper.examined == 1  # its entry came due, was checked and scheduled again
    assert reaper.scheduled == 1

    clocks.advance(1.1)  # now 2.1 s after the last heartbeat
    await reaper.sweep()
    assert status(state, kept) is EXPIRED


async def test_a_removed_plugin_is_forgotten(state, clocks):
    reaper = reaper_of(state, clocks)
    gone, stays = await register(state, 2, 2, "p")
    await state.remove([gone])
    assert reaper.scheduled == 1
    clocks.advance(3)
    await reaper.sweep()
    assert state.catalog.get(gone) is None
    assert status(state, stays) is EXPIRED


async def test_plugins_without_a_lease_are_never_scheduled(state, clocks):
    reaper = reaper_of(state, clocks, deregister_after=0)
    await state.register(leased("nolease", 0))
    await reaper.sweep()
    assert reaper.scheduled == 0


# -- deregister_after ----------------------------------------------------------------


async def test_dead_plugins_are_removed_after_deregister_after(state, clocks):
    reaper = reaper_of(state, clocks, deregister_after=10)
    expiring, unhealthy, recovers, healthy = await register(state, 4, 60, "d")
    await set_status(state, unhealthy, UNHEALTHY)
    await set_status(state, recovers, UNHEALTHY)
    await set_status(state, healthy, HEALTHY)
    clocks.advance(5)
    await set_status(state, recovers, HEALTHY)  # back before its deadline
    clocks.advance(5.5)  # unhealthy for 10.5 s
    await reaper.sweep()
    assert state.catalog.get(unhealthy) is None
    assert status(state, recovers) is HEALTHY
    assert status(state, healthy) is HEALTHY

    clocks.advance(50)  # leases of 60 s lapse: EXPIRED, then removed 10 s later
    await reaper.sweep()
    assert status(state, expiring) is EXPIRED
    clocks.advance(9)
    await reaper.sweep()
    assert status(state, expiring) is EXPIRED
    clocks.advance(1.5)
    await reaper.sweep()
    assert state.catalog.get(expiring) is None


# -- the next wake -----------------------------------------------------------------


async def test_the_reaper_wakes_for_the_next_deadline_within_a_tick(state, clocks):
    reaper = LeaseReaper(state, deregister_after=0, tick=2.0, monotonic=clocks.monotonic)
    assert reaper.next_delay() == 2.0  # nothing held: a tick
    await register(state, 1, 1, "soon")
    assert 1.0 < reaper.next_delay() <= 1.01  # just past the 1 s lease, not a tick later
    clocks.advance(0.75)
    assert 0.25 < reaper.next_delay() <= 0.26
    clocks.advance(0.2)
    assert reaper.next_delay() == pytest.approx(0.2)  # at least a tenth of a tick


# -- pauses ----------------------------------------------------------------------------


@pytest.mark.parametrize("monotonic", [True, False], ids=["stopped", "wall-clock-jump"])
async def test_a_late_wake_gives_every_lease_one_ttl_of_grace(state, clocks, caplog, monotonic):
    reaper = reaper_of(state, clocks)
    ids = await register(state, 50, 6, "paused")
    planned = clocks.mono + 0.5, clocks.now + timedelta(seconds=0.5)
    # The process is stopped for 10 s (or the machine slept: only the wall clock moved).
    clocks.advance(10.5, monotonic=monotonic)
    with caplog.at_level(logging.WARNING, logger="registry.reaper"):
        late = reaper.check_pause(*planned)
    assert late == pytest.approx(10.0)
    assert state.grace_from == clocks.now
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "paused or starved for 10.0s" in warnings[0].getMessage()

    await reaper.sweep()
    assert all(status(state, i) is PluginStatus.UNKNOWN for i in ids)  # all had lapsed
    clocks.advance(5.9)
    await reaper.sweep()
    assert all(status(state, i) is PluginStatus.UNKNOWN for i in ids)
    clocks.advance(0.2)  # one TTL after the resume: the silent ones go
    await reaper.sweep()
    assert all(status(state, i) is EXPIRED for i in ids)


async def test_an_on_time_wake_grants_nothing(state, clocks, caplog):
    reaper = reaper_of(state, clocks)
    grace = state.grace_from
    planned = clocks.mono + 0.5, clocks.now + timedelta(seconds=0.5)
    clocks.advance(0.5 + reaper.pause_threshold * 0.9)  # late, but under the threshold
    with caplog.at_level(logging.WARNING, logger="registry.reaper"):
        reaper.check_pause(*planned)
    assert state.grace_from == grace
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


async def test_the_running_reaper_expires_a_short_lease(state, clocks):
    """The real loop (a real sleep of at most a tick), on the fake wall clock."""
    reaper = LeaseReaper(state, deregister_after=0, tick=0.02, monotonic=clocks.monotonic)
    (plugin_id,) = await register(state, 1, 1, "loop")
    clocks.advance(1.5)  # before it starts: moving clocks under a sleeping reaper is a pause
    reaper.start()
    try:
        await eventually(lambda: status(state, plugin_id) is EXPIRED, what="the lease to lapse")
    finally:
        await reaper.stop()


# -- the heap itself -----------------------------------------------------------------


def test_deadlines_keep_the_earliest_and_compact_stale_entries():
    deadlines = Deadlines()
    deadlines.schedule("a", T0 + timedelta(seconds=5))
    deadlines.schedule("a", T0 + timedelta(seconds=9))  # later: the earlier entry stays
    deadlines.schedule("b", T0 + timedelta(seconds=7))
    deadlines.schedule("b", T0 + timedelta(seconds=3))  # earlier: replaces
    assert deadlines.next() == T0 + timedelta(seconds=3)
    assert list(deadlines.due(T0 + timedelta(seconds=6))) == ["b", "a"]
    assert len(deadlines) == 0
    for i in range(1000):
        deadlines.schedule(f"x{i}", T0 + timedelta(seconds=i))
    for i in range(990):
        deadlines.drop(f"x{i}")
    assert len(deadlines) == 10
    assert len(deadlines._heap) <= 2 * 10 + 64  # dropped entries do not pile up
    assert deadlines.next() == T0 + timedelta(seconds=990)
    assert list(deadlines.due(T0)) == []
    assert list(deadlines.due(T0 + timedelta(seconds=2000))) == [f"x{i}" for i in range(990, 1000)]
