"""The Alembic scripts against the typed tables, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from registry.migrate import alembic_config, upgrade
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.store import Batch, SqlStore
from registry.tables import Base


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


def registered(name: str, revision: int) -> Plugin:
    moment = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    return Plugin(
        plugin_id=f"01J0000000000000000000000{revision}",
        registration=Registration(
            name=name, type=PluginType.INGESTOR, address=f"{name}:1", sources=(name,)
        ),
        status=PluginStatus.HEALTHY,
        registered_at=moment,
        revision=revision,
        status_since=moment,
    )


async def test_a_database_at_0002_upgrades_in_place_and_back(database_url: str):
    """The ownership tables come and go; plugins, revision and change log stay."""
    store = SqlStore.open(database_url)
    try:
        await to_revision(store.engine, "upgrade", "0002")
        assert await versions(store.engine) == [("0002",)]
        kept, gone = registered("kept", 1), registered("gone", 2)
        batch = Batch(revision=3)  # what a registry at 0002 wrote: no ownership
        batch.upsert(kept)
        batch.changes = [
            Change(1, upserted=(kept,)),
            Change(2, upserted=(gone,)),
            Change(3, removed=(gone,)),
        ]
        await store.write(batch)

        await upgrade(store.engine)
        assert await versions(store.engine) == [(head(),)]
        snapshot = await store.load()
        assert snapshot.plugins == [kept]
        assert snapshot.revision == 3
        assert (snapshot.owners, snapshot.claims) == ([], [])
        assert await store.load_history() == batch.changes
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
        assert await store.load_history() == batch.changes

        await upgrade(store.engine)  # and up again, over the same rows
        assert (await store.load()).plugins == [kept]
    finally:
        await store.close()
