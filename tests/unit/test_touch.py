"""Touches: heartbeats and health results that change no status, on a real SQLite store.

A touch makes one new state of the plugin, shared by the write side and the view
when both hold it at the same revision, and stages only its id; the journal reads
the latest lease fields when it takes the batch, so a plugin touched many times
between two writes is one lease row of its latest times. What clients observe is
what the former touch (a copy per catalog, a lease staged per touch) gave: checked
here against that implementation, run beside it over random sequences.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.catalog import Catalog
from registry.migrate import upgrade
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.state import RegistryState
from registry.storage.batch_sql import sqlite_time, statements
from registry.storage.store import Batch, Lease, SqlStore
from registry.testing import eventually

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
HEALTHY, UNHEALTHY = PluginStatus.HEALTHY, PluginStatus.UNHEALTHY


class Clock:
    """A wall clock that moves a millisecond at each reading: every touch its own time."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


class GatedStore(SqlStore):
    """The real SQLite store, whose writes wait while ``gate`` is closed."""

    gate: asyncio.Event
    writing: asyncio.Event

    async def write(self, batch: Batch) -> None:
        self.writing.set()
        await self.gate.wait()
        await super().write(batch)


async def open_store(path: Path) -> GatedStore:
    store = GatedStore.open(f"sqlite:///{path}")
    store.gate, store.writing = asyncio.Event(), asyncio.Event()
    store.gate.set()
    await upgrade(store.engine)
    return store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[GatedStore]:
    opened = await open_store(tmp_path / "registry.db")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def state(store: GatedStore) -> AsyncIterator[RegistryState]:
    registry = RegistryState(store, clock=Clock(), flush_interval=3600)
    await registry.start()
    try:
        yield registry
    finally:
        store.gate.set()
        await registry.stop()


def leased(name: str) -> Registration:
    return Registration(
        name=name,
        type=PluginType.INGESTOR,
        address="127.0.0.1:9",
        sources=(name,),
        lease_ttl_seconds=30,
    )


def lease(plugin: Plugin | None) -> tuple[datetime | None, datetime | None, str]:
    assert plugin is not None
    return plugin.last_heartbeat_at, plugin.last_check_at, plugin.last_error


def set_status(state: RegistryState, plugin_id: str, status: PluginStatus) -> Any:
    plugin = state.catalog.get(plugin_id)
    assert plugin is not None
    return state.update([dataclasses.replace(plugin, status=status, last_error="down")])


# -- the new states ----------------------------------------------------------------


def test_renewed_and_checked_are_with_fields() -> None:
    plugin = Catalog().register(leased("a"), T0).plugin
    later = T0 + timedelta(seconds=3)
    assert plugin.renewed(later) == plugin.with_fields(last_heartbeat_at=later)
    assert plugin.checked(later, "x") == plugin.with_fields(last_check_at=later, last_error="x")


