"""A :class:`~registry.storage.store.Batch` as SQL on the raw driver: rows, statements, order.

Part of the store (``registry.storage.store``): the write path of a group commit, without
SQLAlchemy. Per statement, SQLAlchemy Core and the async adapters cost far more than
the database does (bench/RESULTS.md); here a batch is turned into plain tuples once,
and each table gets one ``executemany`` of one hand-written statement, on sqlite3
(:mod:`registry.storage.sqlite_writer`, one hop to its thread) or on asyncpg
(:func:`write_postgres`). What is stored is exactly what the SQLAlchemy tables
(``registry.storage.tables``) read back: SQLite times as naive UTC text, PostgreSQL times
as ``timestamptz``, JSON columns as JSON text.

The statements and their order are one list (:func:`statements`) for both databases;
PostgreSQL adds the leader fence first and the replicas' NOTIFY (SPEC §8).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from registry.model import Plugin

if TYPE_CHECKING:
    from registry.storage.store import Batch

Dialect = Literal["sqlite", "postgresql"]
# Told of every statement a raw writer sends, with its rows, BEGIN and COMMIT
# included (tests watch the SQL and the transactions).
Tracer = Callable[[str, Sequence[Sequence[Any]]], None]

_ZERO = timedelta(0)
_dumps = json.JSONEncoder().encode  # json.dumps' defaults, without its per-call lookup


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a batch and the rows it is executed with (one per row)."""

    sql: str
    rows: list[tuple[Any, ...]]


def sqlite_time(moment: datetime | None) -> str | None:
    """A UTC time as SQLAlchemy stores it in SQLite: naive text, always 6 decimals.

    Raises:
        ValueError: ``moment`` is naive (the tables hold UTC-aware times only).
    """
    if moment is None:
        return None
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError("naive datetime given for a UTC column")
    if offset != _ZERO:
        moment = moment.astimezone(UTC)
    # "YYYY-MM-DD HH:MM:SS.ffffff+00:00" less its offset: no naive copy to make.
    return moment.isoformat(" ", "microseconds")[:-6]


def postgres_time(moment: datetime | None) -> datetime | None:
    """A UTC time for asyncpg's ``timestamptz``.

    Raises:
        ValueError: ``moment`` is naive.
    """
    if moment is None:
        return None
    if moment.utcoffset() is None:
        raise ValueError("naive datetime given for a UTC column")
    return moment


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def change_entry(plugin: Plugin) -> dict[str, Any]:
    """A plugin as the change log stores it: every field, times as ISO 8601 text."""
    reg = plugin.registration
    return {
        "plugin_id": plugin.plugin_id,
        "name": reg.name,
        "type": int(reg.type),
        "address": reg.address,
        "version": reg.version,
        "description": reg.description,
        "sources": list(reg.sources),
        "emitter_name": reg.emitter_name,
        "capabilities": list(reg.capabilities),
        "labels": dict(reg.labels),
        "lease_ttl_seconds": reg.lease_ttl_seconds,
        "status": int(plugin.status),
        "last_error": plugin.last_error,
        "registered_at": _iso(plugin.registered_at),
        "last_heartbeat_at": _iso(plugin.last_heartbeat_at),
        "last_check_at": _iso(plugin.last_check_at),
        "revision": plugin.revision,
        "status_since": _iso(plugin.status_since),
    }


