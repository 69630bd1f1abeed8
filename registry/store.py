"""Durable storage of the catalog in SQLite (embedded default) or PostgreSQL.

All SQL of the project lives here. The store keeps no state of its own beyond the
engine: it loads everything at start and then writes batches of changes, one
transaction per batch. Database errors leave it as :class:`StoreError`, chained.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import bindparam, delete, event, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from registry.catalog import Claim, ClaimKey, ClaimKind, Owner, OwnershipChange
from registry.errors import StoreError
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.tables import ChangeRow, ClaimRow, OwnerRow, PluginRow, RegistryMetaRow

_CHUNK = 500  # ids per IN (...) clause; SQLite caps bound parameters

# Built once: SQLAlchemy caches their compiled form.
_DELETE_PLUGINS = delete(PluginRow).where(PluginRow.plugin_id.in_(bindparam("ids", expanding=True)))
_TRIM_CHANGES = delete(ChangeRow).where(ChangeRow.revision <= bindparam("oldest"))
_INSERT_CHANGES = insert(ChangeRow)
_DELETE_OWNERS = delete(OwnerRow).where(OwnerRow.name.in_(bindparam("names", expanding=True)))
_DELETE_CLAIMS = delete(ClaimRow).where(
    ClaimRow.kind == bindparam("kind"), ClaimRow.key.in_(bindparam("keys", expanding=True))
)


def _upsert(dialect: str, table: Any, *keys: str) -> Any:
    """INSERT ... ON CONFLICT (keys) DO UPDATE: a new row or a new state, one statement."""
    module = sqlite if dialect == "sqlite" else postgresql
    statement = module.insert(table)
    changed = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    return statement.on_conflict_do_update(index_elements=list(keys), set_=changed)


def normalize_url(url: str) -> str:
    """Pick the async driver for plain ``sqlite://`` and ``postgresql://`` URLs.

    Raises:
        ValueError: the URL is malformed or names an unsupported database.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(f"{url!r} is not a database URL") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
    return parsed.render_as_string(hide_password=False)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The current state the store holds: the plugins, the global revision, ownership."""

    plugins: list[Plugin]
    revision: int
    owners: list[Owner] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


@dataclass(slots=True)
class Batch:
    """Writes made durable together in one transaction."""

    revision: int = 0
    upserts: dict[str, Plugin] = field(default_factory=dict)
    removals: set[str] = field(default_factory=set)
    # Appended to the change log; entries older than ``retain`` revisions are dropped.
    changes: list[Change] = field(default_factory=list)
    retain: int = 10_000
    # Ownership records by key: the newest state staged, None when it is gone.
    owners: dict[str, Owner | None] = field(default_factory=dict)
    claims: dict[ClaimKey, Claim | None] = field(default_factory=dict)

    def upsert(self, plugin: Plugin) -> None:
        self.upserts[plugin.plugin_id] = plugin
        self.removals.discard(plugin.plugin_id)

    def remove(self, plugin_id: str) -> None:
        self.upserts.pop(plugin_id, None)
        self.removals.add(plugin_id)

    def own(self, change: OwnershipChange) -> None:
        """Stage ownership records; a later state of the same key wins."""
        self.owners.update(change.owners)
        self.claims.update(change.claims)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removals or self.changes or self.owners or self.claims)


class Store(Protocol):
    """What the registry needs from its database."""

    async def load(self) -> Snapshot: ...
    async def load_history(self) -> list[Change]: ...
    async def write(self, batch: Batch) -> None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class SqlStore:
    """The :class:`Store` on SQLAlchemy async: aiosqlite (WAL) or asyncpg."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._upsert_plugins = _upsert(engine.dialect.name, PluginRow.__table__, "plugin_id")
        self._upsert_meta = _upsert(engine.dialect.name, RegistryMetaRow.__table__, "id")
        self._upsert_owners = _upsert(engine.dialect.name, OwnerRow.__table__, "name")
        self._upsert_claims = _upsert(engine.dialect.name, ClaimRow.__table__, "kind", "key")

    @classmethod
    def open(cls, url: str) -> SqlStore:
        """Create the engine (no connection yet); creates the SQLite file's folder.

        Raises:
            ValueError: the URL is malformed or names an unsupported database.
            StoreError: the SQLite file's folder cannot be created.
        """
        url = normalize_url(url)
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                folder = Path(parsed.database).parent
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot create {folder}: {exc.strerror}") from exc
            engine = create_async_engine(url, connect_args={"timeout": 30})
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            engine = create_async_engine(url, pool_pre_ping=True, pool_size=5)
        return cls(engine)

    async def load(self) -> Snapshot:
        """Read every plugin, the revision and ownership, in one transaction.

        Not the change log: :meth:`load_history` reads that.

        Raises:
            StoreError: the database failed.
        """
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(select(*PluginRow.__table__.columns))).mappings().all()
                revision = await conn.scalar(
                    select(RegistryMetaRow.revision).where(RegistryMetaRow.id == 1)
                )
                owners = (await conn.execute(select(*OwnerRow.__table__.columns))).all()
                claims = (await conn.execute(select(*ClaimRow.__table__.columns))).all()
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot load the registry: {exc}") from exc
        return Snapshot(
            [_plugin_from_row(r) for r in rows],
            revision or 0,
            owners=[Owner(r.name, r.principal, r.claimed_at) for r in owners],
            claims=[
                Claim(_KINDS[r.kind], r.key, r.principal, r.plugin_name, r.claimed_at)
                for r in claims
            ],
        )

    async def load_history(self) -> list[Change]:
        """Read the retained change log, oldest first.

        Raises:
            StoreError: the database failed.
        """
        try:
            async with self.engine.connect() as conn:
                history = (await conn.execute(select(ChangeRow).order_by(ChangeRow.revision))).all()
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot load the change log: {exc}") from exc
        # Decoding thousands of entries is CPU work: off the event loop.
        return await asyncio.to_thread(_changes_from_rows, history)

    async def write(self, batch: Batch) -> None:
        """Apply a batch in one transaction; durable when this returns.

        Raises:
            StoreError: the database failed; nothing of the batch was written.
        """
        try:
            async with self.engine.begin() as conn:
                for chunk in _chunks(sorted(batch.removals)):
                    await conn.execute(_DELETE_PLUGINS, {"ids": list(chunk)})
                if batch.upserts:
                    rows = [_row_from_plugin(p) for p in batch.upserts.values()]
                    await conn.execute(self._upsert_plugins, rows)
                if batch.changes:
                    entries = [
                        {
                            "revision": c.revision,
                            "upserted": [_json_row(p) for p in c.upserted],
                            "removed": [_json_row(p) for p in c.removed],
                        }
                        for c in batch.changes
                    ]
                    await conn.execute(_INSERT_CHANGES, entries)
                    await conn.execute(_TRIM_CHANGES, {"oldest": batch.revision - batch.retain})
                # Ownership in the same transaction: a Register answered is durable
                # together with what it recorded, or neither is stored.
                await self._write_ownership(conn, batch)
                await conn.execute(self._upsert_meta, {"id": 1, "revision": batch.revision})
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot write to the registry database: {exc}") from exc

    async def _write_ownership(self, conn: AsyncConnection, batch: Batch) -> None:
        gone = sorted(name for name, owner in batch.owners.items() if owner is None)
        for chunk in _chunks(gone):
            await conn.execute(_DELETE_OWNERS, {"names": list(chunk)})
        owners = [_owner_row(o) for o in batch.owners.values() if o is not None]
        if owners:
            await conn.execute(self._upsert_owners, owners)
        for kind in _KINDS:
            keys = sorted(
                k for (c, k), claim in batch.claims.items() if c == kind and claim is None
            )
            for chunk in _chunks(keys):
                await conn.execute(_DELETE_CLAIMS, {"kind": kind, "keys": list(chunk)})
        claims = [_claim_row(c) for c in batch.claims.values() if c is not None]
        if claims:
            await conn.execute(self._upsert_claims, claims)

    async def ping(self) -> None:
        """Raises StoreError when the database does not answer."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"database unreachable: {exc}") from exc

    async def close(self) -> None:
        await self.engine.dispose()


def _changes_from_rows(rows: Sequence[Any]) -> list[Change]:
    return [
        Change(
            revision=row.revision,
            upserted=tuple(_plugin_from_row(_from_json(p)) for p in row.upserted),
            removed=tuple(_plugin_from_row(_from_json(p)) for p in row.removed),
        )
        for row in rows
    ]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets readers run beside the writer; synchronous=FULL fsyncs every
    # commit, so an acknowledged write survives a crash of the machine too.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _row_from_plugin(plugin: Plugin) -> dict[str, Any]:
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
        "registered_at": plugin.registered_at,
        "last_heartbeat_at": plugin.last_heartbeat_at,
        "last_check_at": plugin.last_check_at,
        "revision": plugin.revision,
        "status_since": plugin.status_since,
    }


def _plugin_from_row(row: Any) -> Plugin:
    registration = Registration(
        name=row["name"],
        type=_TYPES[row["type"]],
        address=row["address"],
        version=row["version"],
        description=row["description"],
        sources=tuple(row["sources"]),
        emitter_name=row["emitter_name"],
        capabilities=tuple(row["capabilities"]),
        labels=dict(row["labels"]),
        lease_ttl_seconds=row["lease_ttl_seconds"],
    )
    return Plugin(
        plugin_id=row["plugin_id"],
        registration=registration,
        status=_STATUSES[row["status"]],
        registered_at=row["registered_at"],
        last_heartbeat_at=row["last_heartbeat_at"],
        last_check_at=row["last_check_at"],
        last_error=row["last_error"],
        revision=row["revision"],
        status_since=row["status_since"],
    )


def _owner_row(owner: Owner) -> dict[str, Any]:
    return {"name": owner.name, "principal": owner.principal, "claimed_at": owner.claimed_at}


def _claim_row(claim: Claim) -> dict[str, Any]:
    return {
        "kind": claim.kind,
        "key": claim.key,
        "principal": claim.principal,
        "plugin_name": claim.plugin_name,
        "claimed_at": claim.claimed_at,
    }


_KINDS: dict[str, ClaimKind] = {"source": "source", "emitter": "emitter"}
# Enum lookups by value: calling the enum class is slow over 10,000 rows.
_TYPES = {t.value: t for t in PluginType}
_STATUSES = {s.value: s for s in PluginStatus}
_TIMES = ("registered_at", "last_heartbeat_at", "last_check_at", "status_since")


def _json_row(plugin: Plugin) -> dict[str, Any]:
    """A plugin as the change log stores it: its row, with times as ISO 8601 text."""
    row = _row_from_plugin(plugin)
    for key in _TIMES:
        moment = row[key]
        if moment is not None:
            row[key] = moment.isoformat()
    return row


def _from_json(row: dict[str, Any]) -> dict[str, Any]:
    times = {k: datetime.fromisoformat(row[k]) if row.get(k) else None for k in _TIMES}
    return {**row, **times}
