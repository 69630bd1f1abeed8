"""The Alembic scripts against the typed tables, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import JSON, column, inspect, select, table, text
from sqlalchemy.engine import Connection

from registry.errors import StoreError
from registry.migrate import alembic_config, upgrade
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.storage.store import Batch, Lease, SqlStore, _json_row
from registry.storage.tables import Base, UtcDateTime


@pytest.fixture
async def engine(database_url: str):
    store = SqlStore.open(database_url)
    try:
        yield store.engine
    finally:
        await store.close()


def differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "render_as_batch": connection.dialect.name == "sqlite",
        },
    )
    return list(compare_metadata(context, Base.metadata))


def head() -> str:
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None
    return revision


def schema(connection: Connection) -> dict[str, Any]:
    inspector = inspect(connection)
    return {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            sorted(i["name"] or "" for i in inspector.get_indexes(table)),
            inspector.get_pk_constraint(table)["constrained_columns"],
        )
        for table in sorted(inspector.get_table_names())
    }


async def test_autogenerate_finds_no_difference_from_head(engine):
    await upgrade(engine)
    async with engine.connect() as conn:
        found = await conn.run_sync(differences)
    assert found == []


async def test_an_empty_database_differs(engine):
    """The comparison itself works: before any migration everything is missing."""
    async with engine.connect() as conn:
        found = await conn.run_sync(differences)
    added = {d[1].name for d in found if d[0] == "add_table"}
    assert added == set(Base.metadata.tables)


async def test_upgrading_twice_is_a_no_op(engine):
    await upgrade(engine)
    async with engine.connect() as conn:
        first = await conn.run_sync(schema)
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    await upgrade(engine)
    async with engine.connect() as conn:
        assert await conn.run_sync(schema) == first
        assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).all() == (
            version
        )
    assert version == [(head(),)]
    assert set(first) == set(Base.metadata.tables) | {"alembic_version"}


async def test_upgrade_keeps_data(engine):
    await upgrade(engine)
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO registry_meta (id, revision) VALUES (1, 42)"))
    await upgrade(engine)
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT revision FROM registry_meta"))).scalar() == 42


async def to_revision(engine, action: str, revision: str) -> None:
    """``alembic upgrade|downgrade REVISION`` on a connection of ``engine``."""

    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def versions(engine) -> list[tuple[str]]:
    async with engine.connect() as conn:
        return [
            tuple(r) for r in await conn.execute(text("SELECT version_num FROM alembic_version"))
        ]


def registered(name: str, revision: int, **changes: Any) -> Plugin:
    moment = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    plugin = Plugin(
        plugin_id=f"01J0000000000000000000000{revision}",
        registration=Registration(
            name=name,
            type=PluginType.INGESTOR,
            address=f"{name}:1",
            sources=(name,),
            labels={"team": "edge", "zone": "eu-1"},
        ),
        status=PluginStatus.HEALTHY,
        registered_at=moment,
        revision=revision,
        status_since=moment,
    )
    return dataclasses.replace(plugin, **changes)


# The plugins table as revisions 0001-0003 had it: lease and check fields in the row.
OLD_PLUGINS = table(
    "plugins",
    *(column(name) for name in ("plugin_id", "name", "type", "address", "version")),
    *(column(name) for name in ("description", "emitter_name", "lease_ttl_seconds", "status")),
    *(column(name, JSON) for name in ("sources", "capabilities", "labels")),
    column("last_error"),
    column("revision"),
    *(column(name, UtcDateTime) for name in ("registered_at", "status_since")),
    *(column(name, UtcDateTime) for name in ("last_heartbeat_at", "last_check_at")),
)
CHANGES = table("changes", column("revision"), column("upserted", JSON), column("removed", JSON))


async def write_old(engine, revision: int, plugins: list[Plugin], changes: list[Change]) -> None:
    """Store what a registry at 0002 or 0003 wrote (no ownership), through its own schema."""
    rows = []
    for p in plugins:
        reg = p.registration
        rows.append(
            {
                "plugin_id": p.plugin_id,
                "name": reg.name,
                "type": int(reg.type),
                "address": reg.address,
                "version": reg.version,
                "description": reg.description,
                "emitter_name": reg.emitter_name,
                "lease_ttl_seconds": reg.lease_ttl_seconds,
                "status": int(p.status),
                "sources": list(reg.sources),
                "capabilities": list(reg.capabilities),
                "labels": dict(reg.labels),
                "last_error": p.last_error,
                "revision": p.revision,
                "registered_at": p.registered_at,
                "status_since": p.status_since,
                "last_heartbeat_at": p.last_heartbeat_at,
                "last_check_at": p.last_check_at,
            }
        )
    log = [
        {
            "revision": c.revision,
            "upserted": [_json_row(p) for p in c.upserted],
            "removed": [_json_row(p) for p in c.removed],
        }
        for c in changes
    ]
    async with engine.begin() as conn:
        if rows:
            await conn.execute(OLD_PLUGINS.insert(), rows)
        if log:
            await conn.execute(CHANGES.insert(), log)
        await conn.execute(
            text("INSERT INTO registry_meta (id, revision) VALUES (1, :revision)"),
            {"revision": revision},
        )


async def old_leases(engine) -> dict[str, tuple[Any, ...]]:
    """The lease and check fields as the plugins table of 0003 holds them."""
    query = select(
        OLD_PLUGINS.c.plugin_id,
        OLD_PLUGINS.c.last_heartbeat_at,
        OLD_PLUGINS.c.last_check_at,
        OLD_PLUGINS.c.last_error,
    )
    async with engine.connect() as conn:
        return {row[0]: tuple(row[1:]) for row in await conn.execute(query)}


async def test_a_database_at_0002_upgrades_in_place_and_back(database_url: str):
    """The ownership tables come and go; plugins, revision and change log stay."""
    store = SqlStore.open(database_url)
    try:
        await to_revision(store.engine, "upgrade", "0002")
        assert await versions(store.engine) == [("0002",)]
        kept, gone = registered("kept", 1), registered("gone", 2)
        changes = [
            Change(1, upserted=(kept,)),
            Change(2, upserted=(gone,)),
            Change(3, removed=(gone,)),
        ]
        await write_old(store.engine, 3, [kept], changes)

        await upgrade(store.engine)
        assert await versions(store.engine) == [(head(),)]
        snapshot = await store.load()
        assert snapshot.plugins == [kept]
        assert snapshot.revision == 3
        assert (snapshot.owners, snapshot.claims) == ([], [])
        assert await store.load_history() == changes
        async with store.engine.connect() as conn:
            assert await conn.run_sync(differences) == []

        await to_revision(store.engine, "downgrade", "0002")
        assert await versions(store.engine) == [("0002",)]
        async with store.engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            meta = (await conn.execute(text("SELECT revision FROM registry_meta"))).scalar()
            plugins = (await conn.execute(text("SELECT plugin_id FROM plugins"))).all()
        assert tables == {"alembic_version", "plugins", "registry_meta", "changes"}
        assert meta == 3
        assert plugins == [(kept.plugin_id,)]
        assert await store.load_history() == changes

        await upgrade(store.engine)  # and up again, over the same rows
        assert (await store.load()).plugins == [kept]
    finally:
        await store.close()


async def test_a_database_at_0003_moves_leases_out_of_the_plugin_rows_and_back(
    database_url: str,
):
    """0004 moves heartbeat, check and error into plugin_leases and back, losing nothing."""
    moment = datetime(2026, 5, 6, 7, 9, 10, 654321, tzinfo=UTC)
    fresh = registered("fresh", 1)  # never heartbeated nor checked
    beating = registered("beating", 2, last_heartbeat_at=moment)
    failing = registered(
        "failing",
        3,
        status=PluginStatus.UNHEALTHY,
        last_heartbeat_at=moment,
        last_check_at=moment,
        last_error="UNAVAILABLE: unreachable, or not a gRPC server",
    )
    plugins = [fresh, beating, failing]
    store = SqlStore.open(database_url)
    try:
        await to_revision(store.engine, "upgrade", "0003")
        async with store.engine.connect() as conn:
            at_0003 = unordered(await conn.run_sync(schema))
        await write_old(store.engine, 3, plugins, [Change(3, upserted=tuple(plugins))])
        before = await old_leases(store.engine)
        assert before[failing.plugin_id] == (moment, moment, failing.last_error)

        await upgrade(store.engine)
        assert await versions(store.engine) == [(head(),)]
        snapshot = await store.load()
        assert {p.plugin_id: p for p in snapshot.plugins} == {p.plugin_id: p for p in plugins}
        assert snapshot.revision == 3
        async with store.engine.connect() as conn:
            columns = {c["name"] for c in await conn.run_sync(plugin_columns)}
            leases = (await conn.execute(text("SELECT COUNT(*) FROM plugin_leases"))).scalar()
            assert await conn.run_sync(differences) == []
        assert not columns & {"last_heartbeat_at", "last_check_at", "last_error"}
        assert leases == 3

        # A heartbeat written at head comes back down with the row.
        later = moment.replace(second=30)
        touch = Batch(revision=3)
        touch.touch(beating.plugin_id, Lease(last_heartbeat_at=later))
        await store.write(touch)

        await to_revision(store.engine, "downgrade", "0003")
        assert await versions(store.engine) == [("0003",)]
        async with store.engine.connect() as conn:
            # The same columns, types and nullability; restored ones come last.
            assert unordered(await conn.run_sync(schema)) == at_0003
        after = await old_leases(store.engine)
        assert after == {**before, beating.plugin_id: (later, None, "")}

        await upgrade(store.engine)  # and up again, over the same rows
        reloaded = {p.plugin_id: p for p in (await store.load()).plugins}
        assert reloaded[failing.plugin_id] == failing
        assert reloaded[beating.plugin_id].last_heartbeat_at == later
    finally:
        await store.close()


def unordered(tables: dict[str, Any]) -> dict[str, Any]:
    return {name: (sorted(columns), *rest) for name, (columns, *rest) in tables.items()}


def plugin_columns(connection: Connection) -> list[Any]:
    return inspect(connection).get_columns("plugins")


# -- databases that are not this registry's ----------------------------------------


async def refused(engine, *statements: str) -> str:
    """Run ``statements``, then the migration, which must refuse; the one-line reason."""
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))
    with pytest.raises(StoreError) as caught:
        await upgrade(engine)
    message = str(caught.value)
    assert "\n" not in message
    async with engine.connect() as conn:  # and nothing of ours was created
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    assert not tables & {"plugin_leases", "owners", "claims", "changes"}
    return message


async def test_a_database_of_another_application_is_refused(engine):
    message = await refused(
        engine,
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total INTEGER)",
        "CREATE TABLE customers (id INTEGER PRIMARY KEY)",
    )
    assert "is not a polku-registry database" in message
    assert "customers, invoices" in message
    assert "no alembic_version" in message


async def test_an_unknown_schema_revision_is_refused(engine):
    message = await refused(
        engine,
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)",
        "INSERT INTO alembic_version VALUES ('ae1027a6acf')",
        "CREATE TABLE plugins (id INTEGER PRIMARY KEY)",
    )
    assert "is not a polku-registry database" in message
    assert "'ae1027a6acf'" in message


async def test_a_foreign_database_at_a_revision_we_know_is_refused(engine):
    """Another application whose Alembic revisions are also named 0001."""
    message = await refused(
        engine,
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)",
        "INSERT INTO alembic_version VALUES ('0001')",
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY)",
    )
    assert "is not a polku-registry database" in message
    assert "no plugins, registry_meta table" in message


async def test_a_database_migrated_down_to_nothing_is_migrated_again(engine):
    await upgrade(engine)
    await to_revision(engine, "downgrade", "base")
    await upgrade(engine)
    assert await versions(engine) == [(head(),)]


async def test_a_zero_length_sqlite_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "registry.db"
    path.touch()
    store = SqlStore.open(f"sqlite:///{path}")
    try:
        with pytest.raises(StoreError) as caught:
            await upgrade(store.engine)
    finally:
        await store.close()
    assert str(caught.value).startswith(f"database {path} is empty but exists: refusing to start")
    assert path.stat().st_size == 0


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "registry.db"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a database" * 100)
    store = SqlStore.open(f"sqlite:///{path}")
    try:
        with pytest.raises(StoreError) as caught:
            await upgrade(store.engine)
    finally:
        await store.close()
    assert str(caught.value) == (
        f"database {path} is not a polku-registry database (the file is not an SQLite database)"
    )
