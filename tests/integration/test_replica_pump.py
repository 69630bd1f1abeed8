"""The change pump on a real PostgreSQL database: a follower's catalogue fed from the
``changes`` table in revision order, resynchronised whole on a gap, and caught up again
after its connection was killed (SPEC §8).

A leader here is a fenced :class:`SqlStore` writing batches as the journal makes them;
the follower is a :class:`RegistryState` started with ``leading=False`` on a store of
its own, fed by a :class:`ChangePump`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from registry.migrate import upgrade
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.replica.election import Election, LeaderLease, new_holder_id
from registry.replica.pump import APPLICATION_NAME, ChangePump, asyncpg_dsn
from registry.state import RegistryState
from registry.storage.store import Batch, SqlStore
from registry.testing import eventually
from registry.ulid import new_ulid

pytestmark = pytest.mark.postgres

DEADLINE = 10.0  # a bound on a wait, never a pause
T0 = datetime(2026, 12, 2, 3, 4, 5, tzinfo=UTC)
_PUMPS = (
    "SELECT pid FROM pg_stat_activity "
    f"WHERE application_name = '{APPLICATION_NAME}' AND datname = current_database()"
)


async def _nothing(*_: object) -> None:
    return None


@dataclass
class Leader:
    """Writes what a leader's journal would: one fenced batch per revision."""

    store: SqlStore
    revision: int = 0
    plugins: dict[str, Plugin] = field(default_factory=dict)

    async def register(self, name: str) -> Plugin:
        self.revision += 1
        new = Plugin(
            plugin_id=new_ulid(),
            registration=Registration(
                name=name,
                type=PluginType.INGESTOR,
                address=f"10.1.0.{self.revision}:50051",
                sources=(f"{name}-src",),
                labels={"rev": str(self.revision)},
            ),
            status=PluginStatus.UNKNOWN,
            registered_at=T0,
            revision=self.revision,
            status_since=T0,
        )
        batch = Batch(revision=self.revision, changes=[Change(self.revision, upserted=(new,))])
        batch.upsert(new)
        await self.store.write(batch)
        self.plugins[new.plugin_id] = new
        return new

    async def mark_healthy(self, plugin_id: str) -> None:
        self.revision += 1
        changed = dataclasses.replace(
            self.plugins[plugin_id], status=PluginStatus.HEALTHY, revision=self.revision
        )
        batch = Batch(revision=self.revision, changes=[Change(self.revision, upserted=(changed,))])
        batch.upsert(changed)
        await self.store.write(batch)
        self.plugins[plugin_id] = changed

    async def remove(self, plugin_id: str) -> None:
        self.revision += 1
        gone = self.plugins.pop(plugin_id)
        batch = Batch(revision=self.revision, changes=[Change(self.revision, removed=(gone,))])
        batch.remove(plugin_id)
        await self.store.write(batch)


Admin = Callable[..., Awaitable[None]]  # conftest's postgres_admin


@pytest.fixture
async def leader(pg_url: str) -> AsyncIterator[Leader]:
    """A store on the migrated database that holds the leader lease (epoch 1)."""
    store = SqlStore.open(pg_url)
    election = Election(
        store.engine,
        holder=new_holder_id(),
        address="10.0.0.1:50051",
        lease=60.0,
        on_elected=_elected,
        on_deposed=_nothing,
    )
    try:
        await upgrade(store.engine)
        await election.campaign_once()
        assert election.lease is not None
        store.replicated, store.fence = True, election.lease
        yield Leader(store)
    finally:
        await election.stop()
        await store.close()


async def _elected(_: LeaderLease) -> None:
    return None


@dataclass
class Follower:
    state: RegistryState
    pump: ChangePump
    applied: list[int] = field(default_factory=list)  # revisions published, in order
    resyncs: int = 0


MakeFollower = Callable[..., Awaitable[Follower]]


@pytest.fixture
async def make_follower(pg_url: str, leader: Leader) -> AsyncIterator[MakeFollower]:
    """``await make_follower(poll_interval=...)``: a following state and its pump (not
    started); both stopped after."""
    made: list[tuple[SqlStore, Follower]] = []

    async def make(*, poll_interval: float = 1.0) -> Follower:
        store = SqlStore.open(pg_url)
        state = RegistryState(store)
        await state.start(leading=False)

        async def resync() -> int:
            follower.resyncs += 1
            return await state.resync()

        pump = ChangePump(
            asyncpg_dsn(pg_url),
            applied=lambda: state.view.revision,
            apply=state.apply,
            resync=resync,
            poll_interval=poll_interval,
        )
        follower = Follower(state, pump)
        state.subscribe(lambda changes: follower.applied.extend(c.revision for c in changes))
        made.append((store, follower))
        return follower

    try:
        yield make
    finally:
        for store, follower in made:
            await follower.pump.stop()
            await follower.state.stop()
            await store.close()


async def assert_view_is_the_database(follower: Follower, leader: Leader) -> None:
    snapshot = await leader.store.load()
    view = follower.state.view
    assert view.revision == snapshot.revision == leader.revision
    assert {p.plugin_id: p for p in view} == {p.plugin_id: p for p in snapshot.plugins}
    assert {p.plugin_id: p for p in view} == leader.plugins


