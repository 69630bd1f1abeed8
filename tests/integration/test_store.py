"""SqlStore against real databases (SQLite and PostgreSQL), and a registry restarted on one."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from registry import RegistryClient, RegistryServer, RegistrySettings, StoreError
from registry.catalog import Claim, Owner, OwnershipChange
from registry.migrate import upgrade
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.storage.store import Batch, Lease, SqlStore, normalize_url
from registry.ulid import new_ulid
from registry.wire import pb

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def plugin(name: str, **changes: object) -> Plugin:
    registration = Registration(
        name=name,
        type=PluginType.INGESTOR,
        address=f"{name}.svc:50051",
        version="1.0.0",
        description=f"the {name} plugin — ünïcode ✓",
        sources=(f"{name}-a", f"{name}/b:c"),
        capabilities=("batch", "gzip"),
        labels={"team": "edge", "k8s.io/zone": "eu-1", "empty": ""},
        lease_ttl_seconds=30,
    )
    base = Plugin(
        plugin_id=new_ulid(),
        registration=registration,
        status=PluginStatus.UNKNOWN,
        registered_at=T0,
        last_heartbeat_at=T0 + timedelta(seconds=1),
        last_check_at=None,
        last_error="",
        revision=1,
        status_since=T0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def store(database_url: str):
    opened = SqlStore.open(database_url)
    try:
        await upgrade(opened.engine)
        yield opened
    finally:
        await opened.close()


def by_id(plugins: list[Plugin]) -> dict[str, Plugin]:
    return {p.plugin_id: p for p in plugins}


async def test_an_empty_database_loads_empty(store):
    snapshot = await store.load()
    assert snapshot.plugins == []
    assert snapshot.revision == 0
    assert await store.load_history() == []


async def test_batches_round_trip(store):
    a = plugin("alpha")
    b = plugin(
        "beta",
        status=PluginStatus.HEALTHY,
        # Stored as UTC whatever zone it came in.
        last_check_at=datetime(2026, 3, 4, 8, 0, 0, 999999, tzinfo=timezone(timedelta(hours=3))),
        last_error="",
        revision=2,
    )
    c = plugin(
        "gamma",
        last_heartbeat_at=None,
        registration=Registration(
            name="gamma", type=PluginType.EMITTER, address="unix:/tmp/g.sock", emitter_name="out"
        ),
    )
    first = Batch(revision=2)
    first.upsert(a)
    first.upsert(b)
    first.upsert(c)
    first.changes = [Change(1, upserted=(a,)), Change(2, upserted=(b, c))]
    await store.write(first)

    snapshot = await store.load()
    assert snapshot.revision == 2
    assert by_id(snapshot.plugins) == by_id([a, b, c])
    for loaded in snapshot.plugins:
        for moment in (loaded.registered_at, loaded.last_heartbeat_at, loaded.last_check_at):
            if moment is not None:
                assert moment.utcoffset() == timedelta(0)
    loaded_b = by_id(snapshot.plugins)[b.plugin_id]
    assert loaded_b.last_check_at == datetime(2026, 3, 4, 5, 0, 0, 999999, tzinfo=UTC)
    assert loaded_b.registration.labels == {"team": "edge", "k8s.io/zone": "eu-1", "empty": ""}
    assert loaded_b.registration.sources == ("beta-a", "beta/b:c")
    assert await store.load_history() == first.changes

    # A second batch: a removal, an update, a removal of an id that never existed.
    a2 = dataclasses.replace(a, status=PluginStatus.UNHEALTHY, last_error="boom", revision=3)
    second = Batch(revision=4)
    second.upsert(a2)
    second.remove(b.plugin_id)
    second.remove("01ARZ3NDEKTSV4RRFFQ69G5FAV")
    second.changes = [Change(3, upserted=(a2,)), Change(4, removed=(b,))]
    await store.write(second)

    snapshot = await store.load()
    assert snapshot.revision == 4
    assert by_id(snapshot.plugins) == by_id([a2, c])
    assert await store.load_history() == first.changes + second.changes


async def test_a_batch_of_only_unknown_removals_is_harmless(store):
    a = plugin("alpha")
    batch = Batch(revision=1)
    batch.upsert(a)
    await store.write(batch)
    removal = Batch(revision=1)
    removal.remove("no-such-id")
    await store.write(removal)
    snapshot = await store.load()
    assert snapshot.plugins == [a]
    assert snapshot.revision == 1


async def test_the_change_log_keeps_only_the_retained_revisions(store):
    batch = Batch(revision=5, retain=2)
    batch.changes = [Change(r, removed=(plugin(f"p{r}"),)) for r in range(1, 6)]
    await store.write(batch)
    assert [c.revision for c in await store.load_history()] == [4, 5]


async def test_many_ids_in_one_batch(store):
    """More ids than one IN (...) clause takes."""
    plugins = [plugin(f"p{i}") for i in range(1200)]
    batch = Batch(revision=1)
    for p in plugins:
        batch.upsert(p)
    await store.write(batch)
    removal = Batch(revision=2)
    for p in plugins[:1100]:
        removal.remove(p.plugin_id)
    await store.write(removal)
    snapshot = await store.load()
    assert by_id(snapshot.plugins) == by_id(plugins[1100:])


def test_batch_upsert_and_remove_cancel_each_other():
    batch = Batch()
    assert not batch
    a = plugin("alpha")
    batch.upsert(a)
    batch.remove(a.plugin_id)
    assert batch.upserts == {}
    assert batch.removals == {a.plugin_id}
    batch.upsert(a)
    assert batch.removals == set()
    assert batch


# -- ownership --------------------------------------------------------------------


async def test_ownership_round_trips_and_goes_when_released(store):
    # Another zone on the way in; UTC on the way out.
    moment = datetime(2026, 3, 4, 8, 6, 7, 123456, tzinfo=timezone(timedelta(hours=3)))
    owners = [Owner("alpha", "team-a", T0), Owner("es-writer", "spiffe://x/team-a", moment)]
    claims = [
        Claim("source", "k8s", "team-a", "alpha", T0),
        Claim("source", "a/b:c", "team-a", "alpha", T0),
        Claim("emitter", "elastic", "spiffe://x/team-a", "es-writer", moment),
        # The same key as a source and as an emitter name: two claims.
        Claim("emitter", "k8s", "team-a", "alpha", T0),
    ]
    first = Batch(revision=0)
    first.own(
        OwnershipChange(
            owners={o.name: o for o in owners}, claims={(c.kind, c.key): c for c in claims}
        )
    )
    assert first
    await store.write(first)
    snapshot = await store.load()
    assert sorted(snapshot.owners, key=lambda o: o.name) == owners
    assert {(c.kind, c.key): c for c in snapshot.claims} == {(c.kind, c.key): c for c in claims}
    assert snapshot.owners[1].claimed_at.utcoffset() == timedelta(0)
    assert snapshot.plugins == []
    assert snapshot.revision == 0

    # A release and a new owner of another name in one batch; unknown keys are harmless.
    second = Batch(revision=0)
    second.own(
        OwnershipChange(
            owners={"alpha": None, "nobody": None, "beta": Owner("beta", "team-b", T0)},
            claims={
                ("source", "k8s"): None,
                ("source", "a/b:c"): None,
                ("emitter", "k8s"): None,
                ("source", "never"): None,
                ("emitter", "elastic"): Claim("emitter", "elastic", "team-b", "beta", T0),
            },
        )
    )
    await store.write(second)
    snapshot = await store.load()
    assert sorted(snapshot.owners, key=lambda o: o.name) == [
        Owner("beta", "team-b", T0),
        Owner("es-writer", "spiffe://x/team-a", moment),
    ]
    assert snapshot.claims == [Claim("emitter", "elastic", "team-b", "beta", T0)]


def test_a_batch_keeps_the_last_state_of_each_ownership_record():
    batch = Batch()
    batch.own(OwnershipChange(owners={"alpha": Owner("alpha", "team-a", T0)}))
    batch.own(OwnershipChange(owners={"alpha": None}))
    assert batch.owners == {"alpha": None}
    assert batch  # a deletion is a write too


async def test_ownership_rows_are_in_the_transaction_of_the_batch(store):
    """A claim the database refuses takes the plugin and its owner down with it."""
    a = plugin("alpha")
    batch = Batch(revision=1)
    batch.upsert(a)
    batch.changes = [Change(1, upserted=(a,))]
    batch.own(
        OwnershipChange(
            owners={"alpha": Owner("alpha", "team-a", T0)},
            claims={
                ("source", "alpha-a"): Claim("source", "alpha-a", "team-a", "alpha", T0),
                # Breaks the CHECK on kind: the last statement of the transaction fails.
                ("bogus", "x"): Claim("bogus", "x", "team-a", "alpha", T0),  # type: ignore
            },
        )
    )
    with pytest.raises(StoreError):
        await store.write(batch)
    snapshot = await store.load()
    assert snapshot.plugins == []
    assert snapshot.owners == []
    assert snapshot.claims == []
    assert snapshot.revision == 0
    assert await store.load_history() == []


# -- failures -------------------------------------------------------------------


async def test_an_unreachable_postgres_is_a_chained_store_error():
    store = SqlStore.open("postgresql://postgres@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(StoreError) as caught:
            await store.load()
        assert caught.value.__cause__ is not None
        with pytest.raises(StoreError) as caught:
            await store.write(Batch(revision=1, removals={"x"}))
        assert caught.value.__cause__ is not None
        with pytest.raises(StoreError) as caught:
            await store.ping()
        assert caught.value.__cause__ is not None
        with pytest.raises(StoreError) as caught:
            await upgrade(store.engine)
        assert caught.value.__cause__ is not None
    finally:
        await store.close()


def sqlite_workers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


async def test_an_unusable_sqlite_path_is_a_chained_store_error(tmp_path, wait_for):
    before = sqlite_workers()
    # The database "file" is a directory: SQLite cannot open it.
    store = SqlStore.open(f"sqlite:///{tmp_path}")
    try:
        with pytest.raises(StoreError) as caught:
            await upgrade(store.engine)
        assert caught.value.__cause__ is not None
        with pytest.raises(StoreError) as caught:
            await store.load()
        assert caught.value.__cause__ is not None
    finally:
        await store.close()
        # aiosqlite stops the worker of a failed connect without waiting for it; the
        # worker then reports to this test's loop, which must still be running.
        await wait_for(lambda: not any(t.is_alive() for t in sqlite_workers() - before))


async def test_a_sqlite_path_under_a_file_is_a_store_error(tmp_path):
    """Regression: creating the folder raised a bare NotADirectoryError."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    settings = RegistrySettings(
        listen="127.0.0.1:0", database_url=f"sqlite:///{blocker}/sub/registry.db"
    )
    with pytest.raises(StoreError):
        async with RegistryServer(settings):
            pass