def test_a_catalog_takes_a_touched_state_only_at_its_own_revision() -> None:
    catalog = Catalog()
    plugin = catalog.register(leased("a"), T0).plugin
    checked = plugin.checked(T0, "")
    assert catalog.hold_touched(checked)
    assert catalog.get(plugin.plugin_id) is checked
    ahead = dataclasses.replace(checked, revision=plugin.revision + 1)
    assert not catalog.hold_touched(ahead)
    assert catalog.get(plugin.plugin_id) is checked
    gone = dataclasses.replace(checked, plugin_id="01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert catalog.hold_touched(gone)  # not held here: nothing to do
    assert len(catalog) == 1


def test_a_check_of_an_unknown_id_changes_nothing() -> None:
    catalog = Catalog()
    assert catalog.check("01ARZ3NDEKTSV4RRFFQ69G5FAV", T0, "") is None
    assert len(catalog) == 0
    assert catalog.revision == 0


# -- the state ---------------------------------------------------------------------


async def test_a_heartbeat_makes_one_state_for_the_write_side_and_the_view(
    state: RegistryState,
) -> None:
    plugin = await state.register(leased("a"))
    renewed = state.heartbeat(plugin.plugin_id)
    assert renewed is not None
    assert state.catalog.get(plugin.plugin_id) is renewed
    assert state.view.get(plugin.plugin_id) is renewed
    assert renewed.last_heartbeat_at is not None
    assert renewed.last_heartbeat_at > plugin.registered_at
    assert (renewed.revision, state.view.revision) == (plugin.revision, plugin.revision)


async def test_touch_many_records_one_result_for_all_and_skips_ids_not_held(
    state: RegistryState,
) -> None:
    ids = [(await state.register(leased(f"p{i}"))).plugin_id for i in range(3)]
    at = state.clock()
    state.touch_many([*ids, "01ARZ3NDEKTSV4RRFFQ69G5FAV"], at, "slow")
    for plugin_id in ids:
        held = state.catalog.get(plugin_id)
        assert held is state.view.get(plugin_id)
        assert held is not None
        assert (held.last_check_at, held.last_error) == (at, "slow")
    assert len(state.catalog) == 3


async def test_a_check_that_changes_no_error_is_held_but_not_staged(
    state: RegistryState,
) -> None:
    plugin_id = (await state.register(leased("quiet"))).plugin_id
    await state.flush()
    journal = state._writer()
    state.touch_many([plugin_id], state.clock(), "")  # passes, as the last one did
    assert plugin_id not in journal._touched
    held = state.catalog.get(plugin_id)
    assert held is not None
    assert held.last_check_at is not None
    state.touch_many([plugin_id], state.clock(), "slow")  # the error text changed
    assert plugin_id in journal._touched


async def test_a_touch_while_a_change_is_in_flight_leaves_the_view_at_its_revision(
    state: RegistryState, store: GatedStore
) -> None:
    plugin = await state.register(leased("a"))
    plugin_id = plugin.plugin_id
    store.gate.clear()
    store.writing.clear()
    update = asyncio.create_task(set_status(state, plugin_id, UNHEALTHY))
    await store.writing.wait()
    at = state.clock()
    state.touch_many([plugin_id], at, "still down")
    written, viewed = state.catalog.get(plugin_id), state.view.get(plugin_id)
    assert written is not None
    assert viewed is not None
    # The view keeps the committed revision, with the touch on its own copy.
    assert (viewed.revision, viewed.status) == (plugin.revision, plugin.status)
    assert (written.revision, written.status) == (plugin.revision + 1, UNHEALTHY)
    assert lease(viewed)[1:] == lease(written)[1:] == (at, "still down")
    store.gate.set()
    await update
    viewed = state.view.get(plugin_id)
    assert viewed is not None
    assert viewed.status is UNHEALTHY
    # The next touch shares the write side's state again, every touched field with it.
    renewed = state.heartbeat(plugin_id)
    assert state.view.get(plugin_id) is renewed
    assert lease(renewed)[1:] == (at, "still down")


# -- what is stored ----------------------------------------------------------------


async def test_a_write_stores_each_touched_plugin_once_with_its_latest_times(
    state: RegistryState, store: GatedStore
) -> None:
    ids = [(await state.register(leased(f"p{i}"))).plugin_id for i in range(3)]
    rows: list[Any] = []
    store.trace = lambda sql, params: rows.extend(params) if "plugin_leases" in sql else None
    for _ in range(5):
        for plugin_id in ids:
            state.heartbeat(plugin_id)
        state.touch_many(ids, state.clock(), "")
    await state.flush()
    assert sorted(row[0] for row in rows) == sorted(ids)
    stored = {p.plugin_id: lease(p) for p in (await store.load()).plugins}
    assert stored == {i: lease(state.catalog.get(i)) for i in ids}


async def test_a_plugin_removed_after_its_touch_writes_no_lease(
    state: RegistryState, store: GatedStore
) -> None:
    kept, gone = [(await state.register(leased(n))).plugin_id for n in ("kept", "gone")]
    state.heartbeat(kept)
    state.heartbeat(gone)
    await state.remove([gone])
    stored = {p.plugin_id: lease(p) for p in (await store.load()).plugins}
    assert stored == {kept: lease(state.catalog.get(kept))}


async def test_a_change_and_a_touch_in_one_batch_store_the_newest_lease(
    state: RegistryState, store: GatedStore
) -> None:
    plugin = await state.register(leased("a"))
    plugin_id = plugin.plugin_id
    store.gate.clear()
    store.writing.clear()
    state.heartbeat(plugin_id)
    in_flight = asyncio.create_task(state.flush())
    await store.writing.wait()  # a write holds the gate: what follows is the next batch
    update = asyncio.create_task(set_status(state, plugin_id, UNHEALTHY))
    await eventually(  # the new state is staged (upserted) and awaits its commit
        lambda: _status_of(state, plugin_id) is UNHEALTHY, within=10, what="the status staged"
    )
    at = state.clock()
    state.touch_many([plugin_id], at, "touched")
    store.gate.set()
    await asyncio.gather(in_flight, update)
    stored = {p.plugin_id: lease(p) for p in (await store.load()).plugins}
    assert stored[plugin_id] == lease(state.catalog.get(plugin_id))
    assert stored[plugin_id][1:] == (at, "touched")
    assert next(iter((await store.load()).plugins)).status is UNHEALTHY


@given(
    st.datetimes(
        min_value=datetime(1000, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
        ),
    )
)
def test_sqlite_time_is_the_text_sqlalchemy_stores(moment: datetime) -> None:
    expected = moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    assert sqlite_time(moment) == expected


def test_a_time_shared_by_many_lease_rows_is_the_same_text_in_each() -> None:
    batch = Batch(revision=1)
    at = T0 + timedelta(microseconds=5)
    for i in range(3):
        batch.touch(f"id{i}", Lease(last_heartbeat_at=T0, last_check_at=at, last_error=""))
    (leases,) = statements(batch, "sqlite")
    assert [row[1:] for row in leases.rows] == [(sqlite_time(T0), sqlite_time(at), "")] * 3


# -- beside the former implementation ----------------------------------------------


class Former:
    """The former touch, on catalogs of its own: a copy per catalog per touch, and
    every change committed at once (as the sequences here await each one)."""

    def __init__(self) -> None:
        self.catalog = Catalog()
        self.view = Catalog()

    def touch(self, plugin_id: str, **fields: Any) -> None:
        plugin = self.catalog.touch(plugin_id, **fields)
        if plugin is not None:
            self.view.touch(plugin_id, **fields)


Op = tuple[str, int]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["beat", "check", "fail", "status", "remove", "flush"]), st.integers(0, 3)
    ),
    max_size=30,
)


