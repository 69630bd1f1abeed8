"""Bring a database to the current schema with the Alembic scripts in ``registry/migrations/``.

Only this registry's databases are migrated, and new ones: a database that has
tables but no schema revision of ours (another application's, or a newer
polku-registry's), or an SQLite file that exists but is empty (truncated, or made
by mistake), is refused with a one-line reason instead of being turned into a new,
empty registry at revision 0 (SPEC §7).
"""

from __future__ import annotations

from collections.abc import Set
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DatabaseError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from registry import migrations
from registry.errors import StoreError
from registry.storage.store import sqlite_path

# What every revision of ours has: a database at a known revision without them is
# another application's that happens to use the same revision names.
_OUR_TABLES = frozenset({"plugins", "registry_meta"})
_SHOWN_TABLES = 5


# The advisory lock key replicas migrate under (any fixed 64-bit number: "polkureg").
MIGRATION_LOCK = 0x706F6C6B75726567


def alembic_config() -> Config:
    """A config pointing at the packaged scripts; no alembic.ini needed."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


async def upgrade(engine: AsyncEngine) -> None:
    """Check that the database is this registry's or new, then migrate it to head.

    Every pending migration runs in one transaction.

    Raises:
        StoreError: the database is an empty file or not this registry's (one
            line saying so), is unreachable, or a migration failed.
    """
    name = describe(engine)
    refuse_empty_file(engine)

    def run(connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            # Replicas starting together migrate one after the other, not at once;
            # released when the transaction ends.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        config = alembic_config()
        check_ours(connection, name, ScriptDirectory.from_config(config))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    except DatabaseError as exc:
        if engine.dialect.name == "sqlite" and "not a database" in str(exc.orig):
            raise _not_ours(name, "the file is not an SQLite database") from exc
        raise StoreError(f"cannot migrate the registry database: {exc}") from exc
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot migrate the registry database: {exc}") from exc


def describe(engine: AsyncEngine) -> str:
    """The database as a message names it: the SQLite file, or the URL without password."""
    path = sqlite_path(engine.url)
    return str(path) if path is not None else engine.url.render_as_string(hide_password=True)


def refuse_empty_file(engine: AsyncEngine) -> None:
    """Refuse an SQLite database file that exists but is empty.

    SQLite would take a zero-length file as a new database; but a file that exists
    was meant to hold a registry. A missing file is a new database, and so is an
    empty file whose write-ahead log holds pages (SQLite recovers those).

    Raises:
        StoreError: the file is empty.
    """
    path = sqlite_path(engine.url)
    if path is None or not path.is_file() or path.stat().st_size:
        return
    wal = path.with_name(path.name + "-wal")
    if wal.is_file() and wal.stat().st_size:
        return
    raise StoreError(
        f"database {path} is empty but exists: refusing to start (a zero-length file "
        "holds no registry: restore it, or remove it to start a new registry)"
    )


def check_ours(connection: Connection, name: str, scripts: ScriptDirectory) -> None:
    """Refuse a database with tables that is not this registry's; a new one passes.

    Raises:
        StoreError: ``database … is not a polku-registry database (why)``.
    """

    def refuse(why: str) -> StoreError:
        return _not_ours(name, why)

    tables = set(inspect(connection).get_table_names())
    if not tables:
        return  # new: migrated from scratch
    if "alembic_version" not in tables:
        raise refuse(f"it has tables ({_listing(tables)}) but no alembic_version")
    versions = [
        row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))
    ]
    known = {script.revision for script in scripts.walk_revisions()}
    unknown = [v for v in versions if v not in known]
    if unknown:
        raise refuse(
            f"its schema revision {unknown[0]!r} is not one of this registry's: another "
            "application's, or a newer polku-registry's"
        )
    if not versions:
        if tables - {"alembic_version"}:
            others = _listing(tables - {"alembic_version"})
            raise refuse(f"it has tables ({others}) but no schema revision")
        return  # migrated down to nothing: as good as new
    missing = _OUR_TABLES - tables
    if missing:
        raise refuse(f"it is at revision {versions[0]!r} but has no {_listing(missing)} table")


def _not_ours(name: str, why: str) -> StoreError:
    return StoreError(f"database {name} is not a polku-registry database ({why})")


def _listing(tables: Set[str]) -> str:
    shown = sorted(tables)[:_SHOWN_TABLES]
    more = len(tables) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")
