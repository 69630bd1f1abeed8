"""One registry per SQLite file (SPEC §8): a second ``serve`` or a ``migrate`` on a file a
registry holds exits 1 with one line naming the holder's pid, and migrates nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from alembic import command
from helpers import RegistryProcess, environment
from sqlalchemy.engine import Connection

from registry.client import RegistryClient
from registry.migrate import alembic_config
from registry.replica.lock import DatabaseLock
from registry.storage.store import SqlStore
from registry.wire import pb

DEADLINE = 60.0  # bound on a process's start or exit, never a wait
OLD_REVISION = "0002"


class Registry(RegistryProcess):
    """A registry process whose pid the test compares with the refusals."""

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m registry ARGS`` that must exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "registry", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=environment(),
        stdin=subprocess.DEVNULL,
    )


async def refused(*args: str) -> str:
    """The one line a refused command printed, all its output together (exit status 1)."""
    result = await asyncio.to_thread(run, *args)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1, lines
    assert "Traceback" not in result.stderr
    return lines[0]


def in_use(path: Path, pid: int) -> str:
    return f"polku-registry: error: database {path} is in use by another registry (pid {pid})"


def serve_args(path: Path) -> list[str]:
    return RegistryProcess(f"sqlite:///{path}").argv[3:]  # "serve --listen ... --db URL"


async def database_at(path: Path, revision: str) -> None:
    """A registry database migrated to ``revision`` only, as an older release left it."""

    def upgrade_to(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    store = SqlStore.open(f"sqlite:///{path}")
    try:
        async with store.engine.begin() as conn:
            await conn.run_sync(upgrade_to)
    finally:
        await store.close()


def revision_of(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]


async def registered(client: RegistryClient, name: str) -> str:
    info = pb.PluginInfo(name=name, type=pb.PLUGIN_TYPE_INGESTOR, sources=[name])
    response = await client.register(info, "127.0.0.1:9", no_lease=True)
    assert response.accepted, response
    return response.plugin_id


async def test_a_second_serve_on_one_file_exits_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.db"
    first = Registry(f"sqlite:///{path}")
    try:
        address = await asyncio.to_thread(first.start)
        async with RegistryClient(address) as client:
            before = await registered(client, "before")

            line = await refused(*serve_args(path))
            assert line == in_use(path, first.pid)

            # The first one still serves, reads and writes, after the second has gone.
            assert (await client.get_plugin(before)).plugin_id == before
            after = await registered(client, "after")
        assert first.returncode is None
    finally:
        code = await asyncio.to_thread(first.stop, DEADLINE)
    assert code == 0, first.output

    # A graceful stop freed the lock: the next registry on the file starts and has both.
    with Registry(f"sqlite:///{path}") as again:
        address = await asyncio.to_thread(again.start)
        async with RegistryClient(address) as client:
            ids = {p.plugin_id for p in await client.list_plugins()}
    assert ids == {before, after}


async def test_serve_on_a_locked_old_database_migrates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    await database_at(path, OLD_REVISION)
    assert revision_of(path) == [OLD_REVISION]

    with DatabaseLock.acquire(path):
        line = await refused(*serve_args(path))
        assert line == in_use(path, os.getpid())
        assert revision_of(path) == [OLD_REVISION]  # refused before migrating

        line = await refused("migrate", "--db", f"sqlite:///{path}")
        assert line == in_use(path, os.getpid())
        assert revision_of(path) == [OLD_REVISION]

    # Once free, the same command does migrate it: the refusals above were the lock's.
    result = await asyncio.to_thread(run, "migrate", "--db", f"sqlite:///{path}")
    assert result.returncode == 0, result.stderr
    assert revision_of(path) != [OLD_REVISION]


async def test_migrate_on_a_live_registrys_file_exits_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    live = Registry(f"sqlite:///{path}")
    with live:
        address = await asyncio.to_thread(live.start)
        line = await refused("migrate", "--db", f"sqlite:///{path}")
        assert line == in_use(path, live.pid)
        async with RegistryClient(address) as client:
            assert await client.list_plugins() == []