def test_normalize_url():
    assert normalize_url("sqlite:////tmp/x.db").startswith("sqlite+aiosqlite:")
    assert normalize_url("postgresql://u@h/db").startswith("postgresql+asyncpg://")
    assert normalize_url("postgres://u@h/db").startswith("postgresql+asyncpg://")
    with pytest.raises(ValueError, match="unsupported"):
        normalize_url("mysql://u@h/db")


# -- a registry server restarted on the same database -----------------------------


async def test_a_restarted_registry_has_its_plugins_and_revision(database_url: str, tmp_path: Path):
    settings = RegistrySettings(listen="127.0.0.1:0", database_url=database_url)
    labels = {"zone": "eu-1"}
    async with RegistryServer(settings) as server, RegistryClient(server.address) as client:
        kept = await client.register(
            pb.PluginInfo(name="kept", type=pb.PLUGIN_TYPE_INGESTOR, sources=["kept"]),
            "127.0.0.1:1",
            labels=labels,
        )
        gone = await client.register(
            pb.PluginInfo(name="gone", type=pb.PLUGIN_TYPE_EMITTER), "127.0.0.1:2"
        )
        await client.unregister(gone.plugin_id)
        assert await client.heartbeat(kept.plugin_id)
        before = await client.get_plugin(kept.plugin_id)
        revision = (await client.stub.ListPlugins(pb.ListPluginsRequest())).revision
    assert revision >= 3

    async with RegistryServer(settings) as server, RegistryClient(server.address) as client:
        listed = await client.list_plugins()
        assert [p.plugin_id for p in listed] == [kept.plugin_id]
        after = await client.get_plugin(kept.plugin_id)
        assert after.info == before.info
        assert dict(after.labels) == labels
        assert after.registered_at == before.registered_at
        # The heartbeat was written by the final flush on stop.
        assert after.last_heartbeat_at == before.last_heartbeat_at
        assert after.last_heartbeat_at.ToDatetime() > after.registered_at.ToDatetime()
        assert (await client.stub.ListPlugins(pb.ListPluginsRequest())).revision >= revision
        assert await client.heartbeat(kept.plugin_id)
        assert not await client.heartbeat(gone.plugin_id)
        # Revisions go on from where they were.
        again = await client.register(
            pb.PluginInfo(name="again", type=pb.PLUGIN_TYPE_INGESTOR, sources=["again"]),
            "127.0.0.1:3",
        )
        assert (await client.get_plugin(again.plugin_id)).revision > revision


