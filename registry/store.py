"""Durable storage of the catalog in SQLite (embedded default) or PostgreSQL.

All SQL of the project lives here, but for the replicas' own (``registry.replica``).
The store keeps no state of its own beyond the engine and the outcome of its last
write: it loads everything at start and then writes batches of changes, one
transaction per batch. A plugin's lease and check fields (:class:`Lease`) change
without a revision and are written apart from its row, in ``plugin_leases``: a
heartbeat or a health result costs a few bytes, never the plugin's labels again
(SPEC §7). Database errors leave it as :class:`StoreError`, chained.

The folder of an SQLite file is never created unless the caller says it is its own
(the registry's default data folder): a typo in ``--db`` must not start an empty
registry somewhere else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import bindparam, delete, event, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from registry.catalog import Claim, ClaimKey, ClaimKind, Owner, OwnershipChange
from registry.errors import StoreError
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.tables import ChangeRow, ClaimRow, LeaseRow, OwnerRow, PluginRow, RegistryMetaRow

_CHUNK = 500  # ids per IN (...) clause; SQLite caps bound parameters
# asyncpg is the ``postgres`` extra: an SQLite-only install has no driver for this.
NO_POSTGRES_DRIVER = (
    "PostgreSQL needs the asyncpg driver, which is not installed: "
    "pip install 'polku-registry[postgres]'"
)

_PLUGINS: Any = PluginRow.__table__
_LEASES: Any = LeaseRow.__table__
_LEASE_FIELDS = ("last_heartbeat_at", "last_check_at", "last_error")

# Built once: SQLAlchemy caches their compiled form.
_DELETE_PLUGINS = delete(PluginRow).where(PluginRow.plugin_id.in_(bindparam("ids", expanding=True)))
_DELETE_LEASES = delete(LeaseRow).where(LeaseRow.plugin_id.in_(bindparam("ids", expanding=True)))
# A plugin with its lease; a row without one (written by hand, say) has no heartbeat yet.
_LOAD_PLUGINS = select(*_PLUGINS.columns, *(_LEASES.c[name] for name in _LEASE_FIELDS)).select_from(
    _PLUGINS.outerjoin(_LEASES, _LEASES.c.plugin_id == _PLUGINS.c.plugin_id)
)
_TRIM_CHANGES = delete(ChangeRow).where(ChangeRow.revision <= bindparam("oldest"))
_INSERT_CHANGES = insert(ChangeRow)
_HISTORY = select(ChangeRow.revision, ChangeRow.upserted, ChangeRow.removed).order_by(
    ChangeRow.revision
)
# PostgreSQL: the leader's every write transaction starts here (SPEC §8). The row
# lock it takes orders it against a take-over; 0 rows means this replica's epoch
# is over (or its lease ran out) and nothing of the transaction may commit.
_FENCE = text(
    "UPDATE registry_leader SET epoch = epoch "
    "WHERE id = 1 AND epoch = :epoch AND holder = :holder AND expires_at > clock_timestamp()"
)
# Delivered to every LISTENing replica when the transaction commits.
CHANGES_CHANNEL = "polku_registry_changes"
_NOTIFY = text(f"SELECT pg_notify('{CHANGES_CHANNEL}', :revision)")
_DELETE_OWNERS = delete(OwnerRow).where(OwnerRow.name.in_(bindparam("names", expanding=True)))
_DELETE_CLAIMS = delete(ClaimRow).where(
    ClaimRow.kind == bindparam("kind"), ClaimRow.key.in_(bindparam("keys", expanding=True))
)


def _upsert(dialect: str, table: Any, *keys: str, only: Sequence[str] = ()) -> Any:
    """INSERT ... ON CONFLICT (keys) DO UPDATE: a new row or a new state, one statement.

    An existing row gets every other column, or only those ``only`` names.
    """
    module = sqlite if dialect == "sqlite" else postgresql
    statement = module.insert(table)
    names = only or [c.name for c in table.columns if c.name not in keys]
    changed = {name: statement.excluded[name] for name in names}
    return statement.on_conflict_do_update(index_elements=list(keys), set_=changed)


def normalize_url(url: str) -> str:
    """Pick the async driver for plain ``sqlite://`` and ``postgresql://`` URLs.

    Raises:
        ValueError: the URL is malformed or names an unsupported database, or a
            PostgreSQL one without asyncpg installed (:data:`NO_POSTGRES_DRIVER`).
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(f"{url!r} is not a database URL") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        if importlib.util.find_spec("asyncpg") is None:
            raise ValueError(NO_POSTGRES_DRIVER)
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