async def _run(ops: list[Op], folder: Path) -> None:
    store = await open_store(folder / "registry.db")
    clock = Clock()
    state = RegistryState(store, clock=clock, flush_interval=3600)
    await state.start()
    former = Former()
    try:
        ids = []
        for i in range(4):
            plugin = await state.register(leased(f"p{i}"))
            ids.append(plugin.plugin_id)
            for catalog in (former.catalog, former.view):
                catalog.apply(Change(plugin.revision, (plugin,)))
        for op, index in ops:
            plugin_id = ids[index]
            theirs = former.catalog.get(plugin_id)
            if op == "beat":
                renewed = state.heartbeat(plugin_id)
                at = renewed.last_heartbeat_at if renewed is not None else clock.now
                assert at is not None
                assert (renewed is None) == (former.catalog.heartbeat(plugin_id, at) is None)
                if renewed is not None:
                    former.view.touch(plugin_id, last_heartbeat_at=at)
            elif op in ("check", "fail"):
                at, error = state.clock(), "" if op == "check" else "down"
                state.touch_many([plugin_id], at, error)
                former.touch(plugin_id, last_check_at=at, last_error=error)
            elif op == "status" and theirs is not None:
                status = UNHEALTHY if theirs.status is HEALTHY else HEALTHY
                await set_status(state, plugin_id, status)
                mine = state.catalog.get(plugin_id)
                assert mine is not None
                assert mine.status_since is not None
                wanted = dataclasses.replace(theirs, status=status, last_error="down")
                change = former.catalog.update([wanted], mine.status_since)
                assert change is not None
                former.view.apply(change)
            elif op == "remove":
                await state.remove([plugin_id])
                change = former.catalog.remove([plugin_id])
                if change is not None:
                    former.view.apply(change)
            elif op == "flush":
                await state.flush()
            for mine, theirs in ((state.catalog, former.catalog), (state.view, former.view)):
                assert sorted(mine, key=_id) == sorted(theirs, key=_id)
                assert mine.revision == theirs.revision
        await state.flush()
        stored = {p.plugin_id: Lease.of(p) for p in (await store.load()).plugins}
        held = {p.plugin_id: Lease.of(p) for p in former.catalog}
        assert stored.keys() == held.keys()
        for plugin_id, lease in stored.items():
            # A check that changed no error text is not stored on its own: its time
            # rides along with the next write of the plugin's lease, so it may lag.
            want = held[plugin_id]
            assert (lease.last_heartbeat_at, lease.last_error) == (
                want.last_heartbeat_at,
                want.last_error,
            )
            assert lease.last_check_at is None or (
                want.last_check_at is not None and lease.last_check_at <= want.last_check_at
            )
    finally:
        await state.stop()
        await store.close()


def _id(plugin: Plugin) -> str:
    return plugin.plugin_id


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_touches_among_revisions_observe_as_the_former_touch(ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(_run(ops, Path(folder)))


def _status_of(state: RegistryState, plugin_id: str) -> PluginStatus | None:
    held = state.catalog.get(plugin_id)
    return held.status if held is not None else None
