"""500 concurrent registrations from 5 client processes against one registry process.

All are acknowledged, none is lost, and SQLite never reports "database is locked"
(the registry has a single writer that group-commits).
"""

from __future__ import annotations

import asyncio

from helpers import RegistryProcess, client_command, client_input, environment, parse_client

from registry import RegistryClient
from registry.wire import pb

PROCESSES = 5
PER_PROCESS = 100


def requests(prefix: str) -> list[pb.RegisterRequest]:
    return [
        pb.RegisterRequest(
            info=pb.PluginInfo(
                name=f"{prefix}-{i}", type=pb.PLUGIN_TYPE_INGESTOR, sources=[f"{prefix}-{i}"]
            ),
            address=f"127.0.0.1:{10000 + i}",
        )
        for i in range(PER_PROCESS)
    ]


async def run_client(address: str, prefix: str):
    process = await asyncio.create_subprocess_exec(
        *client_command(address),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(),
    )
    stdout, stderr = await process.communicate(client_input(requests(prefix)))
    assert process.returncode is not None
    return parse_client(stdout, stderr, process.returncode)


async def test_five_processes_register_five_hundred_plugins(tmp_path):
    registry = RegistryProcess(f"sqlite:///{tmp_path}/registry.db")
    try:
        address = await asyncio.to_thread(registry.start)
        results = await asyncio.gather(*(run_client(address, f"proc{n}") for n in range(PROCESSES)))
        async with RegistryClient(address, timeout=60) as client:
            listed = await client.list_plugins()
    finally:
        await asyncio.to_thread(registry.stop)

    for result in results:
        assert result.returncode == 0, result.stderr
        assert result.errors == []
        assert "database is locked" not in result.stderr
        assert len(result.ids) == PER_PROCESS
    acknowledged = [plugin_id for result in results for plugin_id in result.ids]
    assert len(set(acknowledged)) == PROCESSES * PER_PROCESS
    listed_ids = [p.plugin_id for p in listed]
    assert len(listed_ids) == len(set(listed_ids))
    assert set(listed_ids) == set(acknowledged)
    assert "database is locked" not in registry.output
    assert "Traceback" not in registry.output
