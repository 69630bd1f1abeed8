"""The leader lease and the epoch fence on a real PostgreSQL database (SPEC §8).

Elections are driven round by round with ``campaign_once()`` (their own task is never
started), so who leads when is decided by the test, not by timers. The one wait is on
the database's clock: a lease that nobody renews runs out, and only then is it taken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.migrate import upgrade
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.replica.election import LEADER_NOTICE, Election, LeaderLease, new_holder_id
from registry.replica.pump import asyncpg_dsn
from registry.storage.store import CHANGES_CHANNEL, Batch, Fenced, SqlStore
from registry.testing import eventually
from registry.ulid import new_ulid

postgres = pytest.mark.postgres
LONG = 60.0  # a lease no test outlives: it ends only when the test says so
DEADLINE = 10.0  # a bound on a wait, never a pause
T0 = datetime(2026, 12, 2, 3, 4, 5, tzinfo=UTC)


@dataclass
class Roles:
    """What an election told its replica, in order."""

    events: list[tuple[str, int]] = field(default_factory=list)

    async def elected(self, lease: LeaderLease) -> None:
        self.events.append(("elected", lease.epoch))

    async def deposed(self) -> None:
        self.events.append(("deposed", 0))


MakeElection = Callable[..., tuple[Election, Roles]]


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[SqlStore]:
    """A store on the migrated database (not replicated until a test says so)."""
    opened = SqlStore.open(pg_url)
    try:
        await upgrade(opened.engine)
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def make_election(store: SqlStore) -> AsyncIterator[MakeElection]:
    """``make_election(address, lease=...)``: an Election of its own holder; stopped after."""
    made: list[Election] = []

    def make(address: str, *, lease: float = LONG) -> tuple[Election, Roles]:
        roles = Roles()
        election = Election(
            store.engine,
            holder=new_holder_id(),
            address=address,
            lease=lease,
            on_elected=roles.elected,
            on_deposed=roles.deposed,
        )
        made.append(election)
        return election, roles

    try:
        yield make
    finally:
        for election in made:
            await election.stop()


async def leader_row(engine: AsyncEngine) -> tuple[int, str, str]:
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT epoch, holder, address FROM registry_leader"))).one()
    return int(row.epoch), str(row.holder), str(row.address)


async def sql(engine: AsyncEngine, statement: str) -> int:
    """Run one statement in its own transaction (a replica elsewhere); its row count."""
    async with engine.begin() as conn:
        result = await conn.execute(text(statement))
    return int(result.rowcount)


async def count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text(f"SELECT COUNT(*) FROM {table}")) or 0)


# -- the election ---------------------------------------------------------------------


@postgres
async def test_exactly_one_of_two_leads_and_the_other_knows_where(
    make_election: MakeElection, store: SqlStore
) -> None:
    a, a_roles = make_election("10.0.0.1:50051")
    b, b_roles = make_election("10.0.0.2:50051")
    await asyncio.gather(a.campaign_once(), b.campaign_once())

    leader, follower = (a, b) if a.leading else (b, a)
    assert [a.leading, b.leading].count(True) == 1
    assert leader.epoch == 1
    assert not follower.leading
    assert follower.leader_address == leader.address
    assert follower.epoch == 1
    assert leader.leader_address == leader.address
    assert await leader_row(store.engine) == (1, leader.holder, leader.address)
    events = {a: a_roles.events, b: b_roles.events}
    assert events[leader] == [("elected", 1)]
    assert events[follower] == []


@postgres
@pytest.mark.parametrize("hangs", [False, True])
async def test_a_take_over_has_the_lease_to_finish_not_the_round_and_gives_up_past_it(
    store: SqlStore, hangs: bool
) -> None:
    lease = 3.0  # a round is bounded by a third of it
    roles = Roles()
    finished: list[int] = []

    async def slow_take_over(won: LeaderLease) -> None:
        roles.events.append(("elected", won.epoch))
        # Slower than a round (the simulated work of a take-over, not a wait on another
        # task); hanging: past the lease.
        await asyncio.sleep(lease * 2 if hangs else lease / 2)
        finished.append(won.epoch)

    election = Election(
        store.engine,
        holder=new_holder_id(),
        address="127.0.0.1:50051",
        lease=lease,
        on_elected=slow_take_over,
        on_deposed=roles.deposed,
    )
    try:
        await asyncio.wait_for(election.campaign_once(), DEADLINE)
        if hangs:  # cut off at the lease: it gives the lease up rather than half-lead
            assert finished == []
            assert roles.events == [("elected", 1), ("deposed", 0)]
            assert not election.leading
        else:  # the round's bound did not cut it off: it leads, and renews
            assert finished == [1]
            assert roles.events == [("elected", 1)]
            await election.campaign_once()
            assert election.leading
            assert await leader_row(store.engine) == (1, election.holder, election.address)
    finally:
        await election.stop()


@postgres
async def test_a_leader_that_resigns_hands_over_with_the_next_epoch(
    make_election: MakeElection, store: SqlStore, pg_url: str
) -> None:
    a, a_roles = make_election("10.0.0.1:50051")
    b, b_roles = make_election("10.0.0.2:50051")
    await a.campaign_once()
    await b.campaign_once()
    assert a.leading
    assert not b.leading

    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(asyncpg_dsn(pg_url))
    try:
        await listener.add_listener(CHANGES_CHANNEL, lambda *args: heard.put_nowait(args[3]))
        await a.stop()
        # Followers are woken to campaign now rather than at their next round.
        assert await asyncio.wait_for(heard.get(), DEADLINE) == LEADER_NOTICE
    finally:
        await listener.close()
    assert not a.leading
    assert a_roles.events == [("elected", 1), ("deposed", 0)]
    assert (await leader_row(store.engine))[1] == ""  # given up, not left to run out

    await b.campaign_once()
    assert b.leading
    assert b.epoch == 2
    assert b_roles.events == [("elected", 2)]
    assert await leader_row(store.engine) == (2, b.holder, b.address)


@postgres
async def test_a_lease_not_renewed_runs_out_by_the_database_clock(
    make_election: MakeElection, store: SqlStore
) -> None:
    a, a_roles = make_election("10.0.0.1:50051", lease=0.5)
    b, b_roles = make_election("10.0.0.2:50051")
    await a.campaign_once()
    await b.campaign_once()
    assert a.leading
    assert not b.leading
    assert b.leader is not None
    assert b.leader.held  # the database says it still runs

    async def b_leads() -> bool:
        await b.campaign_once()
        return bool(b.leading)

    # ``a`` never renews (its task was never started): its row runs out.
    await eventually(b_leads, within=DEADLINE, what="b to take the expired lease", interval=0.05)
    assert b.epoch == 2
    assert b_roles.events == [("elected", 2)]
    # Its own deadline started before its renewal was sent, so it ran out first.
    assert a.lease is not None
    assert not a.lease.holds()
    assert not a.leading

    await a.campaign_once()  # its next round: it steps down, never renews
    assert a_roles.events == [("elected", 1), ("deposed", 0)]
    assert a.lease is None
    await a.campaign_once()
    assert a.leader_address == b.address
    assert await leader_row(store.engine) == (2, b.holder, b.address)


@postgres
async def test_a_leader_whose_row_was_taken_is_deposed_at_its_next_renewal(
    make_election: MakeElection, store: SqlStore
) -> None:
    a, a_roles = make_election("10.0.0.1:50051")
    await a.campaign_once()
    assert a.leading
    taken = await sql(
        store.engine,
        "UPDATE registry_leader SET holder = 'elsewhere', address = '10.0.0.9:50051', "
        "epoch = epoch + 1 WHERE id = 1",
    )
    assert taken == 1
    assert a.leading  # it cannot know before it asks

    await a.campaign_once()  # a renewal that finds the row taken
    assert not a.leading
    assert a.lease is None
    assert a_roles.events == [("elected", 1), ("deposed", 0)]
    assert await leader_row(store.engine) == (2, "elsewhere", "10.0.0.9:50051")

    await a.campaign_once()  # and it follows the one that took it
    assert not a.leading
    assert a.leader_address == "10.0.0.9:50051"
    assert a.epoch == 2


@postgres
async def test_a_restart_on_the_leaders_address_takes_over_once(
    make_election: MakeElection,
) -> None:
    """The address in the row is bound by the new process: the old holder is gone."""
    old, old_roles = make_election("10.0.0.1:50051")
    await old.campaign_once()
    assert old.leading

    other, _ = make_election("10.0.0.2:50051")
    await other.campaign_once()  # another address never takes a held lease
    assert not other.leading

    restarted, restarted_roles = make_election("10.0.0.1:50051")
    await restarted.campaign_once()
    assert restarted.leading
    assert restarted.epoch == 2
    assert restarted_roles.events == [("elected", 2)]

    await old.campaign_once()  # the old one (were it alive) steps down ...
    assert old_roles.events == [("elected", 1), ("deposed", 0)]
    await old.campaign_once()  # ... and, past its first attempt, takes nothing back
    assert not old.leading
    assert restarted.leading
    assert old.leader_address == restarted.address


def test_a_lease_holds_until_its_monotonic_deadline() -> None:
    assert LeaderLease(1, "h", time.monotonic() + LONG).holds()
    assert not LeaderLease(1, "h", time.monotonic() - 0.001).holds()


def test_a_lease_extends_forward_only_and_is_lost_for_good() -> None:
    lease = LeaderLease(3, "h", time.monotonic() - 1)
    assert not lease.holds()
    lease.extend(time.monotonic() + LONG)
    assert lease.holds()
    lease.extend(time.monotonic() - 1)  # an older deadline does not shorten it
    assert lease.holds()
    lease.lose()
    assert not lease.holds()
    lease.extend(time.monotonic() + LONG)
    assert not lease.holds()


# -- the fence ------------------------------------------------------------------------


def plugin(name: str, revision: int) -> Plugin:
    return Plugin(
        plugin_id=new_ulid(),
        registration=Registration(
            name=name,
            type=PluginType.INGESTOR,
            address=f"10.1.0.{revision}:50051",
            sources=(f"{name}-src",),
        ),
        status=PluginStatus.UNKNOWN,
        registered_at=T0,
        revision=revision,
        status_since=T0,
    )


def registering(revision: int, name: str | None = None) -> Batch:
    """A batch that registers one plugin at ``revision``, as the journal makes it."""
    new = plugin(name or f"p{revision}", revision)
    return Batch(
        revision=revision, upserts={new.plugin_id: new}, changes=[Change(revision, upserted=(new,))]
    )


async def counts(engine: AsyncEngine) -> tuple[int, int, int]:
    """Rows of plugins, changes and registry_meta."""
    return (
        await count(engine, "plugins"),
        await count(engine, "changes"),
        await count(engine, "registry_meta"),
    )


@postgres
async def test_a_replicated_store_without_a_fence_writes_nothing(store: SqlStore) -> None:
    store.replicated = True
    with pytest.raises(Fenced):
        await store.write(registering(1))
    assert await counts(store.engine) == (0, 0, 0)


@postgres
async def test_a_stale_epoch_commits_nothing(store: SqlStore, make_election: MakeElection) -> None:
    a, _ = make_election("10.0.0.1:50051")
    await a.campaign_once()
    store.replicated = True
    store.fence = a.lease
    await store.write(registering(1))  # the fence holds: written
    assert await counts(store.engine) == (1, 1, 1)

    # Another replica took over (its own epoch), unknown to this one yet.
    assert await sql(store.engine, "UPDATE registry_leader SET epoch = epoch + 1") == 1
    assert a.lease is not None
    assert a.lease.holds()
    with pytest.raises(Fenced):
        await store.write(registering(2))
    assert await counts(store.engine) == (1, 1, 1)
    async with store.engine.connect() as conn:
        assert await conn.scalar(text("SELECT revision FROM registry_meta")) == 1


@postgres
async def test_a_lease_run_out_by_the_database_clock_commits_nothing(
    store: SqlStore, make_election: MakeElection
) -> None:
    a, _ = make_election("10.0.0.1:50051")
    await a.campaign_once()
    store.replicated, store.fence = True, a.lease
    expired = await sql(
        store.engine,
        "UPDATE registry_leader SET expires_at = clock_timestamp() - interval '1 second'",
    )
    assert expired == 1
    with pytest.raises(Fenced):
        await store.write(registering(1))
    assert await counts(store.engine) == (0, 0, 0)


@postgres
async def test_a_lease_past_its_own_deadline_is_not_even_tried(
    store: SqlStore, make_election: MakeElection
) -> None:
    a, _ = make_election("10.0.0.1:50051")
    await a.campaign_once()
    assert a.lease is not None
    # The row is still this holder's, but by this process's clock the lease is over.
    store.replicated = True
    store.fence = LeaderLease(a.lease.epoch, a.holder, time.monotonic() - 0.001)
    with pytest.raises(Fenced):
        await store.write(registering(1))
    assert await counts(store.engine) == (0, 0, 0)


@postgres
async def test_a_fenced_write_records_the_epoch_that_committed_it(
    store: SqlStore, make_election: MakeElection
) -> None:
    a, _ = make_election("10.0.0.1:50051")
    b, _ = make_election("10.0.0.2:50051")
    await a.campaign_once()
    store.replicated, store.fence = True, a.lease
    await store.write(registering(1))
    await a.stop()
    await b.campaign_once()
    assert b.epoch == 2
    store.fence = b.lease
    await store.write(registering(2))
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT revision, epoch FROM changes ORDER BY 1"))).all()
    assert [tuple(r) for r in rows] == [(1, 1), (2, 2)]
    assert sorted(p.name for p in (await store.load()).plugins) == ["p1", "p2"]


@postgres
async def test_a_commit_notifies_listeners_of_its_revision(
    store: SqlStore, make_election: MakeElection, pg_url: str
) -> None:
    a, _ = make_election("10.0.0.1:50051")
    await a.campaign_once()
    store.replicated, store.fence = True, a.lease
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(asyncpg_dsn(pg_url))
    try:
        await listener.add_listener(CHANGES_CHANNEL, lambda *args: heard.put_nowait(args[3]))
        await store.write(registering(1))
        await store.write(registering(2))
        first = await asyncio.wait_for(heard.get(), DEADLINE)
        second = await asyncio.wait_for(heard.get(), DEADLINE)
    finally:
        await listener.close()
    assert (first, second) == ("1", "2")
