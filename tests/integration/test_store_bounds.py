"""A heartbeat or a health result writes the lease and check fields, never the plugin row.

SPEC §7 "Cost grows with work, not with size". The SQL the registry sends is watched
on the real store (its raw writer's ``trace``, and SQLAlchemy's ``before_cursor_execute``
on its engine for anything sent through it): the statements
that store a heartbeat or a health result name ``plugin_leases`` alone, never
``plugins`` nor its labels, and bind a few bytes per plugin, a small fraction of what
registering the same plugin binds. A registration (a full upsert) still writes it all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.client import RegistryClient
from registry.migrate import upgrade
from registry.model import Plugin, PluginStatus, PluginType, Registration
from registry.server import RegistryServer
from registry.storage.store import Batch, Lease, SqlStore
from registry.testing import FakePlugin, eventually, running_registry
from registry.wire import pb

DEADLINE = 30.0
# As large as the default limits allow: 32 labels of 256 characters.
LABELS = {f"label-{i:02d}": "v" * 256 for i in range(32)}
LABEL_BYTES = sum(len(k) + len(v) for k, v in LABELS.items())
_WRITE = re.compile(r'^\s*(?:INSERT INTO|UPDATE|DELETE FROM)\s+"?(\w+)"?', re.IGNORECASE)


@dataclass
class Statement:
    sql: str
    parameters: Any

    @property
    def table(self) -> str | None:
        match = _WRITE.match(self.sql)
        return match.group(1).lower() if match else None

    @property
    def rows(self) -> list[Any]:
        many = isinstance(self.parameters, list) and (
            not self.parameters or isinstance(self.parameters[0], (dict, tuple, list))
        )
        return list(self.parameters) if many else [self.parameters]

    @property
    def bound_bytes(self) -> int:
        """What the statement carries: text and bytes by length, anything else as 8."""
        total = 0
        for value in self.values():
            if isinstance(value, str):
                total += len(value.encode())
            elif isinstance(value, bytes):
                total += len(value)
            else:
                total += 8
        return total

    def values(self) -> Iterator[Any]:
        for row in self.rows:
            yield from row.values() if isinstance(row, dict) else row

    def binds(self, value: object) -> bool:
        return any(v == value for v in self.values())

    def mentions(self, fragment: str) -> bool:
        """Whether a bound text holds ``fragment`` (labels travel as JSON text)."""
        return any(fragment in v for v in self.values() if isinstance(v, str))


@dataclass
class Recorder:
    statements: list[Statement] = field(default_factory=list)

    @property
    def writes(self) -> list[Statement]:
        return [s for s in self.statements if s.table is not None]

    def tables(self) -> set[str]:
        return {s.table for s in self.writes if s.table is not None}

    def clear(self) -> None:
        self.statements.clear()


@contextmanager
def recording(store: SqlStore) -> Iterator[Recorder]:
    """Every statement ``store`` sends, with its bound parameters."""
    recorder = Recorder()

    def before(conn: Any, cursor: Any, sql: str, parameters: Any, *args: Any) -> None:
        recorder.statements.append(Statement(sql, parameters))

    def sent(sql: str, rows: Any) -> None:
        recorder.statements.append(Statement(sql, list(rows)))

    event.listen(store.engine.sync_engine, "before_cursor_execute", before)
    store.trace = sent
    try:
        yield recorder
    finally:
        store.trace = None
        event.remove(store.engine.sync_engine, "before_cursor_execute", before)


def store_of(server: RegistryServer) -> SqlStore:
    store = server.state.store
    assert isinstance(store, SqlStore)
    return store


def engine_of(server: RegistryServer) -> AsyncEngine:
    return store_of(server).engine


def info(name: str) -> pb.PluginInfo:
    return pb.PluginInfo(
        name=name, type=pb.PLUGIN_TYPE_INGESTOR, sources=[name], description="d" * 1000
    )


async def stored_lease(engine: AsyncEngine, plugin_id: str) -> tuple[Any, ...] | None:
    """The lease row as another connection reads it from the database."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT last_heartbeat_at, last_check_at, last_error FROM plugin_leases "
                    "WHERE plugin_id = :id"
                ),
                {"id": plugin_id},
            )
        ).first()
    return tuple(row) if row is not None else None


def assert_lease_only(recorder: Recorder, plugin_id: str) -> None:
    writes = recorder.writes
    assert writes, recorder.statements
    assert recorder.tables() == {"plugin_leases"}, [s.sql for s in writes]
    for statement in writes:
        assert "labels" not in statement.sql
        assert "sources" not in statement.sql
        assert not statement.mentions(LABELS["label-00"])
    assert any(s.binds(plugin_id) for s in writes)


async def test_a_registration_writes_the_whole_row_and_a_heartbeat_only_its_lease(
    tmp_path: Path,
) -> None:
    async with (
        running_registry(tmp_path, flush_interval=0.05, health_interval=3600.0) as server,
        RegistryClient(server.address) as client,
    ):
        engine = engine_of(server)
        with recording(store_of(server)) as registered:
            # Nothing listens on port 1: the first check fails, which changes no status.
            plugin_id = (
                await client.register(
                    info("big"), "127.0.0.1:1", labels=LABELS, lease_ttl_seconds=60
                )
            ).plugin_id
        upserts = [s for s in registered.writes if s.table == "plugins"]
        assert len(upserts) == 1
        assert "labels" in upserts[0].sql
        assert upserts[0].binds(plugin_id)
        assert upserts[0].mentions(LABELS["label-00"])
        assert "plugin_leases" in registered.tables()  # its lease row, in the same commit
        full = sum(s.bound_bytes for s in registered.writes if s.table == "plugins")
        assert full > LABEL_BYTES

        # The first check's result is stored lazily; then nothing else is due.
        await eventually(
            lambda: _checked(engine, plugin_id), within=DEADLINE, what="the first check stored"
        )
        with recording(store_of(server)) as beat:
            assert await client.heartbeat(plugin_id)
            renewed = server.state.catalog.get(plugin_id)
            assert renewed is not None
            beat_at = renewed.last_heartbeat_at
            assert beat_at is not None
            await eventually(
                lambda: _stored_at(engine, plugin_id, beat_at),
                within=DEADLINE,
                what="the heartbeat flushed",
            )
        assert_lease_only(beat, plugin_id)
        lease_bytes = sum(s.bound_bytes for s in beat.writes)
        assert lease_bytes * 20 < full, (lease_bytes, full)


