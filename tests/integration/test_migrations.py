"""The Alembic scripts against the typed tables, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from registry.migrate import alembic_config, upgrade
from registry.store import SqlStore
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
