"""SPEC §9 gateway metrics, on a CollectorRegistry the caller passes.

Real FakePlugin servers (one that works, one that answers an error status), a port
nothing listens on, and a real registry for the hub and the resolver; every value is
read back from the CollectorRegistry given, as a scrape of it would.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest

from ingestor import (
    BreakerSettings,
    ExternalIngestor,
    Hub,
    IngestContext,
    PluginConnectionError,
    PluginError,
    PluginTransformError,
    RegistryResolver,
)
from registry.client import RegistryClient
from registry.server import RegistryServer
from registry.testing import FakePlugin, echo_lines, eventually
from registry.wire import pb

CTX = IngestContext("k8s")


def sample(metrics: CollectorRegistry, name: str, **labels: str) -> float:
    found = metrics.get_sample_value(name, labels)
    return 0.0 if found is None else found


def errors(metrics: CollectorRegistry, source: str, kind: str) -> float:
    return sample(metrics, "polku_gateway_ingest_errors_total", source=source, kind=kind)


def calls(metrics: CollectorRegistry, source: str, result: str) -> float:
    return sample(
        metrics, "polku_gateway_ingest_duration_seconds_count", source=source, result=result
    )


def some_lines_bad(request: pb.IngestRequest) -> pb.IngestResponse:
    """Echoes the lines, and reports one IngestError per line starting with ``!``."""
    response = echo_lines(request)
    for offset, line in enumerate(request.data.splitlines()):
        if line.startswith(b"!"):
            response.errors.append(pb.IngestError(message="bad line", offset=offset))
    return response


def refuses(request: pb.IngestRequest) -> pb.IngestResponse:
    raise RuntimeError("this plugin fails every payload")  # an UNKNOWN status


def only_errors(request: pb.IngestRequest) -> pb.IngestResponse:
    return pb.IngestResponse(errors=[pb.IngestError(message="nothing parsed")])


async def test_ingests_errors_and_breakers_of_static_ingestors(
    free_port: Callable[[], int],
) -> None:
    metrics = CollectorRegistry()
    dead = f"127.0.0.1:{free_port()}"
    async with (
        FakePlugin(sources=["k8s"], ingest=some_lines_bad) as good,
        FakePlugin(sources=["bad"], ingest=refuses) as failing,
        FakePlugin(sources=["empty"], ingest=only_errors) as empty,
        ExternalIngestor("k8s", good.address, metrics=metrics) as k8s,
        ExternalIngestor("bad", failing.address, metrics=metrics) as bad,
        ExternalIngestor("empty", empty.address, metrics=metrics) as nothing,
        ExternalIngestor(
            "dead",
            dead,
            metrics=metrics,
            connect_timeout=0.5,
            breaker=BreakerSettings(failure_threshold=1, reset_timeout=3600),
        ) as down,
    ):
        result = await k8s.ingest_with_errors_async(CTX, b"a\n!b\nc\n!d")
        assert len(result.events) == 4
        assert len(result.errors) == 2
        assert await k8s.ingest_async(CTX, b"e")
        assert good.ingest_calls == 2
        assert calls(metrics, "k8s", "ok") == 2
        assert errors(metrics, "k8s", "record") == 2
        assert calls(metrics, "k8s", "error") == 0

        with pytest.raises(PluginTransformError):
            await bad.ingest_async(IngestContext("bad"), b"x")
        assert errors(metrics, "bad", "status") == 1
        assert calls(metrics, "bad", "error") == 1

        with pytest.raises(PluginTransformError):
            await nothing.ingest_async(IngestContext("empty"), b"x")
        assert errors(metrics, "empty", "no_events") == 1

        with pytest.raises(PluginConnectionError):
            await down.ingest_async(IngestContext("dead"), b"x")
        assert errors(metrics, "dead", "unreachable") == 1
        assert calls(metrics, "dead", "error") == 1

        # Breakers at scrape time: the dead endpoint's opened, the others closed.
        state = "polku_gateway_breaker_state"
        assert sample(metrics, state, source="dead", endpoint=dead) == 2
        assert metrics.get_sample_value(state, {"source": "k8s", "endpoint": good.address}) == 0
        # A failing plugin that answers is up: its breaker stays closed.
        assert metrics.get_sample_value(state, {"source": "bad", "endpoint": failing.address}) == 0

    # Closed ingestors report no breakers any more.
    assert "polku_gateway_breaker_state{" not in generate_latest(metrics).decode()
    # A closed ingestor's refusal is misuse, counted apart.
    with pytest.raises(PluginError):
        await k8s.ingest_async(CTX, b"a")
    assert errors(metrics, "k8s", "other") == 1


async def test_the_sync_ingest_is_counted_too() -> None:
    metrics = CollectorRegistry()
    async with FakePlugin(sources=["k8s"]) as plugin:
        ingestor = ExternalIngestor("k8s", plugin.address, metrics=metrics)
        try:
            events = await asyncio.to_thread(ingestor.ingest, CTX, b"a\nb")
        finally:
            await ingestor.aclose()
    assert len(events) == 2
    assert calls(metrics, "k8s", "ok") == 1


async def test_hub_and_resolver_report_on_the_registry_given(
    registry: RegistryServer, client: RegistryClient
) -> None:
    metrics = CollectorRegistry()
    staleness = "polku_gateway_resolver_staleness_seconds"
    resolver = RegistryResolver(registry.address, metrics=metrics)
    # Before its first snapshot the view is infinitely stale.
    assert sample(metrics, staleness, registry=registry.address) == math.inf
    async with (
        resolver,
        FakePlugin(sources=["k8s"]) as plugin,
        Hub(resolver=resolver, metrics=metrics).build() as hub,
    ):
        await client.register(plugin.info(), plugin.address)
        await resolver.wait_for_async(lambda view: bool(view.endpoints("k8s")), 10)
        assert sample(metrics, staleness, registry=registry.address) < 60

        assert len(await hub.ingest_async(CTX, b"a\nb")) == 2
        # The hub's dynamic ingestor reports on the same registry, and its breaker too.
        assert calls(metrics, "k8s", "ok") == 1
        assert (
            metrics.get_sample_value(
                "polku_gateway_breaker_state", {"source": "k8s", "endpoint": plugin.address}
            )
            == 0
        )

        with pytest.raises(PluginError, match="no ingestor for source"):
            await hub.ingest_async(IngestContext("nobody-serves-this"), b"a")
        assert errors(metrics, "", "no_route") == 1
        # The payload's own source name is never a label.
        assert "nobody-serves-this" not in generate_latest(metrics).decode()

    # A closed resolver is no longer reported.
    await eventually(
        lambda: metrics.get_sample_value(staleness, {"registry": registry.address}) is None,
        what="the closed resolver gone from the metrics",
    )


def test_one_registry_serves_any_number_of_components() -> None:
    metrics = CollectorRegistry()
    first = ExternalIngestor("a", "127.0.0.1:1", metrics=metrics)
    second = ExternalIngestor("b", "127.0.0.1:2", metrics=metrics)
    hub = Hub(metrics=metrics)
    names = {family.name for family in metrics.collect()}
    assert {
        "polku_gateway_ingest_duration_seconds",
        "polku_gateway_ingest_errors",
        "polku_gateway_breaker_state",
        "polku_gateway_resolver_staleness_seconds",
    } <= names
    for component in (first, second, hub):
        component.close()
    # Nothing goes to prometheus_client's global registry.
    assert REGISTRY.get_sample_value("polku_gateway_ingest_errors_total") is None


def test_a_registry_holding_the_same_names_is_refused() -> None:
    metrics = CollectorRegistry()
    Counter("polku_gateway_ingest_errors", "not ours", registry=metrics)
    with pytest.raises(ValueError, match="polku_gateway_ingest_errors"):
        ExternalIngestor("a", "127.0.0.1:1", metrics=metrics)