async def test_a_health_result_writes_only_the_lease(tmp_path: Path) -> None:
    """A passing check that changes nothing writes nothing; a failing one below the
    threshold (its error is new) writes the lease row alone, never the plugin's row."""
    async with (
        FakePlugin(sources=["checked"]) as plugin,
        running_registry(
            tmp_path, flush_interval=0.05, health_interval=0.05, unhealthy_threshold=1000
        ) as server,
        RegistryClient(server.address) as client,
    ):
        engine = engine_of(server)
        plugin_id = (
            await client.register(info("checked"), plugin.address, labels=LABELS, no_lease=True)
        ).plugin_id
        await eventually(
            lambda: _status(server, plugin_id) is PluginStatus.HEALTHY,
            within=DEADLINE,
            what="HEALTHY",
        )
        with recording(store_of(server)) as passing:
            calls = plugin.health_calls
            await eventually(
                lambda: plugin.health_calls >= calls + 3, within=DEADLINE, what="3 more checks"
            )
            await server.state.flush()
        assert not [s for s in passing.writes if s.binds(plugin_id)], passing.statements
        with recording(store_of(server)) as failing:
            plugin.healthy = False
            await eventually(
                lambda: _error(server, plugin_id) != "", within=DEADLINE, what="a failed check"
            )
            checked = server.state.catalog.get(plugin_id)
            assert checked is not None
            checked_at = checked.last_check_at
            assert checked_at is not None
            await eventually(
                lambda: _stored_check(engine, plugin_id, checked_at),
                within=DEADLINE,
                what="the failed check stored",
            )
        assert _status(server, plugin_id) is PluginStatus.HEALTHY  # below the threshold
        assert_lease_only(failing, plugin_id)
        lease = await stored_lease(engine, plugin_id)
        assert lease is not None
        assert lease[2]


def _error(server: RegistryServer, plugin_id: str) -> str:
    plugin = server.state.catalog.get(plugin_id)
    return plugin.last_error if plugin is not None else ""


async def test_a_store_touch_is_one_narrow_statement(database_url: str) -> None:
    """At the store: a batch of touches is one statement on plugin_leases, both databases."""
    store = SqlStore.open(database_url)
    try:
        await upgrade(store.engine)
        t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        plugins = [
            Plugin(
                plugin_id=f"01J00000000000000000000{i:03d}",
                registration=Registration(
                    name=f"p{i}", type=PluginType.INGESTOR, address="127.0.0.1:1", labels=LABELS
                ),
                status=PluginStatus.HEALTHY,
                registered_at=t0,
                revision=1,
            )
            for i in range(100)
        ]
        first = Batch(revision=1)
        for p in plugins:
            first.upsert(p)
        with recording(store) as full:
            await store.write(first)
        touches = Batch(revision=1)
        for p in plugins:
            touches.touch(p.plugin_id, Lease(last_heartbeat_at=t0 + timedelta(seconds=5)))
        with recording(store) as touched:
            await store.write(touches)
        assert [s.table for s in touched.writes] == ["plugin_leases"]
        assert len(touched.writes[0].rows) == 100
        assert "labels" not in touched.writes[0].sql
        assert {"plugins", "plugin_leases", "registry_meta"} <= full.tables()
        assert sum(s.bound_bytes for s in touched.writes) * 50 < sum(
            s.bound_bytes for s in full.writes
        )
        loaded = {p.plugin_id: p for p in (await store.load()).plugins}
        assert {p.last_heartbeat_at for p in loaded.values()} == {t0 + timedelta(seconds=5)}
        assert {dict(p.registration.labels) == LABELS for p in loaded.values()} == {True}
    finally:
        await store.close()


def _status(server: RegistryServer, plugin_id: str) -> PluginStatus | None:
    plugin = server.state.view.get(plugin_id)
    return plugin.status if plugin is not None else None


async def _checked(engine: AsyncEngine, plugin_id: str) -> bool:
    lease = await stored_lease(engine, plugin_id)
    return lease is not None and lease[1] is not None


async def _stored_at(engine: AsyncEngine, plugin_id: str, moment: datetime) -> bool:
    lease = await stored_lease(engine, plugin_id)
    return lease is not None and _same(lease[0], moment)


async def _stored_check(engine: AsyncEngine, plugin_id: str, moment: datetime) -> bool:
    # At or after: a later check may replace this one in memory before the lazy flush.
    lease = await stored_lease(engine, plugin_id)
    return lease is not None and lease[1] is not None and _at_or_after(lease[1], moment)


def _at_or_after(stored: Any, moment: datetime) -> bool:
    if isinstance(stored, str):
        stored = datetime.fromisoformat(stored).replace(tzinfo=UTC)
    return bool(stored >= moment)


def _same(stored: Any, moment: datetime) -> bool:
    """A raw SELECT gives SQLite's text or PostgreSQL's aware datetime."""
    if isinstance(stored, str):
        stored = datetime.fromisoformat(stored).replace(tzinfo=UTC)
    return bool(stored == moment)
