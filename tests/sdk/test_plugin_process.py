"""An SDK plugin as its own process against real registries: start-up, restarts, SIGTERM.

The plugin is ``examples/jsonl_ingestor.py`` (or, for the shutdown test, a plugin
whose ingest holds until the test releases it); registries are ``polku-registry
serve`` subprocesses, killed with SIGKILL and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from ingestor import ExternalIngestor, IngestContext, RegistryResolver
from registry import RegistryClient, RegistryServer
from registry.wire import pb, pb_grpc

from .conftest import (
    DEADLINE,
    EXAMPLES,
    Proc,
    WatchRecorder,
    free_port,
    start_registry,
    wait_healthy,
)

HERE = Path(__file__).parent


def jsonl_plugin(procs: Callable[..., Proc], registry_address: str, name: str) -> Proc:
    argv = [sys.executable, str(EXAMPLES / "jsonl_ingestor.py"), "--registry", registry_address]
    return procs(name, [*argv, "--name", name, "--source", name, "--lease-ttl", "3"])


async def test_a_plugin_started_before_the_registry_registers_once_it_is_up(procs, tmp_path):
    port = free_port()
    plugin = await jsonl_plugin(procs, f"127.0.0.1:{port}", "jsonl-early").start()
    await plugin.wait_line(r"listening on 127\.0\.0\.1:\d+")
    await plugin.wait_line(r"cannot register plugin jsonl-early")  # no registry yet

    _, address = await start_registry(procs, port, tmp_path / "registry.db")
    async with RegistryClient(address) as client:
        found = await wait_healthy(client, "jsonl-early")
    assert found.lease_ttl_seconds == 3

    payload = b'{"id": "a", "type": "login"}\nnot json\n{"id": "b", "level": "error"}\n'
    async with (
        RegistryResolver(address) as resolver,
        ExternalIngestor("jsonl-early", resolver=resolver) as ingestor,
    ):
        events = await ingestor.ingest_async(IngestContext("jsonl-early"), payload)
    assert [(e.id, e.event_type, e.source) for e in events] == [
        ("a", "login", "jsonl-early"),
        ("b", "jsonl", "jsonl-early"),
    ]


async def test_a_plugin_registers_again_after_the_registry_restarts_with_a_fresh_database(
    procs, tmp_path
):
    port = free_port()
    registry, address = await start_registry(procs, port, tmp_path / "first.db")
    await jsonl_plugin(procs, address, "jsonl-restart").start()
    async with RegistryClient(address) as client:
        first = await wait_healthy(client, "jsonl-restart")

    registry.send_signal(signal.SIGKILL)
    assert await registry.wait() == -signal.SIGKILL
    await start_registry(procs, port, tmp_path / "second.db")

    async with RegistryClient(address) as client:
        again = await wait_healthy(client, "jsonl-restart")
        assert [p.plugin_id for p in await client.list_plugins()] == [again.plugin_id]
    assert again.plugin_id != first.plugin_id
    assert again.address == first.address


async def test_sigterm_unregisters_first_then_lets_the_call_in_flight_finish(
    procs: Callable[..., Proc], registry: RegistryServer
) -> None:
    argv = [sys.executable, str(HERE / "gated_plugin.py"), "--registry", registry.address]
    plugin = await procs("gated plugin", [*argv, "--name", "gated"], stdin=True).start()
    async with RegistryClient(registry.address) as client, WatchRecorder(client) as watch:
        found = await wait_healthy(client, "gated")
        async with grpc.aio.insecure_channel(found.address) as channel:
            stub = pb_grpc.IngestorPluginStub(channel)
            request = pb.IngestRequest(source="gated", data=b"slow")
            call = asyncio.ensure_future(stub.Ingest(request, timeout=DEADLINE))
            await plugin.wait_line(r"^out: ingest started$")

            plugin.send_signal(signal.SIGTERM)
            await watch.wait(lambda: found.plugin_id in watch.removed())
            assert plugin.returncode is None  # still draining: the call holds it

            await plugin.write("release\n")
            response = await call
        assert [e.payload for e in response.events] == [b"slow"]
        assert await plugin.wait() == 0
        assert await client.list_plugins(name="gated") == []
    await plugin.wait_line(r"unregistered " + found.plugin_id)
