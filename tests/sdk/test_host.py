"""PluginHost inside an existing program, against an in-process registry.

Handlers of every shape, what their errors become, the lifecycle rules, and how the
host keeps its registration: retries while the registry is down or a source is taken,
re-registers when forgotten, and unregisters before it stops serving.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from registry import InvalidArgument, RegistryClient, RegistryError, RegistryServer
from registry.sdk import Backoff, PluginHost, serve_until_signalled
from registry.testing import running_registry
from registry.validation import Limits
from registry.wire import event_pb, pb, pb_grpc

from .conftest import WatchRecorder, eventually, free_port, wait_healthy

FAST = Backoff(initial=0.05, maximum=0.2)


def lines(request: pb.IngestRequest) -> list[event_pb.Event]:
    return [
        event_pb.Event(id=str(i), source=request.source, payload=line)
        for i, line in enumerate(request.data.splitlines())
    ]


def host_for(
    registry: RegistryServer | str, name: str = "lines", description: str = "", **kwargs: Any
) -> PluginHost:
    address = registry if isinstance(registry, str) else registry.address
    kwargs.setdefault("ingest", lines)
    info = {"name": name, "sources": [name], "description": description}
    return PluginHost(info, registry=address, lease_ttl_seconds=3, backoff=FAST, **kwargs)


def ingestor_stub(host: PluginHost) -> tuple[grpc.aio.Channel, pb_grpc.IngestorPluginStub]:
    channel = grpc.aio.insecure_channel(host.address)
    return channel, pb_grpc.IngestorPluginStub(channel)


async def ingest(host: PluginHost, data: bytes, source: str = "lines") -> pb.IngestResponse:
    channel, stub = ingestor_stub(host)
    async with channel:
        response: pb.IngestResponse = await stub.Ingest(
            pb.IngestRequest(source=source, data=data), timeout=30
        )
        return response


async def health(host: PluginHost) -> pb.PluginHealthResponse:
    channel, stub = ingestor_stub(host)
    async with channel:
        response: pb.PluginHealthResponse = await stub.Health(Empty(), timeout=30)
        return response


# -- inside an existing program -----------------------------------------------------------


async def test_the_context_manager_registers_then_unregisters(registry: RegistryServer) -> None:
    async with RegistryClient(registry.address) as client, WatchRecorder(client) as watch:
        async with host_for(registry, description="one event per line") as host:
            plugin_id = await host.wait_registered()
            assert host.plugin_id == plugin_id
            plugin = await wait_healthy(client, "lines")
            assert plugin.plugin_id == plugin_id
            assert plugin.address == host.address == f"127.0.0.1:{host.port}"
            assert plugin.info.type == pb.PLUGIN_TYPE_INGESTOR  # inferred from ingest=
            assert plugin.info.description == "one event per line"
            assert plugin.lease_ttl_seconds == 3
        assert plugin_id in watch.removed()
        assert host.plugin_id is None
        assert await client.list_plugins() == []


async def test_labels_and_an_explicit_advertised_address_are_registered(registry):
    host = host_for(registry, advertise="plugin.internal:9001", labels={"zone": "a"})
    async with RegistryClient(registry.address) as client, host:
        plugin = await client.get_plugin(await host.wait_registered())
    assert plugin.address == host.address == "plugin.internal:9001"
    assert dict(plugin.labels) == {"zone": "a"}


async def test_a_wildcard_listen_address_advertises_the_route_to_the_registry(registry):
    async with host_for(registry, listen="0.0.0.0:0") as host:
        assert host.address == f"127.0.0.1:{host.port}"
        assert (await health(host)).healthy


# -- handlers -------------------------------------------------------------------------------


def sync_list(request):
    return lines(request)


def sync_generator(request):
    yield from lines(request)


async def async_response(request):
    return pb.IngestResponse(events=lines(request))


async def async_generator(request):
    for event in lines(request):
        yield event


class LinesPlugin:
    def ingest(self, request):
        return lines(request)

    async def health(self):
        return pb.PluginHealthResponse(healthy=True, message="class")


@pytest.mark.parametrize(
    "handler",
    [sync_list, sync_generator, async_response, async_generator],
    ids=lambda f: f.__name__,
)
async def test_ingest_handlers_of_every_shape(registry, handler):
    async with host_for(registry, ingest=handler) as host:
        response = await ingest(host, b"a\nb")
    assert [e.payload for e in response.events] == [b"a", b"b"]


async def test_a_class_gives_its_methods(registry):
    async with PluginHost({"name": "c", "sources": ["c"]}, LinesPlugin(), registry="x:1") as host:
        assert [e.payload for e in (await ingest(host, b"z")).events] == [b"z"]
        assert (await health(host)).message == "class"


async def test_errors_and_events_travel_together(registry):
    def parse(request):
        yield event_pb.Event(id="1")
        yield pb.IngestError(message="bad", offset=7)

    async with host_for(registry, ingest=parse) as host:
        response = await ingest(host, b"")
    assert [e.id for e in response.events] == ["1"]
    assert [(e.message, e.offset) for e in response.errors] == [("bad", 7)]


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_an_exception_in_ingest_answers_internal_with_its_message(registry, asynchronous):
    def fail(request):
        raise ValueError("no good")

    async def fail_async(request):
        fail(request)

    async with host_for(registry, ingest=fail_async if asynchronous else fail) as host:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ingest(host, b"x")
        assert (await health(host)).healthy  # the plugin itself goes on
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "ingest failed: ValueError: no good"


async def test_an_ingest_that_gives_something_else_answers_internal(registry):
    async with host_for(registry, ingest=lambda request: ["not an event"]) as host:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ingest(host, b"x")
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "expected Event or IngestError" in (caught.value.details() or "")


async def test_health_is_healthy_by_default_and_follows_the_authors_answer(registry):
    state: dict[str, bool | None] = {"healthy": True}

    def check():
        if state["healthy"] is None:
            raise RuntimeError("database gone")
        return state["healthy"]

    async with host_for(registry, health=None) as host:
        assert (await health(host)).healthy
    async with host_for(registry, health=check) as host:
        assert (await health(host)).healthy
        state["healthy"] = False
        assert not (await health(host)).healthy
        state["healthy"] = None
        answer = await health(host)
        assert not answer.healthy
        assert answer.message == "RuntimeError: database gone"


async def test_a_blocking_ingest_does_not_stall_health_or_other_calls(registry):
    release = threading.Event()
    entered = threading.Event()

    def blocking(request):
        if request.data == b"block":
            entered.set()
            release.wait(30)
        return lines(request)

    async with host_for(registry, ingest=blocking) as host:
        blocked = asyncio.ensure_future(ingest(host, b"block"))
        assert await eventually(entered.is_set, what="the blocking ingest to start")
        assert (await health(host)).healthy
        assert [e.payload for e in (await ingest(host, b"quick")).events] == [b"quick"]
        assert not blocked.done()
        release.set()
        assert [e.payload for e in (await blocked).events] == [b"block"]


async def test_an_emitter_emits_and_answers_shutdown(registry):
    emitted: list[event_pb.Event] = []
    shutdowns: list[bool] = []

    async def emit(request):
        emitted.extend(request.events)

    info = pb.PluginInfo(name="sink", emitter_name="sink-out")
    host = PluginHost(
        info, emit=emit, shutdown=lambda: shutdowns.append(True), registry=registry.address
    )
    async with RegistryClient(registry.address) as client, host:
        await host.wait_registered()
        resolved = await eventually(
            lambda: _endpoints(client, "sink-out"), what="the emitter to be routable"
        )
        assert resolved[0].address == host.address
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = pb_grpc.EmitterPluginStub(channel)
            assert (await stub.Info(Empty())).type == pb.PLUGIN_TYPE_EMITTER
            events = [event_pb.Event(id="1"), event_pb.Event(id="2")]
            assert (await stub.Emit(pb.EmitRequest(events=events))).success_count == 2
            assert (await stub.Shutdown(Empty())).success
    assert [e.id for e in emitted] == ["1", "2"]
    assert shutdowns == [True]


async def _endpoints(client: RegistryClient, emitter_name: str) -> list[pb.Endpoint]:
    return list((await client.resolve(emitter_name=emitter_name)).endpoints)


# -- construction and lifecycle -------------------------------------------------------------


@pytest.mark.parametrize(
    ("info", "handlers", "error", "text"),
    [
        ({"name": "x", "sources": ["x"]}, {}, ValueError, "exactly one of ingest"),
        ({"name": "x", "sources": ["x"]}, {"ingest": lines, "emit": lines}, ValueError, "one"),
        ({"name": "x"}, {"ingest": lines}, InvalidArgument, "info.sources"),
        ({"name": "bad name!", "sources": ["x"]}, {"ingest": lines}, InvalidArgument, "info.name"),
        ({"name": "x", "type": 2}, {"ingest": lines}, ValueError, "PLUGIN_TYPE_EMITTER"),
        ({"name": "x", "colour": "red"}, {"ingest": lines}, ValueError, "colour"),
    ],
)
def test_construction_refuses_what_cannot_work(info, handlers, error, text):
    with pytest.raises(error, match=text):
        PluginHost(info, **handlers)


def test_a_bad_advertised_address_is_refused_at_once():
    with pytest.raises(InvalidArgument, match="advertise"):
        PluginHost({"name": "x", "sources": ["x"]}, ingest=lines, advertise="no-port")


async def test_start_and_stop_are_idempotent_and_a_stopped_host_stays_stopped(registry):
    host = host_for(registry)
    await host.stop()  # before start: nothing to do
    host = host_for(registry)
    await host.start()
    port = host.port
    await host.start()
    assert host.port == port
    await host.wait_registered()
    await asyncio.gather(host.stop(), host.stop())
    await host.stop()
    with pytest.raises(RegistryError, match="stopped"):
        await host.start()
    with pytest.raises(RegistryError, match="stopped"):
        await host.wait_registered()


async def test_a_port_in_use_is_an_error_from_start(registry):
    async with host_for(registry) as first:
        second = host_for(registry, listen=f"127.0.0.1:{first.port}")
        with pytest.raises(RegistryError, match="cannot listen"):
            await second.start()
        await second.stop()


async def test_stop_unregisters_before_the_call_in_flight_finishes(registry):
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(request):
        started.set()
        await release.wait()
        return lines(request)

    async with RegistryClient(registry.address) as client, WatchRecorder(client) as watch:
        host = host_for(registry, ingest=slow)
        await host.start()
        plugin_id = await host.wait_registered()
        call = asyncio.ensure_future(ingest(host, b"late"))
        await started.wait()
        stopping = asyncio.ensure_future(host.stop(grace=30))
        await watch.wait(lambda: plugin_id in watch.removed())
        assert not call.done()
        release.set()
        assert [e.payload for e in (await call).events] == [b"late"]
        await stopping


# -- keeping the registration -------------------------------------------------------------


async def test_a_forgotten_plugin_registers_again(registry):
    async with RegistryClient(registry.address) as client, host_for(registry) as host:
        first = await host.wait_registered()
        await client.unregister(first)  # the next heartbeat is not acknowledged
        again = await eventually(lambda: host.plugin_id not in (None, first) and host.plugin_id)
        assert [p.plugin_id for p in await client.list_plugins()] == [again]


async def test_a_plugin_serves_while_the_registry_is_down_and_registers_when_it_comes(
    tmp_path,
):
    port = free_port()
    async with host_for(f"127.0.0.1:{port}") as host:
        assert (await health(host)).healthy
        assert host.plugin_id is None
        async with running_registry(tmp_path, listen=f"127.0.0.1:{port}") as registry:
            plugin_id = await host.wait_registered()
            async with RegistryClient(registry.address) as client:
                assert (await client.get_plugin(plugin_id)).address == host.address


async def test_a_taken_source_is_retried_until_its_owner_leaves(registry):
    async with RegistryClient(registry.address) as client:
        owner = await client.register(
            pb.PluginInfo(name="owner", type=pb.PLUGIN_TYPE_INGESTOR, sources=["shared"]),
            "127.0.0.1:1",
        )
        info = {"name": "newcomer", "sources": ["shared"]}
        host = PluginHost(info, ingest=lines, registry=registry.address, backoff=FAST)
        async with host:
            registering = asyncio.ensure_future(host.wait_registered())
            await eventually(lambda: host.plugin_id is None and not registering.done())
            await client.unregister(owner.plugin_id)
            plugin_id = await registering
            assert (await client.get_plugin(plugin_id)).info.name == "newcomer"


async def test_a_registration_the_registry_refuses_for_good_is_raised(tmp_path):
    async with running_registry(tmp_path, limits=Limits(max_name=3)) as registry:
        host = host_for(registry, name="too-long")
        async with host:
            with pytest.raises(InvalidArgument, match=r"info\.name"):
                await host.wait_registered()
            with pytest.raises(InvalidArgument):
                await host.wait()
        with pytest.raises(InvalidArgument, match=r"info\.name"):
            await serve_until_signalled(host_for(registry, name="too-long"))


# -- backoff --------------------------------------------------------------------------------


def test_backoff_grows_to_its_maximum_with_jitter():
    delays: Iterator[float] = Backoff(initial=1, maximum=8, multiplier=2, jitter=0.5).delays()
    first = [next(delays) for _ in range(8)]
    assert 0.5 <= first[0] <= 1
    assert all(4 <= d <= 8 for d in first[4:])


@pytest.mark.parametrize(
    "fields", [{"initial": 0}, {"initial": 2, "maximum": 1}, {"multiplier": 0.5}, {"jitter": 2}]
)
def test_backoff_refuses_nonsense(fields):
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**fields)
