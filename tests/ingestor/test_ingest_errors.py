"""ingest_with_errors: the plugin's per-record IngestErrors next to its events.

Against real FakePlugin servers (static, and found through a real registry); ``ingest``
keeps answering the events alone, and errors without events stay a
PluginTransformError.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from ingestor import (
    ExternalIngestor,
    Hub,
    IngestContext,
    IngestResult,
    PluginError,
    PluginTransformError,
    RegistryResolver,
)
from registry.client import RegistryClient
from registry.server import RegistryServer
from registry.testing import FakePlugin
from registry.wire import event_pb, pb

CTX = IngestContext("k8s")


def digits_only(request: pb.IngestRequest) -> pb.IngestResponse:
    """One event per line of digits; an IngestError (with its byte offset) for any other."""
    response = pb.IngestResponse()
    offset = 0
    for number, line in enumerate(request.data.splitlines(keepends=True), start=1):
        text = line.strip()
        if text.isdigit():
            response.events.append(
                event_pb.Event(id=text.decode(), source=request.source, payload=text)
            )
        elif text:
            response.errors.append(
                pb.IngestError(message="not a number", details=f"line {number}", offset=offset)
            )
        offset += len(line)
    return response


PAYLOAD = b"1\nx\n22\n\nyy\n333\n"
EXPECTED_ERRORS = [("not a number", "line 2", 2), ("not a number", "line 5", 8)]


def errors_of(result: IngestResult) -> list[tuple[str, str, int]]:
    return [(e.message, e.details, e.offset) for e in result.errors]


async def test_the_errors_come_back_next_to_the_events_as_the_plugin_sent_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        FakePlugin(sources=["k8s"], ingest=digits_only) as plugin,
        ExternalIngestor("k8s", plugin.address) as ingestor,
    ):
        with caplog.at_level(logging.WARNING, logger="ingestor.external"):
            result = await ingestor.ingest_with_errors_async(CTX, PAYLOAD)
        assert [e.id for e in result.events] == ["1", "22", "333"]
        assert errors_of(result) == EXPECTED_ERRORS
        assert all(isinstance(e, pb.IngestError) for e in result.errors)
        # Still logged, as ingest logs them.
        assert [r.getMessage() for r in caplog.records if "offset" in r.getMessage()] == [
            f"plugin {plugin.address} reported an error for source 'k8s' at offset 2: "
            "not a number (line 2)",
            f"plugin {plugin.address} reported an error for source 'k8s' at offset 8: "
            "not a number (line 5)",
        ]

        # ingest keeps its answer: the same events, nothing else.
        events = await ingestor.ingest_async(CTX, PAYLOAD)
        assert events == result.events
        assert plugin.ingest_calls == 2


async def test_the_sync_variants_from_a_thread() -> None:
    async with FakePlugin(sources=["k8s"], ingest=digits_only) as plugin:
        ingestor = ExternalIngestor("k8s", plugin.address)
        result = await asyncio.to_thread(ingestor.ingest_with_errors, CTX, PAYLOAD)
        events = await asyncio.to_thread(ingestor.ingest, CTX, PAYLOAD)
        await asyncio.to_thread(ingestor.close)
    assert errors_of(result) == EXPECTED_ERRORS
    assert [e.id for e in events] == [e.id for e in result.events] == ["1", "22", "333"]


async def test_a_clean_payload_has_no_errors() -> None:
    async with (
        FakePlugin(sources=["k8s"], ingest=digits_only) as plugin,
        ExternalIngestor("k8s", plugin.address) as ingestor,
    ):
        result = await ingestor.ingest_with_errors_async(CTX, b"7\n8\n")
    assert [e.id for e in result.events] == ["7", "8"]
    assert result.errors == []


async def test_errors_and_no_events_is_still_a_transform_error_carrying_them() -> None:
    async with (
        FakePlugin(sources=["k8s"], ingest=digits_only) as plugin,
        ExternalIngestor("k8s", plugin.address) as ingestor,
    ):
        with pytest.raises(PluginTransformError, match="2 error") as info:
            await ingestor.ingest_with_errors_async(CTX, b"a\nb\n")
        assert [(e.message, e.offset) for e in info.value.errors] == [
            ("not a number", 0),
            ("not a number", 2),
        ]
        with pytest.raises(PluginTransformError, match="2 error"):
            await ingestor.ingest_async(CTX, b"a\nb\n")


async def test_the_sync_variant_inside_a_running_loop_is_refused() -> None:
    async with FakePlugin(sources=["k8s"], ingest=digits_only) as plugin:
        async with ExternalIngestor("k8s", plugin.address) as ingestor:
            with pytest.raises(PluginError, match=r"await ingest_with_errors_async"):
                ingestor.ingest_with_errors(CTX, PAYLOAD)
        with (
            Hub().build() as hub,
            pytest.raises(PluginError, match=r"await hub\.ingest_with_errors_async"),
        ):
            hub.ingest_with_errors(CTX, PAYLOAD)
        assert plugin.ingest_calls == 0


async def test_the_hub_returns_them_for_static_routes() -> None:
    async with FakePlugin(sources=["k8s"], ingest=digits_only) as plugin:
        hub = Hub().ingestor(ExternalIngestor("k8s", plugin.address)).build()
        result = await hub.ingest_with_errors_async(CTX, PAYLOAD)
        threaded = await asyncio.to_thread(hub.ingest_with_errors, CTX, PAYLOAD)
        events = await hub.ingest_async(CTX, PAYLOAD)
        await hub.aclose()
    assert errors_of(result) == errors_of(threaded) == EXPECTED_ERRORS
    assert [e.id for e in events] == [e.id for e in result.events] == ["1", "22", "333"]


async def test_the_hub_returns_them_for_a_source_found_in_the_registry(
    registry: RegistryServer, client: RegistryClient
) -> None:
    async with (
        FakePlugin(name="digits", sources=["digits"], ingest=digits_only) as plugin,
        RegistryResolver(registry.address) as resolver,
    ):
        await client.register(plugin.info(), plugin.address)
        await resolver.wait_for_async(lambda v: bool(v.endpoints("digits")), 10)
        async with Hub(resolver).build() as hub:
            result = await hub.ingest_with_errors_async(IngestContext("digits"), PAYLOAD)
    assert [e.source for e in result.events] == ["digits"] * 3
    assert errors_of(result) == EXPECTED_ERRORS
