"""``polku-registry serve`` refuses databases that are not its own, and quarantines bad rows.

SPEC §7 "Bad input": a database file that exists but is empty, or is not this
registry's, refuses to start with a one-line reason; ``--db`` never creates missing
parent folders (the embedded default may create its own data folder). Rows stored
by an earlier release whose address the strict parser now refuses are quarantined
at start: logged once, never dialled (canary listeners count connections), and
shutdown stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from helpers import RegistryProcess, environment

from registry.client import RegistryClient
from registry.migrate import upgrade
from registry.server import QUARANTINED
from registry.storage.store import SqlStore
from registry.testing import FakePlugin, eventually
from registry.wire import pb

DEADLINE = 60.0


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m registry serve`` that must exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "registry", "serve", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=env or environment(),
        stdin=subprocess.DEVNULL,
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused start printed on stderr (exit status 1)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("polku-registry: error: database ")
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_zero_length_database_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.touch()
    line = refused(serve("--db", f"sqlite:///{path}"))
    assert f"database {path} is empty but exists: refusing to start" in line
    assert path.stat().st_size == 0  # left as it was, not made a new registry


def test_another_applications_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total INTEGER)")
        conn.execute("INSERT INTO invoices VALUES (1, 100)")
        conn.commit()
    line = refused(serve("--db", f"sqlite:///{path}"))
    assert f"database {path} is not a polku-registry database" in line
    assert "invoices" in line
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert tables == {"invoices"}  # nothing of ours was added


def test_a_missing_folder_refuses_to_start_and_is_not_created(tmp_path: Path) -> None:
    folder = tmp_path / "no" / "such" / "folder"
    line = refused(serve("--db", f"sqlite:///{folder}/registry.db"))
    assert line == f"polku-registry: error: database folder {folder} does not exist"
    assert not (tmp_path / "no").exists()


def test_the_default_database_on_a_fresh_machine_creates_its_own_folder(tmp_path: Path) -> None:
    """The README's ``polku-registry serve``: no --db, no data folder yet."""
    env = environment()
    env["XDG_DATA_HOME"] = str(tmp_path / "home" / ".local" / "share")
    process = subprocess.Popen(
        [sys.executable, "-m", "registry", "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:  # until it serves (or exits: then the loop ends)
            if "serving on" in line:
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(DEADLINE) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
    assert (tmp_path / "home" / ".local" / "share" / "polku-registry" / "registry.db").is_file()


# -- quarantine -------------------------------------------------------------------


class Canary:
    """Listeners on loopback and on a unix socket that count the connections they get."""

    def __init__(self, folder: Path) -> None:
        self.socket = folder / "canary.sock"
        self.connections = 0
        self.port = 0
        self._servers: list[asyncio.Server] = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Canary]:
        tcp = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        unix = await asyncio.start_unix_server(self._accept, str(self.socket))
        self._servers = [tcp, unix]
        self.port = tcp.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            for server in self._servers:
                server.close()
                await server.wait_closed()


async def database_at_head(path: Path) -> None:
    store = SqlStore.open(f"sqlite:///{path}")
    try:
        await upgrade(store.engine)
    finally:
        await store.close()


def store_rows(path: Path, rows: dict[str, str]) -> None:
    """Write plugins as an earlier release stored them: HEALTHY, at ``address``, by SQL."""
    moment = "2026-01-01 00:00:00.000000"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for revision, (plugin_id, address) in enumerate(rows.items(), start=1):
            conn.execute(
                "INSERT INTO plugins (plugin_id, name, type, address, version, description, "
                "sources, emitter_name, capabilities, labels, lease_ttl_seconds, status, "
                "registered_at, revision, status_since) "
                "VALUES (?, ?, 1, ?, '', '', ?, '', '[]', '{}', 0, 2, ?, ?, ?)",
                (plugin_id, f"old-{revision}", address, f'["old-{revision}"]', moment, revision,
                 moment),
            )  # fmt: skip
            conn.execute(
                "INSERT INTO plugin_leases (plugin_id, last_heartbeat_at, last_check_at, "
                "last_error) VALUES (?, NULL, NULL, '')",
                (plugin_id,),
            )
        conn.execute("INSERT INTO registry_meta (id, revision) VALUES (1, ?)", (len(rows),))
        conn.commit()


async def test_stored_rows_with_addresses_no_longer_valid_are_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    await database_at_head(path)
    async with Canary(tmp_path).running() as canary, FakePlugin(sources=["old-4"]) as plugin:
        bad = {
            "01JQUARANTINE0000000000001": "unix://x",  # what the issue found: SIGTERM hung
            # What gRPC would dial (the canaries), in forms the strict parser refuses.
            "01JQUARANTINE0000000000002": f"unix://{canary.socket}",
            "01JQUARANTINE0000000000003": f"127.1:{canary.port}",
        }
        good = {"01JSTILLFINE00000000000004": plugin.address}
        store_rows(path, {**bad, **good})

        registry = RegistryProcess(f"sqlite:///{path}", "--health-interval", "0.1")
        try:
            address = await asyncio.to_thread(registry.start)
            async with RegistryClient(address) as client:
                revision = await quarantined_and_checked(client, bad)
                # The others are checked as ever: the quarantine picks the bad ones only.
                await eventually(
                    lambda: healthy(client, *good), within=DEADLINE, what="the good one HEALTHY"
                )
        finally:
            code = await asyncio.to_thread(registry.stop, DEADLINE)
        assert code == 0, registry.output  # bounded: not SIGKILLed after the deadline
        assert canary.connections == 0  # never dialled
        lines = [
            line
            for line in registry.output.splitlines()
            if "WARNING registry.server: quarantined" in line
        ]
        assert len(lines) == 1, lines  # logged once, naming every one of them
        assert "quarantined 3 stored plugin(s)" in lines[0]
        for plugin_id, stored in bad.items():
            assert plugin_id in lines[0]
            assert repr(stored) in lines[0]

        # A restart finds them quarantined already: no new revision, nothing dialled.
        again = RegistryProcess(f"sqlite:///{path}", "--health-interval", "0.1")
        try:
            address = await asyncio.to_thread(again.start)
            async with RegistryClient(address) as client:
                assert await quarantined_and_checked(client, bad) == revision
        finally:
            assert await asyncio.to_thread(again.stop, DEADLINE) == 0, again.output
        assert canary.connections == 0


async def quarantined_and_checked(client: RegistryClient, bad: dict[str, str]) -> int:
    """Each bad plugin UNHEALTHY, unroutable, and passed over by two checks; the revision."""
    for plugin_id in bad:
        first = await client.get_plugin(plugin_id)
        assert first.status == pb.PLUGIN_STATUS_UNHEALTHY
        await passed_over_twice(client, plugin_id)
    routable = await client.list_plugins(statuses=[pb.PLUGIN_STATUS_HEALTHY])
    assert not {p.plugin_id for p in routable} & set(bad)
    listed = await client.stub.ListPlugins(pb.ListPluginsRequest())
    return int(listed.revision)


async def healthy(client: RegistryClient, plugin_id: str) -> bool:
    return (await client.get_plugin(plugin_id)).status == pb.PLUGIN_STATUS_HEALTHY


async def passed_over_twice(client: RegistryClient, plugin_id: str) -> None:
    """Two checks came by and refused the address before any dial."""
    checks: set[int] = set()

    async def probe() -> bool:
        plugin = await client.get_plugin(plugin_id)
        assert plugin.status == pb.PLUGIN_STATUS_UNHEALTHY
        assert plugin.last_error in (
            QUARANTINED,
            "refused by the address policy (not a valid plugin address)",
        ), plugin.last_error
        if plugin.HasField("last_check_at"):
            checks.add(plugin.last_check_at.ToNanoseconds())
        return len(checks) >= 2

    await eventually(probe, within=DEADLINE, what=f"two checks of {plugin_id}")
