"""``polku_gateway_emitter_breaker_state{emitter, endpoint}``: emitters' breakers at scrapes.

A real SDK emitter plugin (PluginHost on 127.0.0.1:0), a port nothing listens on, and
a real registry for a hub's discovered emitter; every value is read back from the
CollectorRegistry given, as a scrape of it would.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable

import pytest
from emit_sinks import FAST, Sink, events
from prometheus_client import CollectorRegistry, generate_latest

from ingestor import (
    BreakerSettings,
    ExternalEmitter,
    ExternalIngestor,
    Hub,
    IngestContext,
    PluginConnectionError,
    PluginEmitError,
    RegistryResolver,
    RetryPolicy,
)
from registry.sdk import PluginHost
from registry.server import RegistryServer

STATE = "polku_gateway_emitter_breaker_state"
OPENS_AT_ONCE = BreakerSettings(failure_threshold=1, reset_timeout=3600)
ONCE = RetryPolicy(max_attempts=1)


def state(metrics: CollectorRegistry, emitter: str, endpoint: str) -> float | None:
    return metrics.get_sample_value(STATE, {"emitter": emitter, "endpoint": endpoint})


async def test_an_emitters_breaker_shows_open_after_failures_and_goes_with_close(
    registry: RegistryServer, free_port: Callable[[], int]
) -> None:
    sink = Sink()
    plugin = PluginHost(
        {"name": "sink-plugin", "emitter_name": "sink"}, emit=sink.emit, registry=registry.address
    )
    metrics = CollectorRegistry()
    dead = f"127.0.0.1:{free_port()}"
    async with (
        plugin,
        ExternalEmitter("sink", plugin.address, retry=FAST, metrics=metrics) as good,
        ExternalEmitter(
            "gone", dead, retry=ONCE, connect_timeout=0.5, breaker=OPENS_AT_ONCE, metrics=metrics
        ) as down,
        ExternalIngestor(
            "k8s", dead, connect_timeout=0.5, breaker=OPENS_AT_ONCE, metrics=metrics
        ) as ingestor,
    ):
        # Registered at once, reporting nothing until an endpoint is called.
        assert f"{STATE}{{" not in generate_latest(metrics).decode()
        await good.emit_async(events("a"))
        assert state(metrics, "sink", plugin.address) == 0
        with pytest.raises(PluginEmitError):
            await down.emit_async(events("b"))
        assert state(metrics, "gone", dead) == 2
        # An ingestor of the same endpoint reports in its own family, apart.
        with pytest.raises(PluginConnectionError):
            await ingestor.ingest_async(IngestContext("k8s"), b"x")
        ingestors = "polku_gateway_breaker_state"
        assert metrics.get_sample_value(ingestors, {"source": "k8s", "endpoint": dead}) == 2
        lines = generate_latest(metrics).decode().splitlines()
        assert len([x for x in lines if x.startswith(f"{ingestors}{{")]) == 1  # k8s alone
        assert len([x for x in lines if x.startswith(f"{STATE}{{")]) == 2  # sink and gone
    text = generate_latest(metrics).decode()
    assert f"{STATE}{{" not in text  # closed emitters report no breakers any more
    assert f"# TYPE {STATE} gauge" in text  # the family itself stays


async def test_the_sync_path_reports_too_and_a_sync_close_forgets(
    free_port: Callable[[], int],
) -> None:
    metrics = CollectorRegistry()
    dead = f"127.0.0.1:{free_port()}"

    def use() -> float | None:
        emitter = ExternalEmitter(
            "gone", dead, retry=ONCE, connect_timeout=0.5, breaker=OPENS_AT_ONCE, metrics=metrics
        )
        try:
            with pytest.raises(PluginEmitError):
                emitter.emit(events("a"))
            return state(metrics, "gone", dead)
        finally:
            emitter.close()

    assert await asyncio.to_thread(use) == 2
    assert state(metrics, "gone", dead) is None


def test_an_emitter_dropped_unclosed_is_not_kept_alive_by_the_metrics(
    free_port: Callable[[], int],
) -> None:
    metrics = CollectorRegistry()
    dead = f"127.0.0.1:{free_port()}"
    emitter = ExternalEmitter(
        "x", dead, retry=ONCE, connect_timeout=0.5, breaker=OPENS_AT_ONCE, metrics=metrics
    )
    with contextlib.suppress(PluginEmitError):  # not kept: its traceback holds the emitter
        emitter.emit(events("a"))
    assert state(metrics, "x", dead) == 2
    del emitter
    gc.collect()
    assert f"{STATE}{{" not in generate_latest(metrics).decode()


async def test_a_hubs_discovered_emitter_reports_on_the_hubs_registry(
    registry: RegistryServer,
) -> None:
    sink = Sink()
    plugin = PluginHost(
        {"name": "sink-plugin", "emitter_name": "sink"}, emit=sink.emit, registry=registry.address
    )
    metrics = CollectorRegistry()
    async with plugin, RegistryResolver(registry.address) as resolver:
        await resolver.wait_for_async(lambda v: bool(v.emitter_endpoints("sink")), 10)
        async with Hub(resolver=resolver, retry=FAST, metrics=metrics).build() as hub:
            assert (await hub.emit_async(events("a"))).ok
            assert state(metrics, "sink", plugin.address) == 0
        assert state(metrics, "sink", plugin.address) is None