@dataclass(frozen=True, slots=True)
class Lease:
    """A plugin's fields that change without a revision: its lease and its last check."""

    last_heartbeat_at: datetime | None = None
    last_check_at: datetime | None = None
    last_error: str = ""

    @classmethod
    def of(cls, plugin: Plugin) -> Lease:
        return cls(plugin.last_heartbeat_at, plugin.last_check_at, plugin.last_error)


@dataclass(slots=True)
class Batch:
    """Writes made durable together in one transaction.

    ``upserts`` write whole plugins (a registration, a new revision of one);
    ``touches`` write only the lease and check fields of a stored plugin (a
    heartbeat, a health result that changed no status).
    """

    revision: int = 0
    upserts: dict[str, Plugin] = field(default_factory=dict)
    touches: dict[str, Lease] = field(default_factory=dict)
    removals: set[str] = field(default_factory=set)
    # Appended to the change log; entries older than ``retain`` revisions are dropped.
    changes: list[Change] = field(default_factory=list)
    retain: int = 10_000
    # Ownership records by key: the newest state staged, None when it is gone.
    owners: dict[str, Owner | None] = field(default_factory=dict)
    claims: dict[ClaimKey, Claim | None] = field(default_factory=dict)

    def upsert(self, plugin: Plugin) -> None:
        """Stage a plugin's whole state; it carries its lease, so a staged touch goes."""
        self.upserts[plugin.plugin_id] = plugin
        self.touches.pop(plugin.plugin_id, None)
        self.removals.discard(plugin.plugin_id)

    def touch(self, plugin_id: str, lease: Lease) -> None:
        """Stage new lease and check fields of a plugin.

        A full upsert of the plugin in this batch wins: the plugin is written once,
        with the newer lease. A plugin staged for removal stays removed.
        """
        staged = self.upserts.get(plugin_id)
        if staged is not None:
            self.upserts[plugin_id] = dataclasses.replace(
                staged,
                last_heartbeat_at=lease.last_heartbeat_at,
                last_check_at=lease.last_check_at,
                last_error=lease.last_error,
            )
        elif plugin_id not in self.removals:
            self.touches[plugin_id] = lease

    def remove(self, plugin_id: str) -> None:
        self.upserts.pop(plugin_id, None)
        self.touches.pop(plugin_id, None)
        self.removals.add(plugin_id)

    def own(self, change: OwnershipChange) -> None:
        """Stage ownership records; a later state of the same key wins."""
        self.owners.update(change.owners)
        self.claims.update(change.claims)

    @property
    def moves_revision(self) -> bool:
        """Whether it holds revisioned writes (else ``registry_meta`` is not rewritten)."""
        return bool(self.changes or self.upserts or self.removals)

    def __bool__(self) -> bool:
        return bool(self.moves_revision or self.touches or self.owners or self.claims)


class Fenced(StoreError):
    """This replica's leader epoch is over: its write was refused whole (SPEC §8)."""


class Fence(Protocol):
    """The leader lease a PostgreSQL write is fenced by (``registry.replica.election``)."""

    @property
    def epoch(self) -> int: ...
    @property
    def holder(self) -> str: ...
    def holds(self) -> bool:
        """Whether the lease is still ours by this process's own clock."""
        ...


