"""Fixtures shared by every layer: databases, a running registry, a client, ``wait_for``.

PostgreSQL tests read ``POLKU_TEST_POSTGRES_URL`` (e.g.
``postgresql://postgres@127.0.0.1:5432/test``) and are skipped, with the reason shown,
when it is unset. Each run creates its own database ``polku_test_<hex>`` next to the
one named in the URL and drops it at the end, so concurrent runs never share rows;
each test that asks for ``database_url`` gets an empty schema.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import make_url

from registry.client import RegistryClient
from registry.server import RegistryServer
from registry.testing import eventually, running_registry

POSTGRES_ENV = "POLKU_TEST_POSTGRES_URL"

T = TypeVar("T")


# -- waiting on a condition ---------------------------------------------------


async def wait_for(
    predicate: Callable[[], object | Awaitable[object]],
    within: float = 10.0,
    *,
    interval: float = 0.01,
    message: str = "",
) -> object:
    """:func:`registry.testing.eventually`, under the name these tests use."""
    return await eventually(
        predicate, within=within, what=message or "condition", interval=interval
    )


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Awaitable[object]]:
    """The :func:`wait_for` helper, for tests that prefer a fixture to an import."""
    return wait_for


# -- PostgreSQL ---------------------------------------------------------------


def run_off_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a private loop in another thread.

    Sync fixtures use it so they never touch the event loop a test runs on.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


async def _admin(url: str, *statements: str) -> None:
    import asyncpg  # the ``postgres`` extra: SQLite-only installs run without it

    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run; dropped at the end."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV} (e.g. postgresql://postgres@host/db)")
    name = f"polku_test_{secrets.token_hex(6)}"
    run_off_loop(_admin(base, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(base, name)
    finally:
        run_off_loop(_admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(name="postgres_admin")
def postgres_admin_fixture() -> Callable[..., Awaitable[None]]:
    """``await postgres_admin(url, *statements)``: run SQL on its own connection."""
    return _admin


def reset_postgres(url: str) -> None:
    """Empty the run's database: every table of the previous test goes."""
    run_off_loop(_admin(url, "DROP SCHEMA IF EXISTS public CASCADE", "CREATE SCHEMA public"))


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    """The run's PostgreSQL database with an empty schema, for PostgreSQL-only tests."""
    reset_postgres(postgres_url)
    return postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL with an empty schema: SQLite under tmp_path, or PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/registry.db"
    url: str = request.getfixturevalue("postgres_url")
    reset_postgres(url)
    return url


# -- a running registry -------------------------------------------------------


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    """A RegistryServer on 127.0.0.1:0 over SQLite under tmp_path."""
    async with running_registry(tmp_path) as server:
        yield server


@pytest.fixture
async def client(registry: RegistryServer) -> AsyncIterator[RegistryClient]:
    """A RegistryClient of ``registry``, closed after the test."""
    registry_client = RegistryClient(registry.address)
    try:
        yield registry_client
    finally:
        await registry_client.close()


# -- the Node.js example ---------------------------------------------------------------------

NODE_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"


@pytest.fixture(scope="session")
def node_example() -> Path:
    """examples/node with its node_modules, installed here when missing; else a skip."""
    if shutil.which("node") is None:
        pytest.skip("the Node.js example needs `node` on PATH")
    if not (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("examples/node/node_modules is missing and `npm` is not on PATH")
        try:
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund"],
                cwd=NODE_EXAMPLE,
                capture_output=True,
                text=True,
                timeout=100,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("examples/node/node_modules is missing and `npm install` timed out")
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            pytest.skip("`npm install` failed in examples/node: " + " | ".join(tail))
    return NODE_EXAMPLE
