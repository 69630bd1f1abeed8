"""The change log loaded at start: equal to what was stored, sharing the catalogue's objects.

A registry that made its changes itself holds one registration per plugin, shared by
every state of it; one restarted on the same database must hold no more (issue 13).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from registry.catalog import Catalog
from registry.migrate import upgrade
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.storage.store import Batch, Lease, SqlStore
from registry.ulid import new_ulid

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def plugin(name: str, revision: int) -> Plugin:
    return Plugin(
        plugin_id=new_ulid(),
        registration=Registration(
            name=name,
            type=PluginType.INGESTOR,
            address=f"{name}.svc:50051",
            sources=(f"{name}-a",),
            labels={"team": "edge"},
            lease_ttl_seconds=30,
        ),
        status=PluginStatus.UNKNOWN,
        registered_at=T0,
        last_heartbeat_at=T0,
        revision=revision,
        status_since=T0,
    )


@pytest.fixture
async def store(database_url: str):
    opened = SqlStore.open(database_url)
    try:
        await upgrade(opened.engine)
        yield opened
    finally:
        await opened.close()


async def test_history_shares_the_objects_of_the_catalogue_it_was_loaded_with(store):
    kept, touched, gone = plugin("kept", 1), plugin("touched", 2), plugin("gone", 3)
    healthy = [
        dataclasses.replace(p, status=PluginStatus.HEALTHY, last_check_at=T0, revision=4)
        for p in (kept, touched)
    ]
    batch = Batch(revision=5)
    for p in (kept, touched, gone, *healthy):
        batch.upsert(p)
    batch.remove(gone.plugin_id)
    batch.changes = [
        Change(1, upserted=(kept,)),
        Change(2, upserted=(touched,)),
        Change(3, upserted=(gone,)),
        Change(4, upserted=tuple(healthy)),
        Change(5, removed=(gone,)),
    ]
    await store.write(batch)
    later = Batch(revision=5)  # a heartbeat since: the stored state moved on, no revision
    later.touch(touched.plugin_id, Lease(T0 + timedelta(seconds=9), T0, ""))
    await store.write(later)

    snapshot = await store.load()
    catalog = Catalog(snapshot.plugins, snapshot.revision)
    history = await store.load_history(known=catalog.get)

    assert history == batch.changes  # equal values, whatever is shared
    by_revision = {c.revision: c for c in history}
    kept_now, touched_now = catalog.get(kept.plugin_id), catalog.get(touched.plugin_id)
    assert kept_now is not None
    assert touched_now is not None
    # Equal to the catalogue's state: that very object.
    assert by_revision[4].upserted[0] is kept_now
    # Touched since: a state of its own, with the catalogue's registration and times.
    old_touched = by_revision[4].upserted[1]
    assert old_touched is not touched_now
    assert old_touched != touched_now
    assert old_touched.registration is touched_now.registration
    assert old_touched.registered_at is touched_now.registered_at
    for change in (by_revision[1], by_revision[2]):
        assert (
            change.upserted[0].registration
            is catalog.get(change.upserted[0].plugin_id).registration
        )  # type: ignore[union-attr]
    # Gone from the catalogue: its states share one registration among themselves.
    assert by_revision[5].removed[0].registration is by_revision[3].upserted[0].registration


async def test_a_log_and_catalogue_longer_than_a_slice_load_whole_and_in_order(store):
    plugins = [plugin(f"p{i}", i + 1) for i in range(700)]
    batch = Batch(revision=len(plugins))
    for p in plugins:
        batch.upsert(p)
    batch.changes = [Change(p.revision, upserted=(p,)) for p in plugins]
    await store.write(batch)

    snapshot = await store.load()
    assert sorted(p.plugin_id for p in snapshot.plugins) == sorted(p.plugin_id for p in plugins)
    assert await store.load_history() == batch.changes