def statements(
    batch: Batch,
    dialect: Dialect,
    *,
    epoch: int = 0,
    notify: bool = False,
) -> list[Statement]:
    """Every statement of ``batch``, in the order they run, empty ones left out.

    The same order as ever: removals, plugins, leases, the change log (and its
    trim, and on PostgreSQL the NOTIFY when ``notify``), ownership, the revision.
    The leader fence is not here: it must run first, and its outcome is checked
    (:func:`write_postgres`).

    Raises:
        ValueError: a time in the batch is naive.
    """
    sql = _SQL[dialect]
    time = sqlite_time if dialect == "sqlite" else postgres_time
    out: list[Statement] = []

    def add(text: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            out.append(Statement(text, rows))

    removals = [(plugin_id,) for plugin_id in sorted(batch.removals)]
    add(sql.delete_plugins, removals)
    add(sql.delete_leases, removals)
    upserts = batch.upserts.values()
    add(sql.upsert_plugins, [_plugin_row(p, time) for p in upserts])
    lease_time = _memo(time)
    leases = [
        (p.plugin_id, lease_time(p.last_heartbeat_at), lease_time(p.last_check_at), p.last_error)
        for p in upserts
    ]
    leases += [
        (i, lease_time(t.last_heartbeat_at), lease_time(t.last_check_at), t.last_error)
        for i, t in batch.touches.items()
    ]
    add(sql.upsert_leases, leases)
    if batch.changes:
        add(
            sql.insert_changes,
            [
                (
                    c.revision,
                    _dumps([change_entry(p) for p in c.upserted]),
                    _dumps([change_entry(p) for p in c.removed]),
                    epoch,
                )
                for c in batch.changes
            ],
        )
        add(sql.trim_changes, [(batch.revision - batch.retain,)])
        if notify and sql.notify:
            add(sql.notify, [(str(batch.revision),)])
    add(sql.delete_owners, [(n,) for n in sorted(n for n, o in batch.owners.items() if o is None)])
    add(
        sql.upsert_owners,
        [(o.name, o.principal, time(o.claimed_at)) for o in batch.owners.values() if o is not None],
    )
    add(sql.delete_claims, sorted(key for key, claim in batch.claims.items() if claim is None))
    add(
        sql.upsert_claims,
        [
            (c.kind, c.key, c.principal, c.plugin_name, time(c.claimed_at))
            for c in batch.claims.values()
            if c is not None
        ],
    )
    if batch.moves_revision:
        add(sql.upsert_revision, [(batch.revision,)])
    return out


def _plugin_row(plugin: Plugin, time: Callable[[datetime | None], Any]) -> tuple[Any, ...]:
    reg = plugin.registration
    return (
        plugin.plugin_id,
        reg.name,
        int(reg.type),
        reg.address,
        reg.version,
        reg.description,
        _dumps(list(reg.sources)),
        reg.emitter_name,
        _dumps(list(reg.capabilities)),
        _dumps(dict(reg.labels)),
        reg.lease_ttl_seconds,
        int(plugin.status),
        time(plugin.registered_at),
        plugin.revision,
        time(plugin.status_since),
    )


def _memo(time: Callable[[datetime | None], Any]) -> Callable[[datetime | None], Any]:
    """``time``, remembering its value per time object for one batch.

    The plugins one health call answered share one check time (and one write holds
    thousands of lease rows): each object is converted once. Keyed by identity, the
    object held beside its value, so an id is never reused while the batch is built.
    """
    seen: dict[int, tuple[datetime, Any]] = {}

    def converted(moment: datetime | None) -> Any:
        if moment is None:
            return None
        hit = seen.get(id(moment))
        if hit is not None:
            return hit[1]
        value = time(moment)
        seen[id(moment)] = (moment, value)
        return value

    return converted


# -- the statements ---------------------------------------------------------------

_PLUGIN_COLUMNS = (
    "plugin_id",
    "name",
    "type",
    "address",
    "version",
    "description",
    "sources",
    "emitter_name",
    "capabilities",
    "labels",
    "lease_ttl_seconds",
    "status",
    "registered_at",
    "revision",
    "status_since",
)
_LEASE_COLUMNS = ("plugin_id", "last_heartbeat_at", "last_check_at", "last_error")
_OWNER_COLUMNS = ("name", "principal", "claimed_at")
_CLAIM_COLUMNS = ("kind", '"key"', "principal", "plugin_name", "claimed_at")


@dataclass(frozen=True, slots=True)
class _Sql:
    delete_plugins: str
    delete_leases: str
    upsert_plugins: str
    upsert_leases: str
    insert_changes: str
    trim_changes: str
    notify: str
    delete_owners: str
    upsert_owners: str
    delete_claims: str
    upsert_claims: str
    upsert_revision: str


def _marks(dialect: Dialect, count: int) -> str:
    if dialect == "sqlite":
        return ", ".join("?" * count)
    return ", ".join(f"${i}" for i in range(1, count + 1))


def _upsert(dialect: Dialect, table: str, columns: Sequence[str], keys: Sequence[str]) -> str:
    """INSERT ... ON CONFLICT (keys) DO UPDATE every other column: one statement."""
    changed = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({_marks(dialect, len(columns))}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {changed}"
    )


def _sql(dialect: Dialect) -> _Sql:
    one, two = ("?", "?") if dialect == "sqlite" else ("$1", "$2")
    return _Sql(
        delete_plugins=f"DELETE FROM plugins WHERE plugin_id = {one}",
        delete_leases=f"DELETE FROM plugin_leases WHERE plugin_id = {one}",
        upsert_plugins=_upsert(dialect, "plugins", _PLUGIN_COLUMNS, ["plugin_id"]),
        upsert_leases=_upsert(dialect, "plugin_leases", _LEASE_COLUMNS, ["plugin_id"]),
        insert_changes=(
            "INSERT INTO changes (revision, upserted, removed, epoch) "
            f"VALUES ({_marks(dialect, 4)})"
        ),
        trim_changes=f"DELETE FROM changes WHERE revision <= {one}",
        # Delivered to every LISTENing replica when the transaction commits.
        notify="" if dialect == "sqlite" else f"SELECT pg_notify('{CHANGES_CHANNEL}', $1)",
        delete_owners=f"DELETE FROM owners WHERE name = {one}",
        upsert_owners=_upsert(dialect, "owners", _OWNER_COLUMNS, ["name"]),
        delete_claims=f'DELETE FROM claims WHERE kind = {one} AND "key" = {two}',
        upsert_claims=_upsert(dialect, "claims", _CLAIM_COLUMNS, ["kind", '"key"']),
        upsert_revision=(
            f"INSERT INTO registry_meta (id, revision) VALUES (1, {one}) "
            "ON CONFLICT (id) DO UPDATE SET revision = excluded.revision"
        ),
    )


CHANGES_CHANNEL = "polku_registry_changes"
_SQL: dict[Dialect, _Sql] = {"sqlite": _sql("sqlite"), "postgresql": _sql("postgresql")}

# PostgreSQL: the leader's every write transaction starts here (SPEC §8). The row
# lock it takes orders it against a take-over; 0 rows means this replica's epoch
# is over (or its lease ran out) and nothing of the transaction may commit.
FENCE = (
    "UPDATE registry_leader SET epoch = epoch "
    "WHERE id = 1 AND epoch = $1 AND holder = $2 AND expires_at > clock_timestamp()"
)


async def write_postgres(
    connection: Any,
    batch: Batch,
    *,
    fence: tuple[int, str] | None,
    notify: bool,
    trace: Tracer | None = None,
) -> bool:
    """Run ``batch`` in one transaction on a raw asyncpg connection.

    ``fence`` is the (epoch, holder) the transaction must still hold; ``notify``
    wakes the replicas' change pumps on commit. Returns False, having written
    nothing, when the fence refused the transaction.

    Raises:
        ValueError: a time in the batch is naive.
        asyncpg errors, OSError: the database failed; nothing was written.
    """
    epoch = fence[0] if fence is not None else 0
    todo = statements(batch, "postgresql", epoch=epoch, notify=notify)
    try:
        if trace is not None:
            trace("BEGIN", [])
        async with connection.transaction():
            if fence is not None:
                if trace is not None:
                    trace(FENCE, [fence])
                if await connection.execute(FENCE, *fence) != "UPDATE 1":
                    raise _FenceRefused  # leaving the block by exception rolls back
            for statement in todo:
                if trace is not None:
                    trace(statement.sql, statement.rows)
                if len(statement.rows) == 1:
                    await connection.execute(statement.sql, *statement.rows[0])
                else:
                    await connection.executemany(statement.sql, statement.rows)
            if trace is not None:
                trace("COMMIT", [])  # sent as the block ends
    except _FenceRefused:
        return False
    return True


class _FenceRefused(Exception):
    """Raised inside the transaction to roll it back; never leaves this module."""