# -- lease and check fields, apart from the plugin row -------------------------------


def test_a_batch_keeps_touches_apart_and_a_full_upsert_wins():
    a, b = plugin("alpha"), plugin("beta")
    later = Lease(last_heartbeat_at=T0 + timedelta(seconds=9), last_error="slow")
    batch = Batch()
    batch.touch(a.plugin_id, later)
    assert batch.touches == {a.plugin_id: later}
    assert batch
    assert not batch.moves_revision  # registry_meta is not rewritten for it

    # An upsert after the touch carries its own (newer) lease: the touch goes.
    batch.upsert(a)
    assert batch.touches == {}
    assert batch.upserts == {a.plugin_id: a}
    # A touch after the upsert: still one full write, with the newer lease in it.
    batch.touch(a.plugin_id, later)
    assert batch.touches == {}
    assert batch.upserts[a.plugin_id] == dataclasses.replace(
        a, last_heartbeat_at=later.last_heartbeat_at, last_check_at=None, last_error="slow"
    )
    # A removal wins over both; a touch of a removed plugin stays unwritten.
    batch.touch(b.plugin_id, later)
    batch.remove(b.plugin_id)
    batch.touch(b.plugin_id, later)
    assert batch.touches == {}
    assert batch.removals == {b.plugin_id}


