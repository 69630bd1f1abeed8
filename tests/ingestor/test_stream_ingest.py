"""Streaming ingest (SPEC §10): ``polku.v1.IngestorStream`` through ExternalIngestor.

Real servers throughout: SDK plugins (a PluginHost in this process, or SDK plugin
processes to SIGKILL), plain ``IngestorPlugin`` servicers (upstream-style: no stream),
raw ``IngestorStream`` servicers the test drives, and the Node example. Which path a
call took is read from the ``ingestor.stream`` log ("opened an ingest stream").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from ingestor import ExternalIngestor, IngestContext, PluginConnectionError, RegistryResolver
from ingestor.connection import PluginConnection
from ingestor.errors import PluginTransformError
from ingestor.stream import STREAM_CAPABILITY, check_stream_in_flight, ingest_stream
from registry import RegistryClient
from registry.sdk import PluginHost
from registry.sdk.handlers import STREAM_CAPABILITY as SDK_STREAM_CAPABILITY
from registry.server import RegistryServer
from registry.testing import eventually
from registry.wire import event_pb, pb, pb_grpc

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
DEADLINE = 30.0
IN_FLIGHT = 64
OPENED = "opened an ingest stream"


def opened_streams(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The address of each stream opened, in order ("opened an ingest stream to A (n open)")."""
    messages = [r.getMessage() for r in caplog.records]
    return [m.removeprefix(f"{OPENED} to ").split()[0] for m in messages if m.startswith(OPENED)]


def echo(request: pb.IngestRequest) -> pb.IngestResponse:
    event = event_pb.Event(id=request.data.decode(), source=request.source, payload=request.data)
    return pb.IngestResponse(events=[event])


@asynccontextmanager
async def resolved(
    registry: RegistryServer, source: str, count: int, **options: Any
) -> AsyncIterator[Any]:
    """A resolver once ``count`` instances of ``source`` are routable, and its ingestor."""
    async with RegistryResolver(registry.address) as resolver:
        await resolver.wait_for_async(lambda v: len(v.endpoints(source)) == count, DEADLINE)
        async with ExternalIngestor(
            source, resolver=resolver, ingest_timeout=DEADLINE, **options
        ) as ing:
            yield ing


def test_the_capability_is_one_name_on_both_sides() -> None:
    assert STREAM_CAPABILITY == SDK_STREAM_CAPABILITY == "ingest.stream.v1"
    with pytest.raises(ValueError, match="stream_in_flight"):
        check_stream_in_flight(0)
    with pytest.raises(ValueError, match="stream_in_flight"):
        ExternalIngestor("k8s", "127.0.0.1:1", stream_in_flight=5000)
    for bad in (0, 65, 1.5, True):
        with pytest.raises(ValueError, match="streams_per_channel"):
            ExternalIngestor("k8s", "127.0.0.1:1", streams_per_channel=bad)  # type: ignore[arg-type]


# -- order under 64 in flight --------------------------------------------------------------


