"""The store's raw write path (``registry.storage.batch_sql``, ``registry.storage.sqlite_writer``).

A batch goes to the database without SQLAlchemy: one transaction, one statement per
table, what SQLAlchemy's tables read back; PostgreSQL's fence and NOTIFY inside it.
Real SQLite files under tmp_path and the run's PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.dialects import sqlite

from registry import StoreError
from registry.catalog import Claim, Owner, OwnershipChange
from registry.migrate import upgrade
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.storage.batch_sql import sqlite_time
from registry.storage.store import CHANGES_CHANNEL, Batch, Fenced, Lease, SqlStore
from registry.storage.tables import PluginRow
from registry.testing import eventually

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)  # no microseconds: still 6 decimals


def plugin(i: int, revision: int = 1, **fields: Any) -> Plugin:
    registration = Registration(
        name=f"p{i}",
        type=PluginType.INGESTOR,
        address="127.0.0.1:1",
        sources=(f"s{i}",),
        labels={"team": "edge", "ünï": "✓"},
    )
    values: dict[str, Any] = {
        "plugin_id": f"01J0000000000000000000{i:04d}",
        "registration": registration,
        "status": PluginStatus.UNKNOWN,
        "registered_at": T0,
        "last_heartbeat_at": T0 + timedelta(seconds=1),
        "revision": revision,
        "status_since": T0,
        **fields,
    }
    return Plugin(**values)


def registered(*plugins: Plugin, revision: int) -> Batch:
    batch = Batch(revision=revision)
    for p in plugins:
        batch.upsert(p)
    batch.changes.append(Change(revision=revision, upserted=plugins))
    return batch


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    opened = SqlStore.open(database_url)
    try:
        await upgrade(opened.engine)
        yield opened
    finally:
        await opened.close()


@pytest.mark.parametrize(
    "moment",
    [
        T0,
        datetime(2026, 3, 4, 8, 0, 0, 999999, tzinfo=timezone(timedelta(hours=3))),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    ],
)
def test_sqlite_times_are_the_text_sqlalchemy_stores(moment: datetime) -> None:
    bind = sqlite.DATETIME().bind_processor(sqlite.dialect())
    assert bind is not None
    assert sqlite_time(moment) == bind(moment.astimezone(UTC))


async def test_a_batch_is_one_transaction_of_one_statement_per_table(store: SqlStore) -> None:
    sent: list[tuple[str, int]] = []
    store.trace = lambda sql, rows: sent.append((sql.split(" (")[0], len(rows)))
    batch = registered(plugin(1), plugin(2), plugin(3), revision=1)
    batch.own(
        OwnershipChange(
            owners={"p1": Owner("p1", "team-a", T0)},
            claims={("source", "s1"): Claim("source", "s1", "team-a", "p1", T0)},
        )
    )
    await store.write(batch)
    store.trace = None
    names = [sql for sql, _ in sent]
    assert names[0].startswith("BEGIN")
    assert names[-1] == "COMMIT"
    if store.dialect == "postgresql":
        # Not replicated: neither fence nor NOTIFY.
        assert not any("registry_leader" in n or "pg_notify" in n for n in names)
    body = dict(sent[1:-1])
    assert body["INSERT INTO plugins"] == 3
    assert body["INSERT INTO plugin_leases"] == 3
    assert body["INSERT INTO changes"] == 1
    assert body["INSERT INTO owners"] == 1
    assert body["INSERT INTO claims"] == 1
    assert len(body) == len(sent) - 2  # each table once
    snapshot = await store.load()
    assert {p.plugin_id: p for p in snapshot.plugins} == {
        p.plugin_id: p for p in batch.upserts.values()
    }
    assert snapshot.owners == [Owner("p1", "team-a", T0)]
    assert (await store.load_history())[0].upserted == tuple(batch.upserts.values())


async def test_removals_touches_and_ownership_releases(store: SqlStore) -> None:
    first = registered(plugin(1), plugin(2), revision=1)
    first.own(OwnershipChange(owners={"p1": Owner("p1", "team-a", T0)}))
    first.own(OwnershipChange(claims={("source", "s1"): Claim("source", "s1", "a", "p1", T0)}))
    await store.write(first)
    later = Batch(revision=2)
    later.remove(plugin(1).plugin_id)
    later.touch(plugin(2).plugin_id, Lease(T0 + timedelta(seconds=9), T0, "refused"))
    later.changes.append(Change(revision=2, removed=(plugin(1),)))
    later.own(OwnershipChange(owners={"p1": None}, claims={("source", "s1"): None}))
    await store.write(later)
    snapshot = await store.load()
    (kept,) = snapshot.plugins
    assert kept.plugin_id == plugin(2).plugin_id
    assert (kept.last_heartbeat_at, kept.last_check_at, kept.last_error) == (
        T0 + timedelta(seconds=9),
        T0,
        "refused",
    )
    assert (snapshot.revision, snapshot.owners, snapshot.claims) == (2, [], [])


async def test_a_naive_time_is_a_store_error_and_writes_nothing(store: SqlStore) -> None:
    naive = plugin(1, registered_at=datetime(2026, 1, 1))
    with pytest.raises(StoreError, match="naive") as caught:
        await store.write(registered(naive, revision=1))
    assert isinstance(caught.value.__cause__, ValueError)
    assert store.write_error is caught.value
    assert (await store.load()).plugins == []
    await store.write(registered(plugin(2), revision=1))
    assert store.write_error is None


async def test_a_failed_batch_is_rolled_back_whole(store: SqlStore) -> None:
    await store.write(registered(plugin(1), revision=1))
    clash = registered(plugin(2, revision=2), revision=2)
    clash.changes.insert(0, Change(revision=1))  # revision 1 is stored: the INSERT fails
    with pytest.raises(StoreError):
        await store.write(clash)
    assert [p.plugin_id for p in (await store.load()).plugins] == [plugin(1).plugin_id]
    # The connection is still good for the next batch.
    await store.write(registered(plugin(3, revision=2), revision=2))
    assert len((await store.load()).plugins) == 2


async def test_the_sqlite_writer_opens_again_after_close(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    store = SqlStore.open(url)
    try:
        await upgrade(store.engine)
        await store.write(registered(plugin(1), revision=1))
        await store.close()
        await store.write(registered(plugin(2, revision=2), revision=2))
        assert (await store.load()).revision == 2
    finally:
        await store.close()


async def test_the_sqlite_writer_never_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    store = SqlStore.open(f"sqlite:///{path}")
    try:
        with pytest.raises(StoreError) as caught:
            await store.write(registered(plugin(1), revision=1))
        assert caught.value.__cause__ is not None
        assert not path.exists()
    finally:
        await store.close()


async def test_the_writer_keeps_the_pragmas_of_the_engine(tmp_path: Path) -> None:
    """WAL and synchronous=FULL: durable when the write returns (the engine's too)."""
    path = tmp_path / "r.db"
    store = SqlStore.open(f"sqlite:///{path}")
    try:
        await upgrade(store.engine)
        await store.write(registered(plugin(1), revision=1))
        writer = store._sqlite
        assert writer is not None
        conn = writer._conn
        assert conn is not None

        def read() -> list[Any]:
            return [
                conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous")
            ]

        # On the writer's own thread: the connection is that thread's alone.
        pragmas = await asyncio.get_running_loop().run_in_executor(writer._executor, read)
        assert pragmas == ["wal", 2]  # 2: FULL
    finally:
        await store.close()


async def test_an_in_memory_database_is_written_through_the_engine() -> None:
    store = SqlStore.open("sqlite:///:memory:")
    try:
        await upgrade(store.engine)
        await store.write(registered(plugin(1), revision=1))
        snapshot = await store.load()
        assert [p.plugin_id for p in snapshot.plugins] == [plugin(1).plugin_id]
        assert snapshot.revision == 1
    finally:
        await store.close()


# -- PostgreSQL: the leader fence and the replicas' wake-up (SPEC §8) -------------


class _Lease:
    def __init__(self, epoch: int, holder: str) -> None:
        self.epoch, self.holder = epoch, holder

    def holds(self) -> bool:
        return True


@pytest.mark.postgres
async def test_a_fenced_postgres_write_holds_the_epoch_and_notifies(pg_url: str) -> None:
    import asyncpg

    store = SqlStore.open(pg_url)
    listener = None
    try:
        await upgrade(store.engine)
        async with store.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO registry_leader (id, epoch, holder, address, expires_at) "
                    "VALUES (1, 7, 'me', '127.0.0.1:1', now() + interval '1 hour') "
                    "ON CONFLICT (id) DO UPDATE SET epoch = 7, holder = 'me', "
                    "expires_at = excluded.expires_at"
                )
            )
        listener = await asyncpg.connect(pg_url)
        heard: list[str] = []
        await listener.add_listener(CHANGES_CHANNEL, lambda *args: heard.append(args[-1]))
        store.replicated = True
        store.fence = _Lease(6, "me")  # an epoch that is over
        with pytest.raises(Fenced):
            await store.write(registered(plugin(1), revision=1))
        assert (await store.load()).plugins == []
        store.fence = _Lease(7, "me")
        await store.write(registered(plugin(2), revision=1))
        await eventually(lambda: heard == ["1"], what=lambda: f"NOTIFY payloads {heard}")
        async with store.engine.connect() as conn:
            epochs = (await conn.execute(text("SELECT epoch FROM changes"))).scalars().all()
            names = (await conn.execute(select(PluginRow.name))).scalars().all()
        assert (epochs, names) == ([7], ["p2"])
    finally:
        if listener is not None:
            await listener.close()
        await store.close()