async def test_a_touch_writes_the_lease_and_moves_no_revision(store):
    a, b = plugin("alpha"), plugin("beta")
    first = Batch(revision=2)
    first.upsert(a)
    first.upsert(b)
    first.changes = [Change(1, upserted=(a,)), Change(2, upserted=(b,))]
    await store.write(first)

    checked = Lease(
        last_heartbeat_at=T0 + timedelta(seconds=30),
        last_check_at=T0 + timedelta(seconds=31),
        last_error="DEADLINE_EXCEEDED: no answer within 2s",
    )
    # A batch of touches alone carries a stale revision: it must not be written.
    touches = Batch(revision=0)
    touches.touch(a.plugin_id, checked)
    await store.write(touches)

    snapshot = await store.load()
    assert snapshot.revision == 2
    assert by_id(snapshot.plugins) == by_id(
        [
            dataclasses.replace(
                a,
                last_heartbeat_at=checked.last_heartbeat_at,
                last_check_at=checked.last_check_at,
                last_error=checked.last_error,
            ),
            b,
        ]
    )
    assert await store.load_history() == first.changes  # the change log is untouched


async def test_a_removal_takes_the_lease_with_it(store):
    a = plugin("alpha")
    batch = Batch(revision=1)
    batch.upsert(a)
    await store.write(batch)
    removal = Batch(revision=2)
    removal.remove(a.plugin_id)
    await store.write(removal)
    async with store.engine.connect() as conn:
        leases = (await conn.execute(text("SELECT COUNT(*) FROM plugin_leases"))).scalar()
    assert leases == 0
    assert (await store.load()).plugins == []