async def pump_pids(leader: Leader) -> set[int]:
    async with leader.store.engine.connect() as conn:
        return {int(pid) for pid in (await conn.execute(text(_PUMPS))).scalars()}


async def test_the_pump_applies_revisions_in_order(
    leader: Leader, make_follower: MakeFollower
) -> None:
    first = await leader.register("before")  # in the catalogue the follower loads
    follower = await make_follower()
    assert follower.state.view.revision == 1
    assert not follower.state.leading
    follower.pump.start()

    second = await leader.register("second")
    await leader.register("third")
    await leader.mark_healthy(second.plugin_id)
    await leader.remove(first.plugin_id)
    await eventually(
        lambda: follower.state.view.revision == leader.revision,
        within=DEADLINE,
        what="the follower to apply every revision",
    )
    assert follower.applied == [2, 3, 4, 5]
    assert follower.resyncs == 0
    assert follower.pump.head == 5
    healthy = follower.state.view.get(second.plugin_id)
    assert healthy is not None
    assert healthy.status is PluginStatus.HEALTHY
    assert follower.state.view.get(first.plugin_id) is None
    await assert_view_is_the_database(follower, leader)


async def test_catch_up_applies_everything_committed_so_far(
    leader: Leader, make_follower: MakeFollower
) -> None:
    follower = await make_follower()
    for name in ("a", "b", "c"):
        await leader.register(name)
    assert await follower.pump.catch_up() == 3
    assert follower.applied == [1, 2, 3]
    await assert_view_is_the_database(follower, leader)


@pytest.mark.parametrize(
    ("trim", "why"),
    [
        ("DELETE FROM changes WHERE revision <= 4", "the log skips past the next revision"),
        ("DELETE FROM changes", "the log is empty but the head is ahead"),
    ],
)
async def test_a_log_trimmed_past_the_follower_resynchronises_it(
    leader: Leader, make_follower: MakeFollower, trim: str, why: str
) -> None:
    kept = await leader.register("kept")
    gone = await leader.register("gone")
    follower = await make_follower()
    assert follower.state.view.revision == 2
    await leader.register("missed")
    await leader.remove(gone.plugin_id)
    await leader.mark_healthy(kept.plugin_id)
    await leader.register("last")
    async with leader.store.engine.begin() as conn:
        await conn.execute(text(trim))

    assert await follower.pump.catch_up() == 6, why
    assert follower.resyncs == 1
    assert 3 not in follower.applied  # never applied one by one: it is not in the log
    await assert_view_is_the_database(follower, leader)

    await leader.register("after")  # and it goes on one revision at a time
    assert await follower.pump.catch_up() == 7
    assert follower.applied[-1] == 7
    assert follower.resyncs == 1
    await assert_view_is_the_database(follower, leader)


async def test_a_killed_pump_connection_is_made_again_and_catches_up(
    leader: Leader, make_follower: MakeFollower, postgres_admin: Admin, pg_url: str
) -> None:
    await leader.register("first")
    follower = await make_follower()
    follower.pump.start()
    await eventually(lambda: follower.pump.connected, within=DEADLINE, what="the pump to connect")
    (old,) = await pump_pids(leader)

    # Held still, so the changes below are made while it has no connection at all.
    follower.pump.paused = True
    await postgres_admin(pg_url, f"SELECT pg_terminate_backend({old})")
    await eventually(lambda: _gone(leader, old), within=DEADLINE, what="the pump's backend to end")
    await leader.register("while-away")
    await leader.register("also-while-away")

    follower.pump.paused = False
    follower.pump.wake()
    await eventually(
        lambda: follower.state.view.revision == leader.revision,
        within=DEADLINE,
        what="the follower to catch up after reconnecting",
    )
    (new,) = await pump_pids(leader)
    assert new != old
    await assert_view_is_the_database(follower, leader)


async def test_a_terminated_pump_reconnects_without_waiting_for_its_poll(
    leader: Leader, make_follower: MakeFollower, postgres_admin: Admin, pg_url: str
) -> None:
    """Its connection's end wakes it; NOTIFY reaches the new connection."""
    follower = await make_follower(poll_interval=3600.0)  # never, within this test
    follower.pump.start()
    await eventually(lambda: follower.pump.connected, within=DEADLINE, what="the pump to connect")
    (old,) = await pump_pids(leader)
    await postgres_admin(pg_url, f"SELECT pg_terminate_backend({old})")

    async def reconnected() -> bool:
        return bool(await pump_pids(leader) - {old})

    await eventually(reconnected, within=DEADLINE, what="the pump to connect again")
    await leader.register("after")
    await eventually(
        lambda: follower.state.view.revision == leader.revision,
        within=DEADLINE,
        what="NOTIFY on the new connection to wake the pump",
    )
    assert follower.applied == [1]
    await assert_view_is_the_database(follower, leader)


async def _gone(leader: Leader, pid: int) -> bool:
    return pid not in await pump_pids(leader)
