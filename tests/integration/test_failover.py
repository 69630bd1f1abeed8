"""Clients given several registry addresses fail over between them (SPEC §8).

Real registries on SQLite under tmp_path; a "dead" address is a port bound and closed
again (connections refused), a "hung" one a listener that accepts connections and never
answers, and a "stuck" one a real gRPC server whose handlers never return.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ingestor import RegistryResolver
from registry.client import RegistryClient, parse_addresses
from registry.errors import NotFound, RegistryError, RegistryUnavailable
from registry.sdk import Backoff, PluginHost, run_plugin
from registry.server import RegistryServer
from registry.testing import FakePlugin, eventually, running_registry
from registry.wire import event_pb, pb, pb_grpc

DEADLINE = 30.0  # a bound on a failure, never a wait
TOKEN = "tok-3f9a1c77d2"
FAST = Backoff(initial=0.05, maximum=0.2)


def dead_address() -> str:
    """An address that refuses connections: a port bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


class Hung:
    """A TCP listener that accepts every connection and never says a word."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.accepted = 0
        self._connections: list[tuple[asyncio.StreamWriter, asyncio.Task[object]]] = []

    async def _silent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.append((writer, task))
        while await reader.read(65536):  # swallow the HTTP/2 preface; answer nothing
            pass

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Hung:
        self.server = await asyncio.start_server(self._silent, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer, _ in self._connections:
            writer.close()  # its reader sees the end, so its handler returns
        await asyncio.gather(*(task for _, task in self._connections))
        await self.server.wait_closed()


class StuckRegistry(pb_grpc.PluginRegistryServicer):  # type: ignore[misc]
    """A PluginRegistry whose Register and ListPlugins take the request and never answer."""

    def __init__(self) -> None:
        self.registers: list[pb.RegisterRequest] = []
        self.lists = 0
        self.release = asyncio.Event()

    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        self.registers.append(request)
        await self.release.wait()
        return pb.RegisterResponse()

    async def ListPlugins(
        self, request: pb.ListPluginsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPluginsResponse:
        self.lists += 1
        await self.release.wait()
        return pb.ListPluginsResponse()


@pytest.fixture
async def stuck() -> AsyncIterator[tuple[str, StuckRegistry]]:
    servicer = StuckRegistry()
    server = grpc.aio.server()
    pb_grpc.add_PluginRegistryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        servicer.release.set()
        await server.stop(None)


@pytest.fixture
async def hung() -> AsyncIterator[Hung]:
    async with Hung() as listener:
        yield listener


def info(name: str) -> pb.PluginInfo:
    return pb.PluginInfo(name=name, type=pb.PLUGIN_TYPE_INGESTOR, sources=[name])


async def plugins_of(registry: RegistryServer) -> list[pb.RegisteredPlugin]:
    """What ``registry`` holds, asked on its own address alone."""
    async with RegistryClient(registry.address) as client:
        return await client.list_plugins()


# -- addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        ("a:1", ("a:1",)),
        ("a:1,b:2", ("a:1", "b:2")),
        (" a:1 , ,b:2,a:1, ", ("a:1", "b:2")),
        (["a:1", " b:2 ", ""], ("a:1", "b:2")),
        (("ipv4:127.0.0.1:1,127.0.0.2:1",), ("ipv4:127.0.0.1:1,127.0.0.2:1",)),
    ],
)
def test_addresses_come_as_a_comma_separated_string_or_a_sequence(
    given: str | list[str], parsed: tuple[str, ...]
) -> None:
    assert parse_addresses(given) == parsed
    client = RegistryClient(given)
    assert client.addresses == parsed
    assert client.address == ",".join(parsed)
    assert client.current_address == parsed[0]


@pytest.mark.parametrize("given", ["", " , ", [], ["", " "]])
def test_no_address_at_all_is_refused(given: str | list[str]) -> None:
    with pytest.raises(RegistryError, match="none given"):
        RegistryClient(given)
    with pytest.raises(RegistryError, match="none given"):
        RegistryResolver(given)
    with pytest.raises(RegistryError, match="none given"):
        PluginHost({"name": "x", "sources": ["x"]}, ingest=lambda r: [], registry=given)


@pytest.mark.parametrize(
    "given", ["127.0.0.1:1,10.0.0.7:50051", ["[::1]:1", "10.0.0.7:50051", "localhost:2"]]
)
def test_a_token_in_clear_to_any_of_the_addresses_is_refused(given: str | list[str]) -> None:
    for make in (
        lambda: RegistryClient(given, token=TOKEN),
        lambda: RegistryResolver(given, token=TOKEN),
        lambda: PluginHost(
            {"name": "x", "sources": ["x"]}, ingest=lambda r: [], registry=given, token=TOKEN
        ),
    ):
        with pytest.raises(RegistryError, match=re.escape("in clear to 10.0.0.7:50051")) as caught:
            make()
        assert TOKEN not in str(caught.value)


def test_run_plugin_reads_several_addresses_from_POLKU_REGISTRY(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POLKU_REGISTRY", "127.0.0.1:1, 10.0.0.7:50051")
    # Refused at construction, before serving: the second address is off the host.
    with pytest.raises(RegistryError, match=re.escape("in clear to 10.0.0.7:50051")):
        run_plugin({"name": "x", "sources": ["x"]}, ingest=lambda r: [], token=TOKEN)


def test_tls_is_decided_per_address() -> None:
    mixed = RegistryClient("https://10.0.0.7:1,127.0.0.1:2", token=TOKEN)
    assert not mixed.secure  # the loopback one is plaintext, which a token may use
    assert RegistryClient(["https://10.0.0.7:1", "https://10.0.0.8:1"], token=TOKEN).secure


# -- unary calls -------------------------------------------------------------------------


async def test_dead_then_live_serves_every_call(tmp_path: Path) -> None:
    dead = dead_address()
    async with (
        running_registry(tmp_path) as live,
        FakePlugin(name="lines", sources=["lines"]) as plugin,
        RegistryClient([dead, live.address], timeout=DEADLINE) as client,
    ):
        assert client.current_address == dead
        assert await client.list_plugins() == []
        assert client.current_address == live.address  # sticks to the one that answered

        response = await client.register(info("lines"), plugin.address)
        assert response.accepted
        assert await client.heartbeat(response.plugin_id)
        assert (await client.get_plugin(response.plugin_id)).address == plugin.address
        assert [p.plugin_id for p in await plugins_of(live)] == [response.plugin_id]

        # An answer that is an error is an answer: no fail-over, the replica stays current.
        with pytest.raises(NotFound):
            await client.get_plugin("01HZZZZZZZZZZZZZZZZZZZZZZZ")
        assert client.current_address == live.address

        await client.unregister(response.plugin_id)
        assert await plugins_of(live) == []


async def test_a_replica_that_went_away_is_left_for_the_next(tmp_path: Path) -> None:
    async with running_registry(tmp_path / "b") as second:
        async with running_registry(tmp_path / "a") as first:
            client = RegistryClient([first.address, second.address], timeout=DEADLINE)
            async with client:
                await client.register(info("on-first"), "127.0.0.1:9", no_lease=True)
                assert client.current_address == first.address
                await first.stop()
                await client.register(info("on-second"), "127.0.0.1:9", no_lease=True)
                assert client.current_address == second.address
        assert [p.info.name for p in await plugins_of(second)] == ["on-second"]


async def test_every_replica_down_is_unavailable_naming_them() -> None:
    dead = [dead_address(), dead_address()]
    async with RegistryClient(dead, timeout=1.0) as client:
        with pytest.raises(RegistryUnavailable, match="no replica answered") as caught:
            await client.list_plugins()
    message = str(caught.value)
    assert all(address in message for address in dead)
    assert "\n" not in message


async def test_one_dead_address_fails_at_once_as_before() -> None:
    dead = dead_address()
    # A client that failed over would keep trying for its whole minute.
    async with RegistryClient(dead, timeout=60.0) as client:
        with pytest.raises(RegistryUnavailable) as caught:
            await asyncio.wait_for(client.list_plugins(), DEADLINE)
    assert str(caught.value).startswith("registry unavailable (UNAVAILABLE): ")
    assert "no replica answered" not in str(caught.value)


async def test_a_read_moves_on_from_a_hung_replica(tmp_path: Path, hung: Hung) -> None:
    async with (
        running_registry(tmp_path) as live,
        RegistryClient([hung.address, live.address], timeout=4.0) as client,
    ):
        async with RegistryClient(live.address) as direct:
            await direct.register(info("seen"), "127.0.0.1:9", no_lease=True)
        assert [p.info.name for p in await client.list_plugins()] == ["seen"]
        assert hung.accepted >= 1  # it was tried first
        assert client.current_address == live.address
        assert [p.info.name for p in await client.list_plugins()] == ["seen"]  # sticky


async def test_a_register_that_timed_out_is_not_sent_again(tmp_path: Path, hung: Hung) -> None:
    """Chosen: a write that timed out may have happened, so it is reported, not repeated.

    The caller's own retry then goes to the next replica.
    """
    async with (
        running_registry(tmp_path) as live,
        RegistryClient([hung.address, live.address], timeout=1.0) as client,
    ):
        with pytest.raises(RegistryUnavailable, match="may have happened") as caught:
            await client.register(info("once"), "127.0.0.1:9", no_lease=True)
        assert hung.address in str(caught.value)
        assert await plugins_of(live) == []
        assert client.current_address == live.address

        response = await client.register(info("once"), "127.0.0.1:9", no_lease=True)
        assert [p.plugin_id for p in await plugins_of(live)] == [response.plugin_id]


async def test_a_write_a_replica_took_and_never_answered_is_not_duplicated(
    tmp_path: Path, stuck: tuple[str, StuckRegistry]
) -> None:
    stuck_address, servicer = stuck
    async with (
        running_registry(tmp_path) as live,
        RegistryClient([stuck_address, live.address], timeout=2.0) as client,
    ):
        with pytest.raises(RegistryUnavailable, match="may have happened"):
            await client.register(info("taken"), "127.0.0.1:9", no_lease=True)
        assert [r.info.name for r in servicer.registers] == ["taken"]
        assert await plugins_of(live) == []  # not sent to the live one as well

        # A read is safe to repeat: it moves on from the stuck replica.
        async with RegistryClient([stuck_address, live.address], timeout=2.0) as reader:
            assert await reader.list_plugins() == []
        assert servicer.lists == 1


# -- Watch -------------------------------------------------------------------------------


async def test_watch_opens_on_the_current_address_and_moves_on_when_it_is_down(
    tmp_path: Path,
) -> None:
    dead = dead_address()
    async with (
        running_registry(tmp_path) as live,
        RegistryClient([dead, live.address], timeout=DEADLINE) as client,
    ):
        with pytest.raises(RegistryUnavailable, match=dead):
            async for _ in client.watch():
                pass
        assert client.current_address == live.address
        async for message in client.watch():
            assert message.snapshot
            break


async def test_the_resolver_follows_the_registry_across_replicas(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingestor.resolver")
    dead = dead_address()
    spare = dead_address()  # where the second registry will listen, on the same file
    async with (
        FakePlugin(name="first", sources=["first"]) as one,
        FakePlugin(name="second", sources=["second"]) as two,
    ):
        async with running_registry(tmp_path) as live:
            resolver = RegistryResolver(
                [dead, live.address, spare], backoff_initial=0.05, backoff_max=0.2
            )
            await resolver.start_async()
            try:
                await resolver.wait_synced_async(DEADLINE)
                async with RegistryClient(live.address) as client:
                    first = (await client.register(one.info(), one.address)).plugin_id
                await resolver.wait_for_async(lambda v: first in v.plugins, DEADLINE)
                revision = resolver.revision
                assert revision > 0
            except BaseException:
                await resolver.aclose()
                raise
        try:
            async with running_registry(tmp_path, listen=spare) as again:
                async with RegistryClient(again.address) as client:
                    second = (await client.register(two.info(), two.address)).plugin_id
                view = await resolver.wait_for_async(lambda v: second in v.plugins, DEADLINE)
                assert first in view.plugins  # the same registry: its catalogue stayed
        finally:
            await resolver.aclose()
    watching = [r.getMessage() for r in caplog.records if "watching registry" in r.getMessage()]
    assert watching[0] == f"watching registry {live.address} from revision 0"
    resumed = [re.fullmatch(rf"watching registry {spare} from revision (\d+)", m) for m in watching]
    assert any(match and int(match.group(1)) >= revision for match in resumed), watching


async def test_the_resolver_leaves_a_hung_replica(
    tmp_path: Path, hung: Hung, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingestor.resolver")
    async with running_registry(tmp_path) as live:
        resolver = RegistryResolver([hung.address, live.address], connect_timeout=0.5)
        async with resolver:
            view = await resolver.wait_synced_async(DEADLINE)
        assert view.plugins == {}
    # Left for its silence, not for gRPC giving up on the connection much later.
    messages = [record.getMessage() for record in caplog.records]
    assert f"registry {hung.address} unreachable: it sent nothing for 0.5 s" in messages
    assert f"watching registry {live.address} from revision 0" in messages


# -- the SDK -----------------------------------------------------------------------------


def lines(request: pb.IngestRequest) -> list[event_pb.Event]:
    return []


async def test_a_plugin_host_registers_and_heartbeats_past_a_dead_replica(tmp_path: Path) -> None:
    dead = dead_address()
    async with running_registry(tmp_path) as live:
        host = PluginHost(
            {"name": "lines", "sources": ["lines"]},
            ingest=lines,
            registry=[dead, live.address],
            lease_ttl_seconds=3,
            backoff=FAST,
        )
        assert host.registry == f"{dead},{live.address}"
        async with host:
            plugin_id = await asyncio.wait_for(host.wait_registered(), DEADLINE)
            async with RegistryClient(live.address) as client:

                async def heartbeat_seen() -> bool:
                    plugin = await client.get_plugin(plugin_id)
                    # Register sets it once; only a heartbeat moves it on.
                    return plugin.last_heartbeat_at.ToDatetime() > plugin.registered_at.ToDatetime()

                await eventually(heartbeat_seen, within=DEADLINE, what="a heartbeat")
        assert await plugins_of(live) == []  # and unregistered on the way out


async def test_a_plugin_host_moves_on_from_a_hung_replica(tmp_path: Path, hung: Hung) -> None:
    async with running_registry(tmp_path) as live:
        host = PluginHost(
            {"name": "lines", "sources": ["lines"]},
            ingest=lines,
            registry=f"{hung.address},{live.address}",
            registry_timeout=1.0,
            backoff=FAST,
        )
        async with host:
            plugin_id = await asyncio.wait_for(host.wait_registered(), DEADLINE)
            assert [p.plugin_id for p in await plugins_of(live)] == [plugin_id]
        # Its retry started at the next replica: the hung one was dialled once, not again.
        assert hung.accepted == 1