class Store(Protocol):
    """What the registry needs from its database."""

    async def load(self) -> Snapshot: ...
    async def load_history(self) -> list[Change]: ...
    async def write(self, batch: Batch) -> None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class SqlStore:
    """The :class:`Store` on SQLAlchemy async: aiosqlite (WAL) or asyncpg.

    It remembers whether its last write failed (:attr:`write_error`), for the
    registry's own health: NOT_SERVING while writes fail, SERVING once one succeeds.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        meta = RegistryMetaRow.__table__
        self._upsert_plugins = _upsert(dialect, _PLUGINS, "plugin_id")
        self._upsert_leases = _upsert(dialect, _LEASES, "plugin_id")
        self._upsert_revision = _upsert(dialect, meta, "id", only=["revision"])
        self._upsert_probe = _upsert(dialect, meta, "id", only=["probed_at"])
        self._upsert_owners = _upsert(dialect, OwnerRow.__table__, "name")
        self._upsert_claims = _upsert(dialect, ClaimRow.__table__, "kind", "key")
        self._write_error: StoreError | None = None
        self._write_changed = asyncio.Event()
        self.dialect = dialect
        # Replicas on PostgreSQL (``registry.replica``) set ``replicated``: every
        # write then goes through the leader lease, and ``fence`` None means "not
        # the leader", so every write is refused. SQLite is one registry per file.
        self.replicated = False
        self.fence: Fence | None = None

    @classmethod
    def open(cls, url: str, *, create_folder: bool = False) -> SqlStore:
        """Create the engine (no connection yet).

        The SQLite file's folder must exist; ``create_folder`` creates it instead,
        for a folder that is the caller's own (the registry's default data folder).

        Raises:
            ValueError: the URL is malformed or names an unsupported database.
            StoreError: the SQLite file's folder does not exist or cannot be created.
        """
        url = normalize_url(url)
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            path = sqlite_path(url)
            if path is not None:
                _check_folder(path.parent, create=create_folder)
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
                if self.dialect == "postgresql":
                    # One snapshot for every read: plugins, revision and ownership agree
                    # though the leader commits meanwhile (a replica resynchronising).
                    await conn.execution_options(isolation_level="REPEATABLE READ")
                    await conn.begin()
                rows = (await conn.execute(_LOAD_PLUGINS)).mappings().all()
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
                history = (await conn.execute(_HISTORY)).all()
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot load the change log: {exc}") from exc
        # Decoding thousands of entries is CPU work: off the event loop.
        return await asyncio.to_thread(_changes_from_rows, history)

    @property
    def write_error(self) -> StoreError | None:
        """Why the last write (or write probe) failed; None once one succeeded."""
        return self._write_error

    async def write_changed(self) -> None:
        """Return once writes started or stopped failing since the last call.

        For one waiter (the registry's own health); cancel it to stop waiting.
        """
        await self._write_changed.wait()
        self._write_changed.clear()

    async def write(self, batch: Batch) -> None:
        """Apply a batch in one transaction; durable when this returns.

        Touches write ``plugin_leases`` rows alone; an upsert writes the plugin's
        row and its lease row. A batch that moves no revision (touches, ownership)
        leaves ``registry_meta`` alone.

        Replicated, the transaction is fenced by the leader lease (:attr:`fence`)
        and wakes every replica's change pump when it commits.

        Raises:
            Fenced: replicated, and this replica does not hold the leader lease.
            StoreError: the database failed; nothing of the batch was written.
        """
        fence = self.fence
        epoch = 0
        if self.replicated:
            if fence is None or not fence.holds():
                raise Fenced("this replica is not the leader; retry shortly")
            epoch = fence.epoch
        try:
            async with self.engine.begin() as conn:
                if fence is not None and epoch:
                    fenced = await conn.execute(_FENCE, {"epoch": epoch, "holder": fence.holder})
                    if fenced.rowcount != 1:
                        raise Fenced(f"leader epoch {epoch} is over; nothing was written")
                await self._write_plugins(conn, batch)
                if batch.changes:
                    entries = [
                        {
                            "revision": c.revision,
                            "upserted": [_json_row(p) for p in c.upserted],
                            "removed": [_json_row(p) for p in c.removed],
                            "epoch": epoch,
                        }
                        for c in batch.changes
                    ]
                    await conn.execute(_INSERT_CHANGES, entries)
                    await conn.execute(_TRIM_CHANGES, {"oldest": batch.revision - batch.retain})
                    if self.replicated:
                        await conn.execute(_NOTIFY, {"revision": str(batch.revision)})
                # Ownership in the same transaction: a Register answered is durable
                # together with what it recorded, or neither is stored.
                await self._write_ownership(conn, batch)
                if batch.moves_revision:
                    await conn.execute(self._upsert_revision, {"id": 1, "revision": batch.revision})
        except (SQLAlchemyError, OSError) as exc:
            error = StoreError(f"cannot write to the registry database: {exc}")
            self._wrote(error)
            raise error from exc
        self._wrote(None)

    async def _write_plugins(self, conn: AsyncConnection, batch: Batch) -> None:
        for chunk in _chunks(sorted(batch.removals)):
            await conn.execute(_DELETE_PLUGINS, {"ids": list(chunk)})
            await conn.execute(_DELETE_LEASES, {"ids": list(chunk)})
        if batch.upserts:
            await conn.execute(
                self._upsert_plugins, [_plugin_row(p) for p in batch.upserts.values()]
            )
        leases = [_lease_row(p.plugin_id, Lease.of(p)) for p in batch.upserts.values()]
        leases += [_lease_row(plugin_id, lease) for plugin_id, lease in batch.touches.items()]
        if leases:
            await conn.execute(self._upsert_leases, leases)

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

    async def probe_write(self) -> None:
        """Prove the database takes writes: store a new ``registry_meta.probed_at``.

        The probe changes a value: SQLite writes nothing for a row that stays the
        same, and such a probe would pass on a full disk. Clears :attr:`write_error`
        when it succeeds.

        Raises:
            StoreError: the write failed (:attr:`write_error` says so too).
        """
        if self.replicated and self.fence is None:
            # Not the leader: it writes nothing, so reaching the database is all.
            await self.ping()
            self._wrote(None)
            return
        # revision 0 only if the row is missing (no revision was ever stored).
        row = {"id": 1, "revision": 0, "probed_at": datetime.now(UTC)}
        try:
            async with self.engine.begin() as conn:
                await conn.execute(self._upsert_probe, row)
        except (SQLAlchemyError, OSError) as exc:
            error = StoreError(f"cannot write to the registry database: {exc}")
            self._wrote(error)
            raise error from exc
        self._wrote(None)

    def _wrote(self, error: StoreError | None) -> None:
        if (error is None) != (self._write_error is None):
            self._write_changed.set()
        self._write_error = error

    async def close(self) -> None:
        await self.engine.dispose()


def _changes_from_rows(rows: Sequence[Any]) -> list[Change]:
    return [change_from_json(row.revision, row.upserted, row.removed) for row in rows]


def change_from_json(revision: int, upserted: Any, removed: Any) -> Change:
    """A ``changes`` row as a :class:`Change`: its plugin lists are decoded JSON."""
    return Change(
        revision=revision,
        upserted=tuple(_plugin_from_row(_from_json(p)) for p in upserted),
        removed=tuple(_plugin_from_row(_from_json(p)) for p in removed),
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets readers run beside the writer; synchronous=FULL fsyncs every
    # commit, so an acknowledged write survives a crash of the machine too.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def sqlite_path(url: str | URL) -> Path | None:
    """The file of an SQLite URL; None for another database or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _check_folder(folder: Path, *, create: bool) -> None:
    """Refuse a missing folder for the database file, or create it when it is ours.

    Raises:
        StoreError: it does not exist or is no folder, or cannot be created.
    """
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create database folder {folder}: {exc.strerror}") from exc
    elif not folder.exists():
        raise StoreError(f"database folder {folder} does not exist")
    elif not folder.is_dir():
        raise StoreError(f"database folder {folder} is not a folder")


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _plugin_row(plugin: Plugin) -> dict[str, Any]:
    """The ``plugins`` row: the plugin as of its revision, without its lease."""
    row = _row_from_plugin(plugin)
    for name in _LEASE_FIELDS:
        del row[name]
    return row


def _lease_row(plugin_id: str, lease: Lease) -> dict[str, Any]:
    return {
        "plugin_id": plugin_id,
        "last_heartbeat_at": lease.last_heartbeat_at,
        "last_check_at": lease.last_check_at,
        "last_error": lease.last_error,
    }


def _row_from_plugin(plugin: Plugin) -> dict[str, Any]:
    """Every field of a plugin, lease included: what the change log stores."""
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
        last_error=row["last_error"] or "",  # None: no lease row (see _LOAD_PLUGINS)
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
