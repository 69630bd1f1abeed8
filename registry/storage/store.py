"""Durable storage of the catalog in SQLite (embedded default) or PostgreSQL.

All SQL of the project lives here and in the store's write path
(``registry.storage.batch_sql``, ``registry.storage.sqlite_writer``), but for the replicas' own
(``registry.replica``). The store keeps no state of its own beyond the engine, its
writer and the outcome of its last write: it loads everything at start (SQLAlchemy)
and then writes batches of changes, one transaction per batch, on the raw driver: a
batch is one hop to its own sqlite3 thread, or one asyncpg transaction of one
``executemany`` per table. A plugin's lease and check fields (:class:`Lease`) change
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
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import event, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from registry.catalog import Claim, ClaimKey, ClaimKind, Owner, OwnershipChange
from registry.errors import StoreError
from registry.interning import Known, PluginInterner
from registry.model import Change, Plugin, PluginStatus, PluginType, Registration
from registry.storage.batch_sql import CHANGES_CHANNEL as CHANGES_CHANNEL
from registry.storage.batch_sql import Tracer, change_entry, statements, write_postgres
from registry.storage.sqlite_writer import PRAGMAS, SqliteWriter
from registry.storage.tables import (
    ChangeRow,
    ClaimRow,
    LeaseRow,
    OwnerRow,
    PluginRow,
    RegistryMetaRow,
)

# asyncpg is the ``postgres`` extra: an SQLite-only install has no driver for this.
NO_POSTGRES_DRIVER = (
    "PostgreSQL needs the asyncpg driver, which is not installed: "
    "pip install 'polku-registry[postgres]'"
)

_PLUGINS: Any = PluginRow.__table__
_LEASES: Any = LeaseRow.__table__
_LEASE_FIELDS = ("last_heartbeat_at", "last_check_at", "last_error")

# Built once: SQLAlchemy caches their compiled form.
# A plugin with its lease; a row without one (written by hand, say) has no heartbeat yet.
_LOAD_PLUGINS = select(*_PLUGINS.columns, *(_LEASES.c[name] for name in _LEASE_FIELDS)).select_from(
    _PLUGINS.outerjoin(_LEASES, _LEASES.c.plugin_id == _PLUGINS.c.plugin_id)
)
# Plugin and change log rows read and decoded per slice at start.
_HISTORY_SLICE = 256
_HISTORY = select(ChangeRow.revision, ChangeRow.upserted, ChangeRow.removed).order_by(
    ChangeRow.revision
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


class LeaseFields(Protocol):
    """What a lease row is made of: a :class:`Lease`, or a plugin's state itself (the
    journal stages the write side's :class:`~registry.model.Plugin`, no copy made)."""

    @property
    def last_heartbeat_at(self) -> datetime | None: ...
    @property
    def last_check_at(self) -> datetime | None: ...
    @property
    def last_error(self) -> str: ...


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
    touches: dict[str, LeaseFields] = field(default_factory=dict)
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

    def touch(self, plugin_id: str, lease: LeaseFields) -> None:
        """Stage new lease and check fields of a plugin.

        A full upsert of the plugin in this batch wins: the plugin is written once,
        with the newer lease. A plugin staged for removal stays removed.
        """
        staged = self.upserts.get(plugin_id)
        if staged is not None:
            if (staged.last_heartbeat_at, staged.last_check_at, staged.last_error) == (
                lease.last_heartbeat_at,
                lease.last_check_at,
                lease.last_error,
            ):
                return  # the upsert carries this lease already (often: it is that state)
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
    async def load_history(self, known: Known | None = None) -> list[Change]: ...
    async def write(self, batch: Batch) -> None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class SqlStore:
    """The :class:`Store` on SQLAlchemy async (aiosqlite in WAL, or asyncpg) for
    reads, and on the raw driver for batches (``registry.storage.batch_sql``).

    It remembers whether its last write failed (:attr:`write_error`), for the
    registry's own health: NOT_SERVING while writes fail, SERVING once one succeeds.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        meta = RegistryMetaRow.__table__
        self._upsert_probe = _upsert(dialect, meta, "id", only=["probed_at"])
        # An SQLite file gets a writer thread of its own; an in-memory database (or
        # a URL with options) is written through the engine's one connection.
        path = sqlite_path(engine.url) if dialect == "sqlite" else None
        self._sqlite = SqliteWriter(path) if path is not None and not engine.url.query else None
        # Told of every statement the raw writers send (tests watch the SQL).
        self.trace: Tracer | None = None
        self._errors: tuple[type[Exception], ...] = (
            SQLAlchemyError,
            OSError,
            sqlite3.Error,
            ValueError,  # a naive time
            *(_driver_errors() if dialect == "postgresql" else ()),
        )
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
                # Streamed, a slice at a time: the rows never all sit in memory at once
                # beside the plugins made of them (a peak the allocator keeps).
                plugins: list[Plugin] = []
                result = await conn.stream(_LOAD_PLUGINS)
                async for rows in result.mappings().partitions(_HISTORY_SLICE):
                    plugins += [_plugin_from_row(r) for r in rows]
                revision = await conn.scalar(
                    select(RegistryMetaRow.revision).where(RegistryMetaRow.id == 1)
                )
                owners = (await conn.execute(select(*OwnerRow.__table__.columns))).all()
                claims = (await conn.execute(select(*ClaimRow.__table__.columns))).all()
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot load the registry: {exc}") from exc
        return Snapshot(
            plugins,
            revision or 0,
            owners=[Owner(r.name, r.principal, r.claimed_at) for r in owners],
            claims=[
                Claim(_KINDS[r.kind], r.key, r.principal, r.plugin_name, r.claimed_at)
                for r in claims
            ],
        )

    async def load_history(self, known: Known | None = None) -> list[Change]:
        """Read the retained change log, oldest first.

        Streamed and decoded a slice of rows at a time, yielding to the event loop in
        between: the log is never held twice over (as rows and as changes), and its
        plugin states share the objects of equal ones (:mod:`registry.interning`):
        ``known`` (the catalogue's ``get``) and each other's.

        Raises:
            StoreError: the database failed.
        """
        interner = PluginInterner(known)
        changes: list[Change] = []
        try:
            async with self.engine.connect() as conn:
                result = await conn.stream(_HISTORY)
                async for rows in result.partitions(_HISTORY_SLICE):
                    changes += _changes_from_rows(rows, interner)
                    await asyncio.sleep(0)  # a slice at a time: the loop keeps serving
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot load the change log: {exc}") from exc
        return changes

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
        fenced_by: tuple[int, str] | None = None
        if self.replicated:
            if fence is None or not fence.holds():
                raise Fenced("this replica is not the leader; retry shortly")
            if fence.epoch:
                fenced_by = (fence.epoch, fence.holder)
        try:
            if self._sqlite is not None:
                await self._sqlite.write(batch, self.trace)
            elif self.dialect == "postgresql":
                if not await self._write_postgres(batch, fenced_by):
                    epoch = fenced_by[0] if fenced_by else 0
                    raise Fenced(f"leader epoch {epoch} is over; nothing was written")
            else:
                await self._write_engine(batch)
        except Fenced:
            raise
        except self._errors as exc:
            error = StoreError(f"cannot write to the registry database: {exc}")
            self._wrote(error)
            raise error from exc
        self._wrote(None)

    async def _write_postgres(self, batch: Batch, fence: tuple[int, str] | None) -> bool:
        """The batch on the raw asyncpg connection under a pooled SQLAlchemy one.

        False when the fence refused it. A connection that failed is not pooled again.
        """
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                return await write_postgres(
                    raw.driver_connection,
                    batch,
                    fence=fence,
                    notify=self.replicated,
                    trace=self.trace,
                )
            except BaseException:
                await conn.invalidate()
                raise

    async def _write_engine(self, batch: Batch) -> None:
        """The batch through the engine (an in-memory SQLite database): same statements."""
        async with self.engine.begin() as conn:
            for statement in statements(batch, "sqlite"):
                await conn.exec_driver_sql(statement.sql, statement.rows)

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
        if self._sqlite is not None:
            await self._sqlite.close()
        await self.engine.dispose()


def _changes_from_rows(rows: Sequence[Any], interner: PluginInterner) -> list[Change]:
    return [
        Change(
            revision=row.revision,
            upserted=tuple(interner.plugin(_plugin_from_row(_from_json(p))) for p in row.upserted),
            removed=tuple(interner.plugin(_plugin_from_row(_from_json(p))) for p in row.removed),
        )
        for row in rows
    ]


def change_from_json(revision: int, upserted: Any, removed: Any) -> Change:
    """A ``changes`` row as a :class:`Change`: its plugin lists are decoded JSON."""
    return Change(
        revision=revision,
        upserted=tuple(_plugin_from_row(_from_json(p)) for p in upserted),
        removed=tuple(_plugin_from_row(_from_json(p)) for p in removed),
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    for pragma in PRAGMAS:  # the writer's own connection runs the same
        cursor.execute(pragma)
    cursor.close()


def _driver_errors() -> tuple[type[Exception], ...]:
    """asyncpg's errors (imported only for PostgreSQL: the ``postgres`` extra)."""
    import asyncpg

    return (asyncpg.PostgresError, asyncpg.InterfaceError)


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


_KINDS: dict[str, ClaimKind] = {"source": "source", "emitter": "emitter"}
# Enum lookups by value: calling the enum class is slow over 10,000 rows.
_TYPES = {t.value: t for t in PluginType}
_STATUSES = {s.value: s for s in PluginStatus}
_TIMES = ("registered_at", "last_heartbeat_at", "last_check_at", "status_since")


# A plugin as the change log stores it (tests build change rows by hand with it).
_json_row = change_entry


def _from_json(row: dict[str, Any]) -> dict[str, Any]:
    times = {k: datetime.fromisoformat(row[k]) if row.get(k) else None for k in _TIMES}
    return {**row, **times}
