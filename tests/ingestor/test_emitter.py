"""ExternalEmitter against real SDK emitter plugins (PluginHost servers on 127.0.0.1:0).

Failed ids, retries of retryable errors and of transport failures, error statuses,
Shutdown on close, the sync path, the metrics; and the retry bookkeeping
(:mod:`ingestor.delivery`) on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import pytest
from emit_sinks import FAST, EmitterHosts, Sink, events
from prometheus_client import CollectorRegistry

from ingestor import (
    ExternalEmitter,
    PluginConnectionError,
    PluginEmitError,
    PluginError,
    RegistryResolver,
    RetryPolicy,
)
from ingestor.delivery import Delivery
from registry.sdk import PluginHost
from registry.server import RegistryServer
from registry.wire import pb


@pytest.fixture
async def host(registry: RegistryServer) -> AsyncIterator[Callable[..., PluginHost]]:
    """Start SDK emitter hosts registered with the test's registry; stopped afterwards."""
    hosts = EmitterHosts(registry.address)
    yield lambda sink: hosts.make(sink, name="sink")
    await hosts.stop()


def counts(metrics: CollectorRegistry, emitter: str) -> dict[str, float]:
    return {
        outcome: metrics.get_sample_value(
            "polku_gateway_emit_events_total", {"emitter": emitter, "outcome": outcome}
        )
        or 0.0
        for outcome in ("emitted", "failed", "retried")
    }


async def test_failed_ids_become_a_plugin_emit_error_carrying_exactly_them(host) -> None:
    sink = Sink(fail={"b", "d"})
    plugin = host(sink)
    await plugin.start()
    metrics = CollectorRegistry()
    async with ExternalEmitter("sink", plugin.address, retry=FAST, metrics=metrics) as emitter:
        with pytest.raises(PluginEmitError) as caught:
            await emitter.emit_async(events("a", "b", "c", "d", "e"))
    error = caught.value
    assert isinstance(error, PluginError)
    assert error.failed_event_ids == ["b", "d"]
    assert [(e.event_id, e.message, e.retryable) for e in error.errors] == [
        ("b", "bad", False),
        ("d", "bad", False),
    ]
    assert (error.emitter, error.address, error.code) == ("sink", plugin.address, "")
    assert "2 of 5 event(s) not delivered after 1 attempt(s)" in str(error)
    assert sink.requests == [["a", "b", "c", "d", "e"]]  # not retried
    assert counts(metrics, "sink") == {"emitted": 3, "failed": 2, "retried": 0}


async def test_a_retryable_error_is_retried_and_the_event_delivered_once_more(host) -> None:
    sink = Sink(retry_once={"b"})
    plugin = host(sink)
    await plugin.start()
    metrics = CollectorRegistry()
    async with ExternalEmitter("sink", plugin.address, retry=FAST, metrics=metrics) as emitter:
        await emitter.emit_async(events("a", "b", "c"))
    # Only the id the plugin failed retryably is sent again.
    assert sink.requests == [["a", "b", "c"], ["b"]]
    assert counts(metrics, "sink") == {"emitted": 3, "failed": 0, "retried": 1}


async def test_retries_run_out_after_max_attempts_and_name_the_event(host) -> None:
    sink = Sink(always_retry={"b"})
    plugin = host(sink)
    await plugin.start()
    metrics = CollectorRegistry()
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    async with ExternalEmitter("sink", plugin.address, retry=policy, metrics=metrics) as emitter:
        with pytest.raises(PluginEmitError) as caught:
            await emitter.emit_async(events("a", "b"))
    assert caught.value.failed_event_ids == ["b"]
    assert [e.message for e in caught.value.errors] == ["busy"]
    assert "after 3 attempt(s)" in str(caught.value)
    assert sink.requests == [["a", "b"], ["b"], ["b"]]
    assert counts(metrics, "sink") == {"emitted": 1, "failed": 1, "retried": 2}


async def test_an_error_status_fails_every_event_without_a_retry(host) -> None:
    sink = Sink(raise_on={"x"})
    plugin = host(sink)
    await plugin.start()
    async with ExternalEmitter("sink", plugin.address, retry=FAST) as emitter:
        with pytest.raises(PluginEmitError) as caught:
            await emitter.emit_async(events("a", "x"))
    assert caught.value.failed_event_ids == ["a", "x"]
    assert caught.value.code == "INTERNAL"
    assert "emit failed: RuntimeError: the sink is down" in str(caught.value)
    assert len(sink.requests) == 1


async def test_an_unreachable_emitter_is_retried_then_names_every_event(free_port) -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    metrics = CollectorRegistry()
    address = f"127.0.0.1:{free_port()}"
    async with ExternalEmitter(
        "gone", address, retry=policy, connect_timeout=1, metrics=metrics
    ) as emitter:
        with pytest.raises(PluginEmitError) as caught:
            await emitter.emit_async(events("a", "b"))
    assert caught.value.failed_event_ids == ["a", "b"]
    assert caught.value.code == "UNAVAILABLE"
    assert isinstance(caught.value.__cause__, PluginConnectionError)
    assert counts(metrics, "gone") == {"emitted": 0, "failed": 2, "retried": 4}


