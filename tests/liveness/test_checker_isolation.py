"""The health checker is not held up by a plugin whose Health hangs (SPEC §7, §5).

3,000 registrations point at one plugin whose ``Health`` never answers (or are spread
over a few such ports), on a real registry with a 0.5 s check deadline. Then a new
healthy plugin still becomes HEALTHY, a plugin process killed with SIGKILL still stops
being routable, the hanging registrations themselves still become UNHEALTHY, and the
work in flight (asyncio tasks, calls the hanging plugin sees at once) follows the
number of addresses, not of registrations. Deadlines only bound failures; how long each
step took is logged at INFO (``-o log_cli=true --log-cli-level=INFO`` shows it;
bench/isolation_bench.py is where it is measured).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from registry import PluginStatus, RegistryClient
from registry.lifecycle import AsyncService
from registry.poller import CheckSettings
from registry.server import RegistryServer
from registry.testing import FakePlugin, running_registry
from registry.wire import pb, pb_grpc

from .conftest import (
    DEADLINE,
    eventually,
    plugin_info,
    plugin_process,
    resolved_ids,
    wait_status,
)

log = logging.getLogger(__name__)

HEALTHY = PluginStatus.HEALTHY
REGISTRATIONS = 3_000
SETTINGS = {"health_timeout": 0.5, "health_interval": 1.0, "deregister_after": 0}
# Calls one address may have in flight: the regular bound plus one fast-lane call.
PER_ADDRESS = CheckSettings().per_address + 1
# asyncio tasks one Health call in flight costs, both ends in this process: the
# checker's call, grpc's client call, the plugin's handler and request (5; 6 with room).
TASKS_PER_CALL = 6
# Tasks besides the calls (the client, a plugin process's pipes, a registry RPC or two,
# a channel watcher per port): a constant, whatever the number of registrations.
SLACK = 40


class _Hanging(pb_grpc.IngestorPluginServicer):
    def __init__(self, plugin: HangingPlugin) -> None:
        self._plugin = plugin

    async def Health(
        self, request: Empty, context: grpc.aio.ServicerContext
    ) -> pb.PluginHealthResponse:
        plugin = self._plugin
        plugin.calls += 1
        if plugin.calls <= plugin.answer:
            return pb.PluginHealthResponse(healthy=True)
        plugin.in_flight += 1
        plugin.most_in_flight = max(plugin.most_in_flight, plugin.in_flight)
        try:
            await plugin.release.wait()  # never set while the test runs
            return pb.PluginHealthResponse(healthy=True)
        finally:
            plugin.in_flight -= 1


class HangingPlugin(AsyncService):
    """An ingestor on ``ports`` ports of 127.0.0.1 whose Health never answers.

    Only its first ``answer`` calls get an answer (healthy). Counts ``calls``, the calls
    ``in_flight`` now and the ``most_in_flight`` at once (a call leaves when its
    deadline passes: grpc cancels the handler).
    """

    def __init__(self, ports: int = 1, *, answer: int = 0) -> None:
        self.ports = ports
        self.answer = answer
        self.addresses: list[str] = []
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_IngestorPluginServicer_to_server(_Hanging(self), server)
        for _ in range(self.ports):
            self.addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        self.release.set()
        if server is not None:
            await server.stop(None)


async def _register_many(client: RegistryClient, addresses: list[str], count: int) -> None:
    """``count`` registrations with names of their own, round-robin over ``addresses``."""
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            info = plugin_info(f"hang-{i}")
            await client.register(info, addresses[i % len(addresses)], no_lease=True)

    await asyncio.gather(*(worker() for _ in range(64)))


def _unhealthy_hanging(registry: RegistryServer) -> int:
    """How many ``hang-`` plugins readers see UNHEALTHY (the stored, published view)."""
    return sum(
        1
        for p in registry.state.view
        if p.name.startswith("hang-") and p.status is PluginStatus.UNHEALTHY
    )


@pytest.mark.parametrize(
    ("ports", "registrations"),
    [(1, REGISTRATIONS), (3, REGISTRATIONS), (1, 0)],
    ids=["3000-at-one-port", "3000-over-three-ports", "none"],
)
async def test_checks_are_not_held_up_by_registrations_at_a_hanging_plugin(
    tmp_path, ports: int, registrations: int
):
    async with (
        running_registry(tmp_path, **SETTINGS) as registry,
        HangingPlugin(ports) as hanging,
        FakePlugin(sources=["fresh"]) as fresh,
        RegistryClient(registry.address, timeout=60.0) as client,
    ):
        tasks_before = len(asyncio.all_tasks())
        await _register_many(client, hanging.addresses, registrations)
        if registrations:

            async def hung() -> bool:
                return hanging.in_flight >= ports

            await eventually(hung, what="their first checks to hang")
        most_tasks = len(asyncio.all_tasks())

        began = time.monotonic()
        fresh_id = (await client.register(plugin_info("fresh"), fresh.address)).plugin_id
        await wait_status(client, fresh_id, HEALTHY)
        healthy_after = time.monotonic() - began

        async with plugin_process("doomed", "doomed") as process:
            doomed_id = (
                await client.register(plugin_info("doomed"), process.address, no_lease=True)
            ).plugin_id
            await wait_status(client, doomed_id, HEALTHY)
            assert await resolved_ids(client, "doomed") == {doomed_id}
            process.signal(signal.SIGKILL)
            began = time.monotonic()

            async def unroutable() -> bool:
                return doomed_id not in await resolved_ids(client, "doomed")

            await eventually(unroutable, what="the killed plugin to leave Resolve")
            unroutable_after = time.monotonic() - began

        # One answer serves every registration at an address: the hanging ones are
        # told apart from healthy ones too (3 timeouts each), not left unchecked.
        async def all_unhealthy() -> bool:
            nonlocal most_tasks
            most_tasks = max(most_tasks, len(asyncio.all_tasks()))
            return _unhealthy_hanging(registry) == registrations

        await eventually(all_unhealthy, what=f"{registrations} hanging plugins UNHEALTHY")
        assert await resolved_ids(client, "hang-0") == set()
        assert await resolved_ids(client, "fresh") == {fresh_id}

        # Work in flight follows the addresses: a few calls per port, never one
        # task (or call) per registration.
        log.info(
            "%d registrations over %d hanging ports: new plugin HEALTHY after %.3f s, "
            "killed one unroutable after %.3f s; %d calls to the hanging plugin, at most %d "
            "at once; at most %d tasks more than before",
            registrations,
            ports,
            healthy_after,
            unroutable_after,
            hanging.calls,
            hanging.most_in_flight,
            most_tasks - tasks_before,
        )
        # The plugin sees a call end a moment after the checker (its own deadline timer
        # fires later), so the next call may overlap it: twice the bound, at most.
        calls_at_once = 2 * PER_ADDRESS * ports
        assert hanging.most_in_flight <= calls_at_once
        assert most_tasks - tasks_before <= SLACK + TASKS_PER_CALL * calls_at_once


async def test_fast_lane_runs_beside_a_regular_bound_held_by_a_hanging_call(tmp_path):
    """One regular slot, held by a hanging call: first checks and re-checks still run.

    The slot stays held for the suite's whole failure deadline, so everything below
    happened beside that one call, never after it.
    """
    settings = {"health_concurrency": 1, "health_timeout": DEADLINE, "health_interval": 0.2}
    async with (
        running_registry(tmp_path, **settings, deregister_after=0) as registry,
        HangingPlugin(answer=1) as hanging,
        RegistryClient(registry.address) as client,
    ):
        held_id = (
            await client.register(plugin_info("held"), hanging.addresses[0], no_lease=True)
        ).plugin_id
        await wait_status(client, held_id, HEALTHY)  # its first check was answered

        async def slot_held() -> bool:
            return hanging.in_flight == 1  # its next, regular check hangs

        await eventually(slot_held, what="the regular slot to be held")
        calls = hanging.calls

        async with FakePlugin(sources=["fresh"]) as fresh:
            fresh_id = (await client.register(plugin_info("fresh"), fresh.address)).plugin_id
            await wait_status(client, fresh_id, HEALTHY)
        async with plugin_process("doomed", "doomed") as process:
            doomed_id = (
                await client.register(plugin_info("doomed"), process.address, no_lease=True)
            ).plugin_id
            await wait_status(client, doomed_id, HEALTHY)
            process.signal(signal.SIGKILL)

            async def unroutable() -> bool:
                return doomed_id not in await resolved_ids(client, "doomed")

            await eventually(unroutable, what="the killed plugin to leave Resolve")

        assert (hanging.calls, hanging.in_flight) == (calls, 1)


@pytest.mark.parametrize("first_check_wait", [0.25, 0.0], ids=["folded", "poller"])
async def test_registrations_at_one_address_share_its_answer(tmp_path, first_check_wait):
    """One process, one question: due together, its registrations share one Health call,
    whether Register waits for the first check (folded) or the poller makes it."""
    count = 100
    async with (
        running_registry(
            tmp_path, health_interval=60, first_check_wait=first_check_wait
        ) as registry,
        FakePlugin() as plugin,
        RegistryClient(registry.address) as client,
    ):
        plugin.health_delay = 0.2  # slow enough that registrations pile up behind a call
        registered = await asyncio.gather(
            *(client.register(plugin_info(f"many-{i}"), plugin.address) for i in range(count))
        )
        ids = {r.plugin_id for r in registered}

        async def all_healthy() -> bool:  # as readers see them (stored, published)
            found = [registry.state.view.get(plugin_id) for plugin_id in ids]
            return all(p is not None and p.status is HEALTHY for p in found)

        await eventually(all_healthy, what=f"{count} registrations HEALTHY")
        found = [await client.get_plugin(plugin_id) for plugin_id in ids]
        assert all(p.HasField("last_check_at") and p.last_error == "" for p in found)
        assert plugin.health_calls < count
