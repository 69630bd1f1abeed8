"""An emit's events go out in EmitRequests within ``max_batch_events`` and ``max_batch_bytes``.

Real SDK emitter plugins (PluginHost servers on 127.0.0.1:0, gRPC's default 4 MiB
receive limit), on the async and the sync path; and the splitting on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from emit_sinks import FAST, EmitterHosts, Sink, events
from prometheus_client import CollectorRegistry

from ingestor import ExternalEmitter, Hub, PluginEmitError, RegistryResolver, RetryPolicy
from ingestor.delivery import BatchLimits, Emission, encoded_size
from registry.sdk import PluginHost
from registry.server import RegistryServer
from registry.wire import event_pb, pb

MiB = 1024 * 1024
Host = Callable[..., PluginHost]


@dataclass
class SizedSink(Sink):
    """A Sink that also records the encoded size of every request."""

    sizes: list[int] = field(default_factory=list)

    def emit(self, request: pb.EmitRequest) -> pb.EmitResponse:
        self.sizes.append(request.ByteSize())
        return super().emit(request)


@pytest.fixture
async def host(registry: RegistryServer) -> AsyncIterator[Callable[..., PluginHost]]:
    hosts = EmitterHosts(registry.address)
    yield hosts.make
    await hosts.stop()


def numbered(count: int, payload: bytes = b"x") -> list[event_pb.Event]:
    return [event_pb.Event(id=f"e{n}", source="test", payload=payload) for n in range(count)]


def big(id: str, size: int) -> event_pb.Event:
    return event_pb.Event(id=id, source="test", payload=b"b" * size)


async def test_2500_events_go_as_three_requests_in_order_and_none_is_lost(host: Host) -> None:
    sink = Sink()
    plugin = host(sink)
    await plugin.start()
    metrics = CollectorRegistry()
    batch = numbered(2500)
    async with ExternalEmitter("sink", plugin.address, retry=FAST, metrics=metrics) as emitter:
        await emitter.emit_async(batch)
    assert [len(r) for r in sink.requests] == [1000, 1000, 500]
    assert sink.received() == [e.id for e in batch]
    emitted = metrics.get_sample_value(
        "polku_gateway_emit_events_total", {"emitter": "sink", "outcome": "emitted"}
    )
    assert emitted == 2500


async def test_megabyte_events_are_split_by_bytes_under_the_plugins_receive_limit(
    host: Host,
) -> None:
    sink = SizedSink()
    plugin = host(sink)
    await plugin.start()
    batch = [big(f"m{n}", MiB) for n in range(7)]  # 7 MiB in all
    async with ExternalEmitter("sink", plugin.address, retry=FAST) as emitter:
        await emitter.emit_async(batch)
        # Three of them (3 MiB and a little) fit in 4,000,000 bytes, four do not.
        assert [len(r) for r in sink.requests] == [3, 3, 1]
        assert max(sink.sizes) <= 4_000_000
        assert sink.received() == [e.id for e in batch]

    # The same batch in one request is over the plugin's 4 MiB: every event fails.
    refused = SizedSink()
    other = host(refused, "other")
    await other.start()
    async with ExternalEmitter(
        "other", other.address, retry=FAST, max_batch_bytes=64 * MiB
    ) as whole:
        with pytest.raises(PluginEmitError) as caught:
            await whole.emit_async(batch)
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert caught.value.failed_event_ids == [e.id for e in batch]
    assert refused.requests == []


async def test_a_small_max_batch_bytes_splits_before_max_batch_events(host: Host) -> None:
    sink = SizedSink()
    plugin = host(sink)
    await plugin.start()
    batch = [event_pb.Event(id=f"e{n:02}", payload=b"p" * 1000) for n in range(40)]
    limit = 5 * encoded_size(batch[0])
    async with ExternalEmitter(
        "sink", plugin.address, retry=FAST, max_batch_events=7, max_batch_bytes=limit
    ) as emitter:
        await emitter.emit_async(batch)
    assert [len(r) for r in sink.requests] == [5] * 8
    assert max(sink.sizes) <= limit
    assert sink.received() == [e.id for e in batch]


async def test_an_oversized_event_is_named_failed_and_the_others_delivered(host: Host) -> None:
    sink = Sink()
    plugin = host(sink)
    await plugin.start()
    metrics = CollectorRegistry()
    batch = [*events("a", "b"), big("huge", 5000), *events("c")]
    async with ExternalEmitter(
        "sink", plugin.address, retry=FAST, max_batch_bytes=2048, metrics=metrics
    ) as emitter:
        with pytest.raises(PluginEmitError) as caught:
            await emitter.emit_async(batch)
    error = caught.value
    assert error.failed_event_ids == ["huge"]
    assert len(error.errors) == 1
    assert error.errors[0].event_id == "huge"
    assert not error.errors[0].retryable
    assert "over max_batch_bytes (2048)" in error.errors[0].message
    assert "1 of 4 event(s) not delivered" in str(error)
    assert "over max_batch_bytes (2048) not sent, e.g. 'huge'" in str(error)
    assert error.__cause__ is None  # nothing failed on the wire
    assert sink.requests == [["a", "b", "c"]]
    counts = {
        outcome: metrics.get_sample_value(
            "polku_gateway_emit_events_total", {"emitter": "sink", "outcome": outcome}
        )
        for outcome in ("emitted", "failed")
    }
    assert counts == {"emitted": 3, "failed": 1}

    # Every event too big: nothing is sent, all are named.
    async with ExternalEmitter("sink", plugin.address, max_batch_bytes=1024) as emitter:
        with pytest.raises(PluginEmitError) as caught:
            await emitter.emit_async([big("x", 2000), big("y", 2000)])
    assert caught.value.failed_event_ids == ["x", "y"]
    assert len(sink.requests) == 1


async def test_failures_of_every_request_are_named_in_order_each_retried_alone(host: Host) -> None:
    sink = Sink(fail={"e1", "e6"}, retry_once={"e4"})
    plugin = host(sink)
    await plugin.start()
    batch = numbered(8)
    batch[3] = big("e3", 3000)
    async with ExternalEmitter(
        "sink", plugin.address, retry=FAST, max_batch_events=2, max_batch_bytes=2048
    ) as emitter:
        with pytest.raises(PluginEmitError) as caught:
            await emitter.emit_async(batch)
    # e3 is not sent; e4's retry goes alone, before the next request.
    assert sink.requests == [["e0", "e1"], ["e2", "e4"], ["e4"], ["e5", "e6"], ["e7"]]
    error = caught.value
    assert error.failed_event_ids == ["e1", "e3", "e6"]
    assert [e.event_id for e in error.errors] == ["e1", "e3", "e6"]
    assert "3 of 8 event(s) not delivered" in str(error)
    assert "2 of 4 request(s) failed, the last after 1 attempt(s)" in str(error)


async def test_an_unreachable_plugin_fails_every_request_and_names_all(
    free_port: Callable[[], int],
) -> None:
    address = f"127.0.0.1:{free_port()}"
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
    async with ExternalEmitter(
        "gone", address, retry=policy, connect_timeout=1, max_batch_events=2
    ) as emitter:
        with pytest.raises(PluginEmitError) as caught:
            await emitter.emit_async(numbered(5))
    assert caught.value.failed_event_ids == ["e0", "e1", "e2", "e3", "e4"]
    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.__cause__ is not None


async def test_the_sync_path_splits_alike(host: Host) -> None:
    sink = Sink(fail={"e1999"})
    plugin = host(sink)
    await plugin.start()
    batch = [*numbered(2500), big("huge", 5 * MiB)]

    def use() -> list[str]:
        with ExternalEmitter("sink", plugin.address, retry=FAST) as emitter:
            try:
                emitter.emit(batch)
            except PluginEmitError as exc:
                return exc.failed_event_ids
            return []

    assert await asyncio.to_thread(use) == ["e1999", "huge"]
    assert [len(r) for r in sink.requests] == [1000, 1000, 500]
    assert sink.received() == [e.id for e in batch[:-1]]


async def test_a_hub_makes_its_emitters_with_its_batch_limits(
    host: Host, registry: RegistryServer
) -> None:
    sink = Sink()
    await host(sink).start()
    async with RegistryResolver(registry.address) as resolver:
        await resolver.wait_for_async(lambda v: bool(v.emitter_endpoints("sink")), 10)
        async with Hub(resolver=resolver, retry=FAST, max_batch_events=2).build() as hub:
            result = await hub.emit_async(numbered(5))
    assert result.ok
    assert sink.requests == [["e0", "e1"], ["e2", "e3"], ["e4"]]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_batch_events", 0),
        ("max_batch_events", 100_001),
        ("max_batch_events", 2.5),
        ("max_batch_events", True),
        ("max_batch_bytes", 1023),
        ("max_batch_bytes", 64 * MiB + 1),
        ("max_batch_bytes", "4000000"),
    ],
)
def test_limits_out_of_range_are_refused_by_name(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        ExternalEmitter("x", "127.0.0.1:1", **{name: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=name):
        Hub(**{name: value})  # type: ignore[arg-type]


def test_the_bounds_themselves_are_accepted() -> None:
    for events_limit, bytes_limit in ((1, 1024), (100_000, 64 * MiB)):
        ExternalEmitter(
            "x", "127.0.0.1:1", max_batch_events=events_limit, max_batch_bytes=bytes_limit
        ).close()


# -- the splitting alone -----------------------------------------------------------------


def test_requests_are_exactly_as_large_as_their_events_encoded() -> None:
    batch = [big(f"s{n}", size) for n, size in enumerate((0, 1, 126, 127, 128, 16_383, 20_000))]
    for event in batch:
        assert encoded_size(event) == pb.EmitRequest(events=[event]).ByteSize()
    emission = Emission("x", batch, FAST, BatchLimits(max_batch_bytes=20_000))
    for request in emission.batches:
        assert pb.EmitRequest(events=request).ByteSize() <= 20_000
    assert [e.id for e, _ in emission.oversized] == ["s6"]
    assert [e.id for r in emission.batches for e in r] == [f"s{n}" for n in range(6)]


def test_an_empty_call_and_one_request_keep_the_plain_error() -> None:
    assert Emission("x", [], FAST, BatchLimits()).batches == []
    emission = Emission("x", events("a", "b"), FAST, BatchLimits())
    (delivery,) = emission.deliveries()
    delivery.request()
    delivery.answered("h:1", pb.EmitResponse(failed_event_ids=["b"]))
    error = emission.error()
    assert error is not None
    assert error.failed_event_ids == ["b"]
    assert "1 of 2 event(s) not delivered after 1 attempt(s)" in str(error)


def test_the_budget_is_the_calls_a_request_not_started_within_it_is_not_sent() -> None:
    now = [100.0]
    emission = Emission(
        "x", events("a", "b", "c"), FAST, BatchLimits(max_batch_events=1), clock=lambda: now[0]
    )
    sent = []
    for delivery in emission.deliveries():
        request = delivery.request()
        sent.append([e.id for e in request.events])
        delivery.answered("h:1", pb.EmitResponse(success_count=len(request.events)))
        now[0] += FAST.budget  # the first request took the whole budget
    assert sent == [["a"]]
    error = emission.error()
    assert error is not None
    assert error.failed_event_ids == ["b", "c"]
    assert "ran out before it was sent" in str(error)
