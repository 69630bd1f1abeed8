"""A database that goes away: the registry says so, refuses writes cleanly, and recovers.

PostgreSQL only: connections to the run's database are refused and cut
(``ALLOW_CONNECTIONS false`` + ``pg_terminate_backend``), then allowed again.
"""

from __future__ import annotations

import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from registry.client import RegistryClient
from registry.errors import RegistryUnavailable
from registry.testing import running_registry
from registry.wire import pb

pytestmark = pytest.mark.postgres


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
