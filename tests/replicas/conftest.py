"""Fixtures of the replica tests: a PostgreSQL database per test, and clusters on it.

Every test gets its own database ``polku_rep_<hex>``, created next to the one named in
``POLKU_TEST_POSTGRES_URL`` and dropped (``WITH (FORCE)``) after it, so no replica of
one test ever sees another test's rows. Without the variable the tests are skipped,
with the reason shown.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from .cluster import QUIET_ARGS, Cluster

POSTGRES_ENV = "POLKU_TEST_POSTGRES_URL"

MakeCluster = Callable[..., Awaitable[Cluster]]


async def admin(url: str, *statements: str) -> None:
    """Run statements on a connection of their own."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def postgres_base() -> str:
    """The URL of ``POLKU_TEST_POSTGRES_URL``; skips the test when it is unset."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"replica tests need {POSTGRES_ENV} (e.g. postgresql://postgres@host/db)")
    return base


@pytest.fixture
async def replica_database(postgres_base: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test only; dropped after it."""
    name = f"polku_rep_{secrets.token_hex(6)}"
    await admin(postgres_base, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_base).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin(postgres_base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def make_cluster(replica_database: str) -> AsyncIterator[MakeCluster]:
    """``await make_cluster(n=3, extra_args=QUIET_ARGS)``: a started cluster, stopped after.

    The replicas' last lines are printed at teardown, so a failed test shows them.
    """
    made: list[Cluster] = []

    async def make(n: int = 3, extra_args: Sequence[str] = QUIET_ARGS) -> Cluster:
        cluster = Cluster(replica_database, n, extra_args)
        made.append(cluster)
        return await cluster.start()

    try:
        yield make
    finally:
        for cluster in made:
            await cluster.stop()
            print(cluster.report())
