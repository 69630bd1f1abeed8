"""Migration 0005 (replicas) over a database written at 0004, on SQLite and PostgreSQL:
nothing is lost going up or coming back down."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import JSON, column, inspect, select, table, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.catalog import Claim, Owner
from registry.migrate import alembic_config, upgrade
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.replica.election import Election, new_holder_id
from registry.storage.store import Batch, SqlStore, _json_row
from registry.storage.tables import LeaderRow

MOMENT = datetime(2026, 11, 30, 12, 0, 1, 250000, tzinfo=UTC)
# The change log as 0004 has it: no epoch.
CHANGES_AT_0004 = table(
    "changes", column("revision"), column("upserted", JSON), column("removed", JSON)
)
NEW_TABLES = {"registry_leader", "registry_replicas"}


def plugin(name: str, revision: int, **changes: Any) -> Plugin:
    base = Plugin(
        plugin_id=f"01J5{revision:022d}",
        registration=Registration(
            name=name,
            type=PluginType.INGESTOR,
            address=f"{name}.svc:50051",
            sources=(f"{name}-src",),
            labels={"team": "edge"},
            lease_ttl_seconds=30,
        ),
        status=PluginStatus.HEALTHY,
        registered_at=MOMENT,
        last_heartbeat_at=MOMENT,
        revision=revision,
        status_since=MOMENT,
    )
    return dataclasses.replace(base, **changes)


async def to_revision(engine: AsyncEngine, action: str, revision: str) -> None:
    """``alembic upgrade|downgrade REVISION`` on a connection of ``engine``."""

    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def version(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        return str(await conn.scalar(text("SELECT version_num FROM alembic_version")))


def head() -> str:
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None
    return revision


async def tables_and_change_columns(engine: AsyncEngine) -> tuple[set[str], set[str]]:
    def read(connection: Connection) -> tuple[set[str], set[str]]:
        inspector = inspect(connection)
        columns = {c["name"] for c in inspector.get_columns("changes")}
        return set(inspector.get_table_names()), columns

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def change_rows(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(CHANGES_AT_0004).order_by(CHANGES_AT_0004.c.revision))
        return [tuple(r) for r in rows]


async def write_at_0004(store: SqlStore, plugins: list[Plugin], changes: list[Change]) -> None:
    """What a registry of 0004 stored: plugins with leases, ownership, the change log."""
    batch = Batch(revision=max(c.revision for c in changes))
    for p in plugins:
        batch.upsert(p)
    batch.owners = {p.name: Owner(p.name, "team-a", MOMENT) for p in plugins}
    batch.claims = {
        ("source", s): Claim("source", s, "team-a", p.name, MOMENT)
        for p in plugins
        for s in p.registration.sources
    }
    await store.write(batch)  # no changes in it: nothing touches the epoch column
    rows = [
        {
            "revision": c.revision,
            "upserted": [_json_row(p) for p in c.upserted],
            "removed": [_json_row(p) for p in c.removed],
        }
        for c in changes
    ]
    async with store.engine.begin() as conn:
        await conn.execute(CHANGES_AT_0004.insert(), rows)


async def test_a_database_at_0004_upgrades_to_0005_and_back_keeping_its_rows(
    database_url: str,
) -> None:
    kept, gone = plugin("kept", 1), plugin("gone", 2)
    healthy_again = dataclasses.replace(kept, revision=4, status=PluginStatus.HEALTHY)
    changes = [
        Change(1, upserted=(kept,)),
        Change(2, upserted=(gone,)),
        Change(3, removed=(gone,)),
        Change(4, upserted=(healthy_again,)),
    ]
    store = SqlStore.open(database_url)
    try:
        await to_revision(store.engine, "upgrade", "0004")
        assert await version(store.engine) == "0004"
        await write_at_0004(store, [healthy_again], changes)
        before = await store.load()
        log_before = await change_rows(store.engine)
        assert len(log_before) == 4

        await upgrade(store.engine)
        assert await version(store.engine) == head()
        after = await store.load()
        assert after.plugins == before.plugins == [healthy_again]
        assert after.revision == 4
        assert (after.owners, after.claims) == (before.owners, before.claims)
        assert len(after.owners) == 1
        assert len(after.claims) == 1
        assert await store.load_history() == changes
        async with store.engine.connect() as conn:
            epochs = (await conn.execute(text("SELECT revision, epoch FROM changes"))).all()
            leader = (await conn.execute(select(*LeaderRow.__table__.columns))).all()
            replicas = await conn.scalar(text("SELECT COUNT(*) FROM registry_replicas"))
        assert sorted(tuple(r) for r in epochs) == [(1, 0), (2, 0), (3, 0), (4, 0)]
        assert [tuple(r)[:4] for r in leader] == [(1, 0, "", "")]  # one row, held by nobody
        assert leader[0].expires_at < datetime.now(UTC)  # free from the start
        assert replicas == 0

        if store.dialect == "postgresql":
            # Free, so the first replica takes it at its first round, as epoch 1.
            election = Election(
                store.engine,
                holder=new_holder_id(),
                address="10.0.0.1:50051",
                lease=60.0,
                on_elected=_elected,
                on_deposed=_deposed,
            )
            await election.campaign_once()
            assert election.leading
            assert election.epoch == 1
            await election.stop()

        await to_revision(store.engine, "downgrade", "0004")
        assert await version(store.engine) == "0004"
        tables, columns = await tables_and_change_columns(store.engine)
        assert not tables & NEW_TABLES
        assert "epoch" not in columns
        assert await change_rows(store.engine) == log_before
        back = await store.load()
        assert back.plugins == before.plugins
        assert (back.revision, back.owners, back.claims) == (4, before.owners, before.claims)

        await upgrade(store.engine)  # and up again over the same rows
        tables, columns = await tables_and_change_columns(store.engine)
        assert tables >= NEW_TABLES
        assert "epoch" in columns
        assert await store.load_history() == changes
    finally:
        await store.close()


async def test_a_fresh_database_gets_the_free_leader_row(database_url: str) -> None:
    store = SqlStore.open(database_url)
    try:
        await upgrade(store.engine)
        async with store.engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, epoch, holder FROM registry_leader"))).all()
        assert [tuple(r) for r in rows] == [(1, 0, "")]
    finally:
        await store.close()


async def _elected(_: object) -> None:
    return None


async def _deposed() -> None:
    return None
