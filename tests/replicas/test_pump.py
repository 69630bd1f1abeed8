"""SPEC §8, the change pump: every replica follows ``changes`` whatever its connection does.

The pump's own connection (``application_name`` ``polku-registry-pump``) is cut on every
replica with ``pg_terminate_backend``, and PostgreSQL itself is restarted: afterwards
writes are accepted again, every replica lists the same plugins at the head, and every
Watch stream opened before has all the changes, in order, with no fresh snapshot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from .cluster import PUMP_APPLICATION, Cluster
from .common import DEADLINE, short, until
from .conftest import MakeCluster
from .load import register_request, register_retrying
from .streams import check_streams

pytestmark = pytest.mark.postgres

CONFIG = Path("/etc/postgresql")
WRITES = 9


async def write_everywhere(cluster: Cluster, prefix: str, port_base: int) -> set[str]:
    """``WRITES`` concurrent registrations, each through its own replica first (retried
    through the others until accepted); returns their plugin ids."""
    addresses = cluster.addresses
    responses = await asyncio.gather(
        *(
            register_retrying(
                cluster,
                addresses[n % 3 :] + addresses[: n % 3],
                register_request(f"{prefix}-{n}", port_base + n),
                within=2 * DEADLINE,
            )
            for n in range(WRITES)
        )
    )
    return {r.plugin_id for r in responses}


async def test_pump_connections_cut_every_replica_catches_up(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    await cluster.leader()
    streams = [await cluster.watch(a) for a in cluster.addresses]
    before = await write_everywhere(cluster, "before-cut", 26000)
    await cluster.wait_agreed()

    seen: list[dict[str, list[int]]] = [{}]

    async def each_has_one() -> bool:
        seen[0] = found = await cluster.pumps()
        return all(found.get(a) for a in cluster.addresses)

    await until(
        each_has_one,
        what=lambda: (
            f"a pump connection (application_name {PUMP_APPLICATION}) of every "
            f"replica; backend pids by replica: {seen[0]}"
        ),
    )
    cut = sorted(pid for pids in seen[0].values() for pid in pids)
    killed = await cluster.query(
        "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity WHERE pid = ANY($1::int[])",
        cut,
    )
    assert all(r["done"] for r in killed), f"not every pump connection was cut: {killed}"

    after = await write_everywhere(cluster, "after-cut", 26100)
    agreed = await cluster.wait_agreed()
    await check_streams(cluster, streams, agreed.head)
    assert before | after <= set(agreed.listing.plugins)

    # Followers read every change through their pump, so each must connect again. The
    # leader's pump stands still while it leads (it publishes its own commits) and
    # connects again when it steps down.
    followers = await cluster.followers()

    async def reconnected() -> bool:
        seen[0] = found = await cluster.pumps()
        return all(found.get(a) and not set(found[a]) & set(cut) for a in followers)

    await until(
        reconnected,
        what=lambda: (
            f"the pumps of the followers {followers} to connect again: cut {cut}, "
            f"now by replica {seen[0]}"
        ),
    )


def postgres_version() -> str:
    """The version of the local cluster ``main`` that ``pg_ctlcluster`` manages; skips
    the test when there is none or this user may not restart it."""
    if shutil.which("pg_ctlcluster") is None:
        pytest.skip("restarting PostgreSQL needs pg_ctlcluster, which is not installed")
    versions = sorted(p.name for p in CONFIG.glob("*") if (p / "main").is_dir())
    if not versions:
        pytest.skip(f"no PostgreSQL cluster 'main' under {CONFIG} for pg_ctlcluster")
    version = versions[-1]
    owner = (CONFIG / version / "main").stat().st_uid
    if os.geteuid() not in (0, owner):
        pytest.skip(f"pg_ctlcluster {version} main restart is not permitted to this user")
    return version


async def started_at(cluster: Cluster) -> object:
    rows = await cluster.query("SELECT pg_postmaster_start_time() AS at")
    return rows[0]["at"]


async def accepting(cluster: Cluster) -> bool:
    """Whether PostgreSQL answers (pg_isready where installed), and a query on it works."""
    if shutil.which("pg_isready"):
        proc = await asyncio.create_subprocess_exec(
            "pg_isready",
            "-d",
            cluster.database_url,
            "-t",
            "2",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if await proc.wait() != 0:
            return False
    try:
        await cluster.query("SELECT 1")
    except Exception:  # still starting up: refused, reset, or 'the database system is starting up'
        return False
    return True


async def test_postgres_restarted_every_replica_catches_up(make_cluster: MakeCluster) -> None:
    version = postgres_version()
    cluster = await make_cluster()
    await cluster.leader()
    streams = [await cluster.watch(a) for a in cluster.addresses]
    before = await write_everywhere(cluster, "before-restart", 27000)
    await cluster.wait_agreed()
    first_start = await started_at(cluster)

    proc = await asyncio.create_subprocess_exec(
        "pg_ctlcluster",
        version,
        "main",
        "restart",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 2 * DEADLINE)
    text = output.decode(errors="replace").strip()
    if proc.returncode != 0 and "permission" in text.lower():
        pytest.skip(f"pg_ctlcluster {version} main restart is not permitted: {text}")
    assert proc.returncode == 0, (
        f"pg_ctlcluster {version} main restart exited {proc.returncode}: {text}"
    )
    await until(
        lambda: accepting(cluster),
        within=2 * DEADLINE,
        what="PostgreSQL to accept connections again",
    )
    assert await started_at(cluster) != first_start, "PostgreSQL did not restart"

    after = await write_everywhere(cluster, "after-restart", 27100)
    agreed = await cluster.wait_agreed(within=2 * DEADLINE)
    await check_streams(cluster, streams, agreed.head)
    listed = set(agreed.listing.plugins)
    assert before | after <= listed, f"missing: {short(sorted((before | after) - listed))}"
