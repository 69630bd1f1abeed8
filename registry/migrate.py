"""Bring a database to the current schema with the Alembic scripts in ``migrations/``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations
from registry.errors import StoreError


def alembic_config() -> Config:
    """A config pointing at the packaged scripts; no alembic.ini needed."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return config


async def upgrade(engine: AsyncEngine) -> None:
    """Apply every pending migration in one transaction.

    Raises:
        StoreError: the database is unreachable or a migration failed.
    """

    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot migrate the registry database: {exc}") from exc