class ReverseOrder:
    """An async ingest handler that holds every request until all are in, then finishes
    them in reverse order of their sequence number (the payload)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.arrived: list[int] = []
        self.finished: list[int] = []
        self._all_in = asyncio.Event()
        self._done = {seq: asyncio.Event() for seq in range(count)}

    async def __call__(self, request: pb.IngestRequest) -> pb.IngestResponse:
        seq = int(request.data)
        self.arrived.append(seq)
        if len(self.arrived) == self.count:
            self._all_in.set()
        await self._all_in.wait()  # every request is being handled at once
        if seq + 1 < self.count:
            await self._done[seq + 1].wait()
        self.finished.append(seq)
        self._done[seq].set()
        return echo(request)


@pytest.mark.parametrize("routing", ["static", "resolved"])
async def test_order_is_kept_with_64_in_flight_on_one_stream(
    registry: RegistryServer, caplog: pytest.LogCaptureFixture, routing: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingestor.stream")
    handler = ReverseOrder(IN_FLIGHT)
    info = {"name": "seq", "sources": ["seq"]}
    async with PluginHost(info, ingest=handler, registry=registry.address) as host:
        await host.wait_registered()
        payloads = [str(seq).encode() for seq in range(IN_FLIGHT)]
        context: Any = (
            resolved(registry, "seq", 1, streams_per_channel=1)
            if routing == "resolved"
            else ExternalIngestor(
                "seq", host.address, ingest_timeout=DEADLINE, streams_per_channel=1
            )
        )
        async with context as ingestor:
            answers = await asyncio.gather(
                *(ingestor.ingest_async(IngestContext("seq"), data) for data in payloads)
            )
    assert [[e.payload for e in events] for events in answers] == [[p] for p in payloads]
    assert sorted(handler.arrived) == list(range(IN_FLIGHT))
    assert handler.finished == list(reversed(range(IN_FLIGHT)))  # out of order inside
    assert opened_streams(caplog) == [host.address]


async def test_a_busy_channel_spreads_over_its_streams_each_answered_in_order(
    registry: RegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingestor.stream")
    handler = ReverseOrder(IN_FLIGHT)

    async def ingest(request: pb.IngestRequest) -> pb.IngestResponse:
        return echo(request) if request.data == b"quiet" else await handler(request)

    info = {"name": "spread", "sources": ["spread"]}
    async with (
        PluginHost(info, ingest=ingest, registry=registry.address) as host,
        ExternalIngestor(
            "spread", host.address, ingest_timeout=DEADLINE, streams_per_channel=4
        ) as ingestor,
    ):
        await host.wait_registered()
        quiet = [await ingestor.ingest_async(IngestContext("spread"), b"quiet") for _ in range(3)]
        assert opened_streams(caplog) == [host.address]  # one at a time: one stream
        payloads = [str(seq).encode() for seq in range(IN_FLIGHT)]
        answers = await asyncio.gather(
            *(ingestor.ingest_async(IngestContext("spread"), data) for data in payloads)
        )
    assert [[e.payload for e in q] for q in quiet] == [[b"quiet"]] * 3
    assert [[e.payload for e in events] for events in answers] == [[p] for p in payloads]
    assert handler.finished == list(reversed(range(IN_FLIGHT)))  # out of order inside
    assert opened_streams(caplog) == [host.address] * 4  # busy: all four, no more


# -- a plugin killed mid-stream ------------------------------------------------------------


class PluginProc:
    """``stream_plugin.py`` as a child process; its output lines collected as they come."""

    def __init__(self, registry: str, instance: str, *, hold: bool = False) -> None:
        self.argv = [sys.executable, str(HERE / "stream_plugin.py"), "--registry", registry]
        self.argv += ["--name", "killed", "--source", "killed", "--instance", instance]
        if hold:
            self.argv.append("--hold")
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> PluginProc:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self.process.stdout)),
            asyncio.create_task(self._read(self.process.stderr)),
        ]
        return self

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip())

    def saw(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def kill(self) -> None:
        if self.process is not None:
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
            await asyncio.gather(*self._readers, return_exceptions=True)


@pytest.fixture
async def plugin_procs() -> AsyncIterator[Callable[..., PluginProc]]:
    made: list[PluginProc] = []

    def make(*args: Any, **kwargs: Any) -> PluginProc:
        proc = PluginProc(*args, **kwargs)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        await proc.kill()


async def test_a_plugin_killed_mid_stream_has_what_it_did_not_answer_retried_on_the_other(
    registry: RegistryServer,
    plugin_procs: Callable[..., PluginProc],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingestor.stream")
    doomed = await plugin_procs(registry.address, "a", hold=True).start()
    survivor = await plugin_procs(registry.address, "b").start()
    for proc in (doomed, survivor):
        await eventually(lambda p=proc: p.saw("registered as"), within=DEADLINE)
    async with resolved(registry, "killed", 2) as ingestor:
        payloads = [str(seq).encode() for seq in range(IN_FLIGHT)]
        calls = [
            asyncio.ensure_future(ingestor.ingest_async(IngestContext("killed"), data))
            for data in payloads
        ]
        # Every request is either held by the doomed instance or answered by the other.
        await eventually(
            lambda: doomed.saw("holding ") + sum(c.done() for c in calls) == IN_FLIGHT,
            within=DEADLINE,
            what=lambda: f"{doomed.saw('holding ')} held, {sum(c.done() for c in calls)} done",
        )
        held = doomed.saw("holding ")
        assert 0 < held < IN_FLIGHT
        # The doomed instance never answers, so it has one stream; the other has some.
        opened = Counter(opened_streams(caplog))
        assert len(opened) == 2
        assert 1 in opened.values()

        await doomed.kill()
        answers = await asyncio.wait_for(asyncio.gather(*calls), DEADLINE)
    assert [[e.payload for e in events] for events in answers] == [[p] for p in payloads]
    assert {events[0].metadata["instance"] for events in answers} == {"b"}


# -- plugins without the stream -------------------------------------------------------------


class UpstreamPlugin(pb_grpc.IngestorPluginServicer):
    """An upstream-style plugin: IngestorPlugin only (Info, when ``info`` is set).

    Without ``info`` its Info answers UNIMPLEMENTED, as the generated base does.
    """

    def __init__(self, info: pb.PluginInfo | None = None) -> None:
        self.info = info
        self.ingested = 0
        self.port = 0
        self.server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> UpstreamPlugin:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_IngestorPluginServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.stop(None)

    async def Info(self, request: Empty, context: grpc.aio.ServicerContext) -> pb.PluginInfo:
        if self.info is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        assert self.info is not None
        return self.info

    async def Health(
        self, request: Empty, context: grpc.aio.ServicerContext
    ) -> pb.PluginHealthResponse:
        return pb.PluginHealthResponse(healthy=True)

    async def Ingest(
        self, request: pb.IngestRequest, context: grpc.aio.ServicerContext
    ) -> pb.IngestResponse:
        self.ingested += 1
        return echo(request)


UPSTREAM_INFO = pb.PluginInfo(name="up", version="1", type=pb.PLUGIN_TYPE_INGESTOR, sources=["up"])


@pytest.mark.parametrize("routing", ["static, no Info", "static, Info", "resolved"])
async def test_an_upstream_plugin_without_the_capability_is_served_unary(
    registry: RegistryServer, caplog: pytest.LogCaptureFixture, routing: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingestor.stream")
    info = None if routing == "static, no Info" else UPSTREAM_INFO
    payloads = [str(seq).encode() for seq in range(IN_FLIGHT)]
    async with UpstreamPlugin(info) as plugin:
        context: Any = ExternalIngestor("up", plugin.address, ingest_timeout=DEADLINE)
        if routing == "resolved":
            async with RegistryClient(registry.address) as client:
                await client.register(UPSTREAM_INFO, plugin.address)
            context = resolved(registry, "up", 1)
        async with context as ingestor:
            answers = await asyncio.gather(
                *(ingestor.ingest_async(IngestContext("up"), data) for data in payloads)
            )
    assert [[e.payload for e in events] for events in answers] == [[p] for p in payloads]
    assert plugin.ingested == IN_FLIGHT
    assert opened_streams(caplog) == []


async def test_a_plugin_that_advertises_but_does_not_serve_the_stream_falls_back_to_unary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingestor.stream")
    info = pb.PluginInfo()
    info.CopyFrom(UPSTREAM_INFO)
    info.capabilities.append(STREAM_CAPABILITY)
    payloads = [str(seq).encode() for seq in range(8)]
    async with (
        UpstreamPlugin(info) as plugin,
        ExternalIngestor("up", plugin.address, ingest_timeout=DEADLINE) as ingestor,
    ):
        first = await asyncio.gather(
            *(ingestor.ingest_async(IngestContext("up"), data) for data in payloads)
        )
        again = await ingestor.ingest_async(IngestContext("up"), b"again")
    assert [[e.payload for e in events] for events in first] == [[p] for p in payloads]
    assert [e.payload for e in again] == [b"again"]
    assert plugin.ingested == len(payloads) + 1
    assert len(opened_streams(caplog)) == 1  # tried once; the channel stays unary
    assert any("does not serve" in r.getMessage() for r in caplog.records)


# -- the SDK serves it and advertises it ------------------------------------------------------


def failing_echo(request: pb.IngestRequest) -> pb.IngestResponse:
    if request.data == b"boom":
        raise ValueError("boom")
    return echo(request)


async def test_the_sdk_serves_the_stream_and_advertises_the_capability(
    registry: RegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    info = {"name": "sdk-stream", "sources": ["sdk-stream"]}
    async with (
        PluginHost(info, ingest=failing_echo, registry=registry.address) as host,
        RegistryClient(registry.address) as client,
    ):
        plugin_id = await host.wait_registered()
        registered = await client.get_plugin(plugin_id)
        assert list(registered.info.capabilities) == [STREAM_CAPABILITY]
        async with grpc.aio.insecure_channel(host.address) as channel:
            served = await pb_grpc.IngestorPluginStub(channel).Info(Empty(), timeout=DEADLINE)
            assert list(served.capabilities) == [STREAM_CAPABILITY]

            # A failing handler answers its own request; the stream goes on.
            requests = [
                pb.IngestRequest(source="sdk-stream", data=d) for d in (b"a", b"boom", b"b")
            ]
            stream = pb_grpc.IngestorStreamStub(channel).IngestStream(
                iter(requests), timeout=DEADLINE
            )
            answers = [answer async for answer in stream]
        assert [[e.payload for e in a.events] for a in answers] == [[b"a"], [], [b"b"]]
        (error,) = answers[1].errors
        assert (error.message, error.details) == ("ingest failed: ValueError: boom", "INTERNAL")

        # Through the gateway: the same error class and words on either path.
        for streaming in (True, False):
            async with ExternalIngestor(
                "sdk-stream", host.address, streaming=streaming, ingest_timeout=DEADLINE
            ) as ingestor:
                with pytest.raises(PluginTransformError, match="ingest failed: ValueError: boom"):
                    await ingestor.ingest_async(IngestContext("sdk-stream"), b"boom")
                assert [
                    e.payload
                    for e in await ingestor.ingest_async(IngestContext("sdk-stream"), b"ok")
                ] == [b"ok"]


async def test_the_sync_ingest_stays_unary_and_streaming_false_too(
    registry: RegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingestor.stream")
    info = {"name": "sync-seq", "sources": ["sync-seq"]}
    async with PluginHost(info, ingest=echo, registry=registry.address) as host:
        async with ExternalIngestor("sync-seq", host.address, ingest_timeout=DEADLINE) as ingestor:
            events = await asyncio.to_thread(ingestor.ingest, IngestContext("sync-seq"), b"x")
        async with ExternalIngestor(
            "sync-seq", host.address, streaming=False, ingest_timeout=DEADLINE
        ) as ingestor:
            unary = await ingestor.ingest_async(IngestContext("sync-seq"), b"y")
    assert ([e.payload for e in events], [e.payload for e in unary]) == ([b"x"], [b"y"])
    assert opened_streams(caplog) == []


# -- timeouts and the bound, on one stream ---------------------------------------------------


class HeldStream(pb_grpc.IngestorStreamServicer):
    """A raw IngestorStream servicer that answers each request, in order, when released."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.answered = 0
        self.most_unanswered = 0
        self.releases: asyncio.Queue[None] = asyncio.Queue()

    async def IngestStream(
        self, requests: AsyncIterator[pb.IngestRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IngestResponse]:
        waiting: asyncio.Queue[pb.IngestRequest] = asyncio.Queue()

        async def read() -> None:
            async for request in requests:
                self.received.append(request.data)
                self.most_unanswered = max(self.most_unanswered, len(self.received) - self.answered)
                waiting.put_nowait(request)

        reader = asyncio.create_task(read())
        try:
            while True:
                request = await waiting.get()
                await self.releases.get()
                self.answered += 1
                yield echo(request)
        finally:
            reader.cancel()


@asynccontextmanager
async def held_stream() -> AsyncIterator[tuple[HeldStream, PluginConnection]]:
    servicer = HeldStream()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_IngestorStreamServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, PluginConnection(f"127.0.0.1:{port}", channel)
    finally:
        await channel.close(None)
        await server.stop(None)


def request(data: bytes) -> pb.IngestRequest:
    return pb.IngestRequest(source="held", data=data)


async def test_a_request_timed_out_on_the_stream_has_its_late_answer_discarded() -> None:
    async with held_stream() as (servicer, connection):
        stream = ingest_stream(connection, max_in_flight=4)
        late = asyncio.ensure_future(stream.call(request(b"late"), 0.2))
        await eventually(lambda: servicer.received == [b"late"], within=DEADLINE)
        on_time = asyncio.ensure_future(stream.call(request(b"on time"), DEADLINE))
        await eventually(lambda: servicer.received == [b"late", b"on time"], within=DEADLINE)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await late
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        servicer.releases.put_nowait(None)  # the late answer: nobody's any more
        servicer.releases.put_nowait(None)
        answer = pb.IngestResponse.FromString(await on_time)
        assert [e.payload for e in answer.events] == [b"on time"]


async def test_a_stream_holds_at_most_stream_in_flight_requests() -> None:
    async with held_stream() as (servicer, connection):
        stream = ingest_stream(connection, max_in_flight=2)
        calls = [
            asyncio.ensure_future(stream.call(request(str(n).encode()), DEADLINE)) for n in range(6)
        ]
        for released in range(6):
            await eventually(
                lambda r=released: len(servicer.received) == min(6, 2 + r), within=DEADLINE
            )
            servicer.releases.put_nowait(None)
        answers = [pb.IngestResponse.FromString(raw) for raw in await asyncio.gather(*calls)]
    assert [a.events[0].payload for a in answers] == [str(n).encode() for n in range(6)]
    assert servicer.most_unanswered == 2


async def test_a_channel_holds_at_most_stream_in_flight_on_each_of_its_streams() -> None:
    async with held_stream() as (servicer, connection):
        stream = ingest_stream(connection, max_in_flight=2, streams=3)
        first = asyncio.ensure_future(stream.call(request(b"first"), DEADLINE))
        await eventually(lambda: servicer.received == [b"first"], within=DEADLINE)
        servicer.releases.put_nowait(None)  # answered: the plugin serves the stream
        await first
        calls = [
            asyncio.ensure_future(stream.call(request(str(n).encode()), DEADLINE))
            for n in range(10)
        ]
        # Three streams of two: six sent, four waiting for a slot.
        await eventually(lambda: len(servicer.received) == 7, within=DEADLINE)
        assert stream.open_streams() == 3
        for _ in calls:
            servicer.releases.put_nowait(None)
        answers = [pb.IngestResponse.FromString(raw) for raw in await asyncio.gather(*calls)]
    assert [a.events[0].payload for a in answers] == [str(n).encode() for n in range(10)]
    assert servicer.most_unanswered == 6


async def test_a_stream_the_plugin_ends_fails_what_it_left_unanswered_then_reopens() -> None:
    async with held_stream() as (servicer, connection):
        stream = ingest_stream(connection, max_in_flight=4)
        first = asyncio.ensure_future(stream.call(request(b"1"), DEADLINE))
        await eventually(lambda: servicer.received == [b"1"], within=DEADLINE)
        await connection.channel.close(None)  # the channel goes: the stream breaks
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await first
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


# -- a broken stream through the ingestor, one instance -----------------------------------------


async def test_a_broken_stream_is_a_connection_error_and_the_next_call_reconnects(
    registry: RegistryServer,
) -> None:
    gate = asyncio.Event()
    holding: list[bytes] = []

    async def held(request: pb.IngestRequest) -> pb.IngestResponse:
        if request.data == b"held":
            holding.append(request.data)
            await gate.wait()
        return echo(request)

    info = {"name": "broken", "sources": ["broken"]}
    host = PluginHost(info, ingest=held, registry=registry.address, grace=0)
    await host.start()
    address = host.address
    async with ExternalIngestor("broken", address, ingest_timeout=DEADLINE) as ingestor:
        call = asyncio.ensure_future(ingestor.ingest_async(IngestContext("broken"), b"held"))
        await eventually(lambda: holding, within=DEADLINE)
        await host.stop(0)  # the stream breaks with the request unanswered
        with pytest.raises(PluginConnectionError):
            await call
        gate.set()
        port = int(address.rpartition(":")[2])
        async with PluginHost(
            info, ingest=held, registry=registry.address, listen=f"127.0.0.1:{port}"
        ):
            events = await ingestor.ingest_async(IngestContext("broken"), b"again")
    assert [e.payload for e in events] == [b"again"]


async def test_a_graceful_stop_ends_the_streams_instead_of_waiting_out_the_grace(
    registry: RegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.sdk.host")
    gate = asyncio.Event()
    holding: list[bytes] = []

    async def held(request: pb.IngestRequest) -> pb.IngestResponse:
        if request.data == b"held":
            holding.append(request.data)
            await gate.wait()
        return echo(request)

    info = {"name": "graceful", "sources": ["graceful"]}
    host = PluginHost(info, ingest=held, registry=registry.address)
    await host.start()
    try:
        async with ExternalIngestor("graceful", host.address, ingest_timeout=DEADLINE) as ing:
            await ing.ingest_async(IngestContext("graceful"), b"opens the stream")
            call = asyncio.ensure_future(ing.ingest_async(IngestContext("graceful"), b"held"))
            await eventually(lambda: holding, within=DEADLINE)
            stopping = asyncio.ensure_future(host.stop(3600))
            await eventually(
                lambda: any("stopping its server" in r.getMessage() for r in caplog.records),
                within=DEADLINE,
            )
            gate.set()  # the request in flight is answered during the stop
            assert [e.payload for e in await call] == [b"held"]
            await asyncio.wait_for(stopping, DEADLINE)  # the stream ended: not an hour
    finally:
        await host.stop(0)


# -- the Node example -----------------------------------------------------------------------


async def test_the_node_example_serves_the_stream_and_advertises_the_capability(
    node_example: Path, registry: RegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingestor.stream")
    argv = ["node", "plugin.js", "--registry", registry.address]
    process = await asyncio.create_subprocess_exec(
        *argv,
        "--name",
        "node-seq",
        "--source",
        "node-seq",
        cwd=node_example,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(DEADLINE):
            while not (line := await process.stdout.readline()).startswith(b"registered "):
                assert line, "the node plugin exited"
        plugin_id = line.decode().split()[1]
        async with RegistryClient(registry.address) as client:
            registered = await client.get_plugin(plugin_id)
        assert STREAM_CAPABILITY in registered.info.capabilities

        payloads = [str(seq).encode() for seq in range(IN_FLIGHT)]
        async with resolved(registry, "node-seq", 1) as ingestor:
            answers = await asyncio.gather(
                *(ingestor.ingest_async(IngestContext("node-seq"), data) for data in payloads)
            )
        assert [[e.payload for e in events] for events in answers] == [[p] for p in payloads]
        assert set(opened_streams(caplog)) == {registered.address}
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
