"""Alembic environment: async engines, and a connection handed in from code."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from registry.storage.store import normalize_url
from registry.storage.tables import Base

config = context.config
target_metadata = Base.metadata


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async(url: str) -> None:
    engine = create_async_engine(normalize_url(url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run_with)
    finally:
        await engine.dispose()


# registry.migrate hands in a live connection; the alembic CLI gives a URL.
_connection = config.attributes.get("connection")
if _connection is not None:
    run_with(_connection)
else:
    asyncio.run(run_async(config.get_main_option("sqlalchemy.url") or ""))
