"""A database that goes away or fills up: the registry says so, refuses writes, recovers.

SPEC §7 "Own health is honest": NOT_SERVING while writes fail, SERVING again when they
succeed. PostgreSQL: connections to the run's database are refused and cut
(``ALLOW_CONNECTIONS false`` + ``pg_terminate_backend``), then allowed again. SQLite: the
database lives on a small tmpfs (root only) that a file fills up, then is removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from registry.client import RegistryClient
from registry.errors import RegistryUnavailable
from registry.service import STORE_FAILED
from registry.testing import running_registry
from registry.wire import pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _info(name: str) -> pb.PluginInfo:
    return pb.PluginInfo(name=name, type=pb.PLUGIN_TYPE_INGESTOR, sources=[name])


async def _set_connections(admin, admin_url: str, database: str, allowed: bool) -> None:
    statements = [f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}']
    if not allowed:
        statements.append(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        )
    await admin(admin_url, *statements)


@pytest.mark.postgres
async def test_an_unreachable_database_means_not_serving_and_unavailable_writes(
    postgres_url: str, tmp_path, wait_for, postgres_admin
) -> None:
    await postgres_admin(
        postgres_url, "DROP SCHEMA IF EXISTS public CASCADE", "CREATE SCHEMA public"
    )
    admin_url = os.environ["POLKU_TEST_POSTGRES_URL"]  # another database of the same server
    database = make_url(postgres_url).database
    assert database
    async with (
        running_registry(tmp_path, database_url=postgres_url, db_check_interval=0.05) as server,
        RegistryClient(server.address) as client,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            response = await health.Check(health_pb2.HealthCheckRequest(service=""))
            return int(response.status)

        kept = await client.register(_info("kept"), "127.0.0.1:1", no_lease=True)
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        try:
            await _set_connections(postgres_admin, admin_url, database, allowed=False)
            await wait_for(
                lambda: _is(status(), health_pb2.HealthCheckResponse.NOT_SERVING), within=20
            )
            with pytest.raises(RegistryUnavailable):
                await client.register(_info("lost"), "127.0.0.1:1", no_lease=True)
            # Reads keep answering from memory while the database is away.
            assert kept.plugin_id in {p.plugin_id for p in await client.list_plugins()}
        finally:
            await _set_connections(postgres_admin, admin_url, database, allowed=True)
        await wait_for(lambda: _is(status(), health_pb2.HealthCheckResponse.SERVING), within=20)
        after = await wait_for(lambda: _register_ok(client, "after"), within=20)
        listed = {p.info.name for p in await client.list_plugins()}
        assert listed == {"kept", "after"}, listed  # the refused one was never stored
        assert after


async def _is(value, expected: int) -> bool:
    return await value == expected


async def _register_ok(client: RegistryClient, name: str) -> bool:
    try:
        await client.register(_info(name), "127.0.0.1:1", no_lease=True)
    except RegistryUnavailable:
        return False
    return True


# -- a full disk (SQLite) ---------------------------------------------------------------


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder``; unmounted on exit."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a tmpfs, which needs root")
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(path: Path) -> int:
    """Write ``path`` until its file system has no byte left; the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            chunk = b"\0" * size
            while True:
                try:
                    n = os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                if n == 0:
                    break
                written += n
    finally:
        os.close(fd)
    return written


async def test_a_full_disk_means_not_serving_and_unavailable_writes(
    tmp_path: Path, wait_for, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with small_disk(tmp_path / "disk") as disk:
        async with (
            running_registry(disk, db_check_interval=0.05, health_interval=3600.0) as server,
            RegistryClient(server.address) as client,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                response = await health.Check(health_pb2.HealthCheckRequest(service=""))
                return int(response.status)

            await client.register(_info("kept"), "127.0.0.1:1", no_lease=True)
            assert await status() == SERVING
            filler = disk / "filler"
            assert fill(filler) > 0
            try:
                # The write-ahead log cannot grow: the commit of a Register fails.
                with pytest.raises(RegistryUnavailable) as caught:
                    await client.register(_info("lost"), "127.0.0.1:1", no_lease=True)
                details = str(caught.value)
                # One of the fixed messages (the commit failed, or the catalog is reloading).
                fixed = (STORE_FAILED, "the registry database is unavailable; retry shortly")
                assert details.endswith(fixed), details
                for leak in ("SQL", "sqlite", "full", "INSERT", str(disk)):
                    assert leak not in details, (leak, details)
                assert "database or disk is full" in caplog.text  # the log has the reason
                # Pings still answer and the catalog reloads, but writes fail: NOT_SERVING.
                await wait_for(lambda: _is(status(), NOT_SERVING), within=20)
                assert await status() == NOT_SERVING  # and stays so: probes fail too
                with pytest.raises(RegistryUnavailable):
                    await client.register(_info("lost-too"), "127.0.0.1:1", no_lease=True)
                assert await status() == NOT_SERVING
                # Reads keep answering from memory.
                assert [p.info.name for p in await client.list_plugins()] == ["kept"]
            finally:
                filler.unlink()
            await wait_for(lambda: _is(status(), SERVING), within=20)
            assert await wait_for(lambda: _register_ok(client, "after"), within=20)
            listed = {p.info.name for p in await client.list_plugins()}
            assert listed == {"kept", "after"}, listed  # the refused ones were never stored