async def test_a_plugin_row_without_a_lease_loads_and_takes_a_touch(store):
    """A row written by hand (or by a tool) has no lease row: no heartbeat yet."""
    a = plugin("alpha", last_heartbeat_at=None, last_error="")
    batch = Batch(revision=1)
    batch.upsert(a)
    await store.write(batch)
    async with store.engine.begin() as conn:
        await conn.execute(text("DELETE FROM plugin_leases"))
    assert (await store.load()).plugins == [a]

    touch = Batch(revision=1)
    touch.touch(a.plugin_id, Lease(last_heartbeat_at=T0 + timedelta(seconds=3)))
    await store.write(touch)
    assert (await store.load()).plugins == [
        dataclasses.replace(a, last_heartbeat_at=T0 + timedelta(seconds=3))
    ]


# -- write failures, for the registry's own health ----------------------------------


async def test_a_failed_write_is_remembered_until_a_write_or_a_probe_succeeds(tmp_path):
    store = SqlStore.open(f"sqlite:///{tmp_path}/registry.db")
    try:
        await upgrade(store.engine)
        assert store.write_error is None
        refuse = ["INSERT", "UPDATE"]
        async with store.engine.begin() as conn:
            for op in refuse:  # every write ends in registry_meta, and so does the probe
                await conn.execute(
                    text(
                        f"CREATE TRIGGER no_{op.lower()} BEFORE {op} ON registry_meta "
                        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
                    )
                )
        batch = Batch(revision=1)
        batch.upsert(plugin("alpha"))
        with pytest.raises(StoreError):
            await store.write(batch)
        assert store.write_error is not None
        assert "disk is full" in str(store.write_error)
        await asyncio.wait_for(store.write_changed(), 5)  # it says so at once
        with pytest.raises(StoreError):
            await store.probe_write()
        assert store.write_error is not None

        async with store.engine.begin() as conn:
            for op in refuse:
                await conn.execute(text(f"DROP TRIGGER no_{op.lower()}"))
        await store.probe_write()
        assert store.write_error is None
        await asyncio.wait_for(store.write_changed(), 5)
        async with store.engine.connect() as conn:
            probed = (await conn.execute(text("SELECT probed_at FROM registry_meta"))).scalar()
        assert probed is not None  # the probe really wrote
        await store.write(batch)
        assert (await store.load()).revision == 1  # a probe never stores a revision of its own
    finally:
        await store.close()


async def test_a_probe_keeps_the_revision(store):
    batch = Batch(revision=7)
    batch.upsert(plugin("alpha"))
    await store.write(batch)
    await store.probe_write()
    await store.probe_write()
    assert (await store.load()).revision == 7


# -- the folder of an SQLite file ---------------------------------------------------


async def test_a_missing_folder_is_refused_and_not_created(tmp_path):
    folder = tmp_path / "typo" / "deeper"
    with pytest.raises(StoreError) as caught:
        SqlStore.open(f"sqlite:///{folder}/registry.db")
    assert str(caught.value) == f"database folder {folder} does not exist"
    assert not (tmp_path / "typo").exists()


async def test_a_folder_of_its_own_is_created(tmp_path):
    folder = tmp_path / "own" / "polku-registry"
    store = SqlStore.open(f"sqlite:///{folder}/registry.db", create_folder=True)
    try:
        await upgrade(store.engine)
    finally:
        await store.close()
    assert (folder / "registry.db").is_file()


async def test_the_default_database_creates_its_own_folder(tmp_path, monkeypatch):
    """``polku-registry serve`` with no --db on a fresh machine: the data folder is ours."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "fresh-home" / "share"))
    async with RegistryServer(RegistrySettings(listen="127.0.0.1:0")) as server:
        assert server.state.view.revision == 0
    assert (tmp_path / "fresh-home" / "share" / "polku-registry" / "registry.db").is_file()