async def test_shutdown_is_called_on_close_on_every_instance_used(
    host, registry: RegistryServer
) -> None:
    first, second = Sink(), Sink()
    one, two = host(first), host(second)
    await one.start()
    await two.start()
    async with RegistryResolver(registry.address) as resolver:
        both = {one.address, two.address}
        await resolver.wait_for_async(
            lambda v: {e.address for e in v.emitter_endpoints("sink")} == both, 10
        )
        emitter = ExternalEmitter("sink", resolver=resolver, retry=FAST)
        for n in range(4):
            await emitter.emit_async(events(f"e{n}"))
        assert first.requests
        assert second.requests
        await emitter.aclose()
        assert (first.shutdowns, second.shutdowns) == (1, 1)
        await emitter.aclose()  # idempotent: no second Shutdown
        assert (first.shutdowns, second.shutdowns) == (1, 1)
        with pytest.raises(PluginError, match="closed"):
            await emitter.emit_async(events("late"))


async def test_an_emitter_never_used_calls_no_shutdown(host) -> None:
    sink = Sink()
    plugin = host(sink)
    await plugin.start()
    await ExternalEmitter("sink", plugin.address).aclose()
    assert sink.shutdowns == 0


async def test_a_failing_shutdown_is_logged_not_raised(
    host, free_port, caplog: pytest.LogCaptureFixture
) -> None:
    sink = Sink(shutdown_raises=True)
    plugin = host(sink)
    await plugin.start()
    emitter = ExternalEmitter("sink", plugin.address, retry=FAST)
    await emitter.emit_async(events("a"))
    with caplog.at_level(logging.WARNING, logger="ingestor.emitter"):
        await emitter.aclose()
    assert sink.shutdowns == 1
    assert "answered Shutdown unsuccessfully: RuntimeError: cannot flush" in caplog.text

    # One whose instance is gone by then: Shutdown fails, close still returns.
    gone = Sink()
    other = host(gone)
    await other.start()
    emitter = ExternalEmitter("sink", other.address, retry=FAST, shutdown_timeout=2)
    await emitter.emit_async(events("b"))
    await other.stop(0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ingestor.emitter"):
        await emitter.aclose()
    assert "Shutdown of emitter 'sink'" in caplog.text


async def test_the_sync_path_emits_retries_and_shuts_down_from_a_thread(host) -> None:
    sink = Sink(retry_once={"b"}, fail={"c"})
    plugin = host(sink)
    await plugin.start()

    def use() -> list[str]:
        with ExternalEmitter("sink", plugin.address, retry=FAST) as emitter:
            emitter.emit(events("a", "b"))
            try:
                emitter.emit(events("c", "d"))
            except PluginEmitError as exc:
                return exc.failed_event_ids
            return []

    assert await asyncio.to_thread(use) == ["c"]
    assert sink.requests == [["a", "b"], ["b"], ["c", "d"]]
    assert sink.shutdowns == 1


async def test_emit_inside_a_running_loop_is_refused(host) -> None:
    sink = Sink()
    plugin = host(sink)
    await plugin.start()
    async with ExternalEmitter("sink", plugin.address) as emitter:
        with pytest.raises(PluginError, match="emit_async"):
            emitter.emit(events("a"))
        await emitter.emit_async([])  # an empty batch sends nothing
    assert sink.requests == []


def test_construction_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ExternalEmitter("x")
    with pytest.raises(ValueError, match="positive"):
        ExternalEmitter("x", "127.0.0.1:1", emit_timeout=0)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="budget"):
        RetryPolicy(budget=0)


# -- the bookkeeping alone ---------------------------------------------------------------


def test_delivery_resends_only_retryable_ids_and_fails_the_rest_in_order() -> None:
    delivery = Delivery("x", events("a", "b", "c", "d", ""), FAST)
    assert [e.id for e in delivery.request().events] == ["a", "b", "c", "d", ""]
    delivery.answered(
        "h:1",
        pb.EmitResponse(
            failed_event_ids=["d", "a", "zz"],  # an id not sent is ignored
            errors=[
                pb.EmitError(event_id="b", message="busy", retryable=True),
                pb.EmitError(event_id="d", message="busy", retryable=True),
                pb.EmitError(event_id="d", message="bad", retryable=False),  # wins
            ],
        ),
    )
    assert [e.id for e in delivery.pending] == ["b"]
    assert delivery.delivered == 2  # c, and the event without an id
    assert delivery.next_delay() is not None
    assert delivery.retried == 1
    delivery.request()
    delivery.answered("h:2", pb.EmitResponse(success_count=1))
    assert delivery.next_delay() is None
    error = delivery.error()
    assert error is not None
    assert error.failed_event_ids == ["a", "d"]
    assert [e.message for e in error.errors] == ["bad"]  # "a" came with no EmitError


def test_delivery_stops_at_the_budget() -> None:
    now = [0.0]
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.5, max_backoff=0.5, budget=1.0)
    delivery = Delivery("x", events("a"), policy, clock=lambda: now[0])
    delivery.request()
    delivery.unreachable("h:1", PluginConnectionError("down"))
    now[0] = 1.0  # the budget is spent: no wait could end within it
    assert delivery.next_delay() is None
    error = delivery.error()
    assert error is not None
    assert error.failed_event_ids == ["a"]
    assert error.code == "UNAVAILABLE"


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.3)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.3), (9, 0.3)):
        waits = [policy.backoff(retry) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
