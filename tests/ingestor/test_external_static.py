"""ExternalIngestor with a fixed address, against real plugin servers."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from ingestor import (
    BreakerSettings,
    ExternalIngestor,
    IngestContext,
    PluginConnectionError,
    PluginError,
    PluginTransformError,
)
from registry.testing import FakePlugin
from registry.wire import event_pb, pb

CTX = IngestContext("k8s", cluster="prod", format="lines")


async def test_round_trip(plugin: FakePlugin) -> None:
    seen: list[pb.IngestRequest] = []

    def transform(request: pb.IngestRequest) -> pb.IngestResponse:
        seen.append(request)
        return pb.IngestResponse(
            events=[event_pb.Event(id="e1", source=request.source, payload=request.data[::-1])]
        )

    plugin.ingest = transform
    async with ExternalIngestor("k8s", plugin.address) as ingestor:
        events = await ingestor.ingest_async(CTX, b"\x00raw\xff")
    assert [(e.id, e.source, e.payload) for e in events] == [("e1", "k8s", b"\xffwar\x00")]
    assert isinstance(events[0], event_pb.Event)
    (request,) = seen
    assert (request.source, request.cluster, request.format, request.data) == (
        "k8s",
        "prod",
        "lines",
        b"\x00raw\xff",
    )


async def test_empty_response(plugin: FakePlugin) -> None:
    async with ExternalIngestor("k8s", plugin.address) as ingestor:
        assert await ingestor.ingest_async(CTX, b"") == []
    assert plugin.ingest_calls == 1


async def test_connection_failure(free_port) -> None:
    async with ExternalIngestor("k8s", f"127.0.0.1:{free_port()}") as ingestor:
        with pytest.raises(PluginConnectionError, match="cannot connect") as info:
            await ingestor.ingest_async(CTX, b"a")
    assert info.value.address.startswith("127.0.0.1:")
    assert ingestor.channels() == 0


async def test_connect_timeout_is_a_connection_error() -> None:
    # A listener that accepts TCP but never speaks HTTP/2: the channel never gets READY.
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ExternalIngestor("k8s", f"127.0.0.1:{port}", connect_timeout=0.3) as ingestor:
            with pytest.raises(PluginConnectionError, match="not ready within"):
                await ingestor.ingest_async(CTX, b"a")
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_ingest_timeout(plugin: FakePlugin) -> None:
    release = asyncio.Event()

    async def slow(request: pb.IngestRequest) -> pb.IngestResponse:
        await release.wait()
        return pb.IngestResponse()

    plugin.ingest = slow
    try:
        async with ExternalIngestor("k8s", plugin.address, ingest_timeout=0.2) as ingestor:
            with pytest.raises(PluginConnectionError, match="DEADLINE_EXCEEDED") as info:
                await ingestor.ingest_async(CTX, b"a")
    finally:
        release.set()
    cause = info.value.__cause__
    assert isinstance(cause, grpc.aio.AioRpcError)
    assert cause.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert plugin.ingest_calls == 1  # a timed-out call is not sent twice


async def test_partial_errors_return_events_and_warn(
    plugin: FakePlugin, caplog: pytest.LogCaptureFixture
) -> None:
    plugin.ingest = lambda request: pb.IngestResponse(
        events=[event_pb.Event(id="ok-0"), event_pb.Event(id="ok-2")],
        errors=[pb.IngestError(message="bad line", details="not json", offset=17)],
    )
    caplog.set_level(logging.WARNING, logger="ingestor")
    async with ExternalIngestor("k8s", plugin.address) as ingestor:
        events = await ingestor.ingest_async(CTX, b"x")
    assert [e.id for e in events] == ["ok-0", "ok-2"]
    (record,) = [r for r in caplog.records if r.name.startswith("ingestor")]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert plugin.address in message
    assert "offset 17" in message
    assert "bad line" in message


async def test_only_errors_is_a_transform_error(plugin: FakePlugin) -> None:
    plugin.ingest = lambda request: pb.IngestResponse(
        errors=[pb.IngestError(message="bad", offset=3), pb.IngestError(message="worse")]
    )
    async with ExternalIngestor("k8s", plugin.address) as ingestor:
        with pytest.raises(PluginTransformError, match="offset 3") as info:
            await ingestor.ingest_async(CTX, b"x")
    assert [e.message for e in info.value.errors] == ["bad", "worse"]


async def test_error_status_is_a_transform_error(plugin: FakePlugin) -> None:
    def broken(request: pb.IngestRequest) -> pb.IngestResponse:
        raise RuntimeError("plugin bug")

    plugin.ingest = broken
    async with ExternalIngestor("k8s", plugin.address) as ingestor:
        with pytest.raises(PluginTransformError) as info:
            await ingestor.ingest_async(CTX, b"x")
        assert info.value.code == "UNKNOWN"
        # The plugin answered: the connection is kept.
        assert ingestor.channels() == 1


async def test_reconnects_after_failure(plugin: FakePlugin) -> None:
    async with ExternalIngestor("k8s", plugin.address) as ingestor:
        assert len(await ingestor.ingest_async(CTX, b"a\nb")) == 2
        await plugin.stop()
        with pytest.raises(PluginConnectionError):
            await ingestor.ingest_async(CTX, b"a")
        assert ingestor.channels() == 0  # the broken channel was dropped
        await plugin.start()  # same port
        assert len(await ingestor.ingest_async(CTX, b"a\nb\nc")) == 3


async def test_reuses_one_channel(plugin: FakePlugin) -> None:
    async with ExternalIngestor("k8s", plugin.address) as ingestor:
        for _ in range(20):
            await ingestor.ingest_async(CTX, b"a")
        await asyncio.gather(*(ingestor.ingest_async(CTX, b"a") for _ in range(20)))
        assert ingestor.channels() == 1
    assert plugin.ingest_calls == 40


async def test_health_of_a_reachable_plugin(plugin: FakePlugin) -> None:
    plugin.health_message = "all good"
    async with ExternalIngestor("k8s", plugin.address) as ingestor:
        health = await ingestor.health_async()
    assert (health.healthy, health.message) == (True, "all good")


async def test_health_of_an_unhealthy_plugin() -> None:
    fake = FakePlugin(sources=["k8s"], healthy=False, health_message="db down")
    async with fake, ExternalIngestor("k8s", fake.address) as ingestor:
        health = await ingestor.health_async()
    assert (health.healthy, health.message) == (False, "db down")


async def test_health_of_an_unreachable_plugin(free_port) -> None:
    async with ExternalIngestor("k8s", f"127.0.0.1:{free_port()}") as ingestor:
        with pytest.raises(PluginConnectionError):
            await ingestor.health_async()


async def test_breaker_opens_after_repeated_failures(free_port) -> None:
    settings = BreakerSettings(failure_threshold=2, reset_timeout=60)
    address = f"127.0.0.1:{free_port()}"
    async with ExternalIngestor("k8s", address, breaker=settings) as ingestor:
        for _ in range(2):
            with pytest.raises(PluginConnectionError, match="cannot connect"):
                await ingestor.ingest_async(CTX, b"a")
        with pytest.raises(PluginConnectionError, match="circuit open"):
            await ingestor.ingest_async(CTX, b"a")


async def test_breaker_probe_closes_it(plugin: FakePlugin) -> None:
    settings = BreakerSettings(failure_threshold=1, reset_timeout=0)
    async with ExternalIngestor("k8s", plugin.address, breaker=settings) as ingestor:
        await plugin.stop()
        with pytest.raises(PluginConnectionError):
            await ingestor.ingest_async(CTX, b"a")
        await plugin.start()
        # Cool-down 0: the next call is the half-open probe; it succeeds and closes it.
        assert len(await ingestor.ingest_async(CTX, b"a")) == 1
        assert len(await ingestor.ingest_async(CTX, b"a")) == 1


async def test_refuses_use_after_close(plugin: FakePlugin) -> None:
    ingestor = ExternalIngestor("k8s", plugin.address)
    await ingestor.ingest_async(CTX, b"a")
    await ingestor.aclose()
    await ingestor.aclose()  # idempotent
    with pytest.raises(PluginError, match="closed"):
        await ingestor.ingest_async(CTX, b"a")


async def test_plugin_crash_and_recovery(spawn) -> None:
    proc = spawn(name="k8s-plugin", sources=("k8s",))
    await proc.start()
    async with ExternalIngestor("k8s", proc.address) as ingestor:
        assert len(await ingestor.ingest_async(CTX, b"a\nb")) == 2
        assert len(await asyncio.to_thread(ingestor.ingest, CTX, b"a\nb")) == 2
        await proc.kill()
        with pytest.raises(PluginConnectionError):
            await ingestor.ingest_async(CTX, b"a")
        with pytest.raises(PluginConnectionError):
            await asyncio.to_thread(ingestor.ingest, CTX, b"a")
        await proc.start()  # the same port again
        assert len(await ingestor.ingest_async(CTX, b"a")) == 1
        assert len(await asyncio.to_thread(ingestor.ingest, CTX, b"a")) == 1
