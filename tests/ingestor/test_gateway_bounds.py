"""The gateway side is bounded too (SPEC §7): limits on answers, a breaker that counts
what a broken plugin does, and a resolver that publishes a split snapshot only whole.

Plugins here are real ``grpc.aio`` servers on 127.0.0.1:0 whose generic handlers answer
crafted bytes, so an answer can be anything a broken or hostile plugin could send.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from ingestor import (
    BreakerSettings,
    ExternalIngestor,
    Hub,
    IngestContext,
    PluginConnectionError,
    PluginError,
    PluginTransformError,
    RegistryResolver,
    ResolverView,
)
from ingestor.answer import AnswerLimits, AnswerRefused, decode_answer
from ingestor.revisions import SPLIT_BUDGET, RevisionAssembler
from registry.client import RegistryClient
from registry.testing import FakePlugin, eventually, running_registry
from registry.watch import MESSAGE_BUDGET
from registry.wire import event_pb, pb

CTX = IngestContext("k8s")
MiB = 1024 * 1024
# Open after two failures and stay open: a test counts the calls that reach the plugin.
TWO_STRIKES = BreakerSettings(failure_threshold=2, reset_timeout=600)
# Never opens within a test: every call reaches the plugin.
PATIENT = BreakerSettings(failure_threshold=1000)


class RawPlugin:
    """An ``IngestorPlugin`` whose Ingest and Health answer whatever bytes it is given.

    ``status``, when set, makes Ingest fail with it instead (``details`` as message).
    """

    def __init__(
        self,
        answer: bytes = b"",
        *,
        health: bytes | None = None,
        server_options: list[tuple[str, int]] | None = None,
    ) -> None:
        self.answer = answer
        self.health = (
            health
            if health is not None
            else pb.PluginHealthResponse(healthy=True).SerializeToString()
        )
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self.ingest_calls = 0
        self.port = 0
        self._options = server_options or []
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _ingest(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.ingest_calls += 1
        if self.status is not None:
            await context.abort(self.status, self.details)
        return self.answer

    async def _health(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.health

    async def __aenter__(self) -> RawPlugin:
        server = grpc.aio.server(options=self._options)
        # No (de)serializers: requests and answers are bytes as they are on the wire.
        handler = grpc.method_handlers_generic_handler(
            "polku.v1.IngestorPlugin",
            {
                "Ingest": grpc.unary_unary_rpc_method_handler(self._ingest),
                "Health": grpc.unary_unary_rpc_method_handler(self._health),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(None)


def events(count: int, payload: bytes = b"") -> bytes:
    """An encoded IngestResponse of ``count`` events carrying ``payload``."""
    return pb.IngestResponse(events=[event_pb.Event(payload=payload)] * count).SerializeToString()


def status(field: str) -> int:
    """A size from /proc/self/status (``VmRSS``, ``VmHWM``), in bytes (Linux)."""
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Make VmHWM (the peak RSS) start again from the current RSS; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


async def breaker_opens(ingestor: ExternalIngestor, plugin: RawPlugin, error: str) -> None:
    """Two refused answers, then the circuit is open: the third call never reaches it."""
    for _ in range(2):
        with pytest.raises(PluginTransformError, match=error):
            await ingestor.ingest_async(CTX, b"x")
    with pytest.raises(PluginConnectionError, match="circuit open"):
        await ingestor.ingest_async(CTX, b"x")
    assert plugin.ingest_calls == 2


# -- undecodable answers ---------------------------------------------------------------

UNDECODABLE = {
    "garbage": b"\xff\xff\xff",
    "truncated-event": b"\x0a\x05ab",
    "bad-utf8-in-event-id": b"\x0a\x03\x0a\x01\xff",
    "field-zero": b"\x02\x00",
    "wire-type-7": b"\x0f" * 64,
    "long-varint": b"\x08" + b"\xff" * 16,
    # Longer than 2 x max_events bytes, so counted before decoding: broken mid-way.
    "truncated-while-counted": events(5) + b"\x0a\x7f" + b"\x00" * 30,
}


@pytest.mark.parametrize("answer", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_an_undecodable_answer_is_a_transform_error_and_a_breaker_failure(answer):
    async with (
        RawPlugin(answer) as plugin,
        ExternalIngestor("k8s", plugin.address, breaker=TWO_STRIKES, max_events=10) as ingestor,
    ):
        await breaker_opens(ingestor, plugin, "undecodable IngestResponse")


async def test_an_undecodable_answer_is_never_another_exception_type():
    async with (
        RawPlugin(b"\xff\xff") as plugin,
        ExternalIngestor("k8s", plugin.address) as ingestor,
    ):
        with pytest.raises(PluginError) as caught:
            await ingestor.ingest_async(CTX, b"x")
        assert type(caught.value) is PluginTransformError
        assert caught.value.address == plugin.address
        assert isinstance(caught.value.__cause__, AnswerRefused)
        # From a thread without a loop, through the sync bridge, alike.
        with pytest.raises(PluginTransformError, match="undecodable"):
            await asyncio.to_thread(ingestor.ingest, CTX, b"x")


async def test_an_undecodable_health_answer_is_a_plugin_error_not_none():
    async with (
        RawPlugin(health=b"\xff\xff") as plugin,
        ExternalIngestor("k8s", plugin.address) as ingestor,
    ):
        with pytest.raises(PluginError, match="undecodable PluginHealthResponse"):
            await ingestor.health_async()


async def test_a_good_answer_after_bad_ones_closes_nothing_and_decodes():
    async with (
        RawPlugin(b"\xff") as plugin,
        ExternalIngestor("k8s", plugin.address, breaker=TWO_STRIKES) as ingestor,
    ):
        with pytest.raises(PluginTransformError):
            await ingestor.ingest_async(CTX, b"x")
        plugin.answer = events(3, b"p")
        got = await ingestor.ingest_async(CTX, b"x")
        assert [e.payload for e in got] == [b"p"] * 3
        assert ingestor.channels() == 1  # the same channel: a bad answer is not a bad link


# -- max_events ------------------------------------------------------------------------


async def test_empty_events_over_max_events_are_refused_without_materialising_them():
    """4 MiB of empty events (2 M of them, two bytes each) against max_events=100,000.

    Decoded, they were 2.1 M events and ~650 MB of RSS per call. Refused before
    decoding, several calls raise this process's peak RSS (client and plugin both) by
    less than 10 times the answer's size: the answer's own bytes on each side, a few
    times. The peak, not the RSS after: memory freed after a call would hide it.
    """
    answer = b"\x0a\x00" * (2 * MiB)
    assert len(answer) == 4 * MiB
    async with (
        RawPlugin(answer) as plugin,
        ExternalIngestor("k8s", plugin.address, breaker=PATIENT, max_events=100_000) as ingestor,
    ):
        with pytest.raises(PluginTransformError, match="max_events=100000"):
            await ingestor.ingest_async(CTX, b"x")  # warm: channels, buffers
        gc.collect()
        peak = "VmHWM" if reset_peak_rss() else "VmRSS"
        before = status("VmRSS")
        for _ in range(5):
            with pytest.raises(PluginTransformError, match="more than max_events=100000 events"):
                await ingestor.ingest_async(CTX, b"x")
        growth = status(peak) - before
    assert plugin.ingest_calls == 6
    assert growth < 10 * len(answer), f"{peak} grew {growth / MiB:.1f} MiB"


async def test_max_events_is_a_breaker_failure_and_its_boundary_is_exact():
    async with (
        RawPlugin(events(1000, b"0123456789")) as plugin,
        ExternalIngestor("k8s", plugin.address, breaker=TWO_STRIKES, max_events=1000) as ingestor,
    ):
        assert len(await ingestor.ingest_async(CTX, b"x")) == 1000
        plugin.answer = events(1001, b"0123456789")
        plugin.ingest_calls = 0
        await breaker_opens(ingestor, plugin, "more than max_events=1000 events")


async def test_errors_are_bounded_like_events():
    errors = pb.IngestResponse(errors=[pb.IngestError()] * 50).SerializeToString()
    async with (
        RawPlugin(errors) as plugin,
        ExternalIngestor("k8s", plugin.address, max_events=10) as ingestor,
    ):
        with pytest.raises(PluginTransformError, match="more than max_events=10 errors"):
            await ingestor.ingest_async(CTX, b"x")


def test_fields_other_than_events_and_errors_are_not_counted():
    limits = AnswerLimits(max_events=2)
    unknown = b"\x7a\x00" * 100  # field 15, empty: kept by protobuf as unknown
    group = b"\x7b" + b"\x0a\x00" * 100 + b"\x7c"  # events inside a group are not events
    answer = unknown + group + b"\x0a\x00\x0a\x00"
    assert len(decode_answer(answer, limits).events) == 2
    with pytest.raises(AnswerRefused, match="max_events=2"):
        decode_answer(answer + b"\x0a\x00", limits)


def test_limits_are_checked():
    for bad in ({"max_events": 0}, {"max_response_bytes": 10}, {"max_response_bytes": 2**31}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ExternalIngestor("k8s", "127.0.0.1:1", **bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=next(iter(bad))):
            Hub(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_response_bytes"):
        ExternalIngestor(
            "k8s", "127.0.0.1:1", channel_options=[("grpc.max_receive_message_length", 1)]
        )
    assert Hub(max_events=7, max_response_bytes=4096).limits == AnswerLimits(4096, 7)


# -- max_response_bytes ----------------------------------------------------------------


async def test_an_answer_over_max_response_bytes_is_a_transform_error_and_a_breaker_failure():
    limit = 64 * 1024
    fits = events(10, b"p" * (limit // 20))
    assert len(fits) < limit
    async with (
        RawPlugin(fits) as plugin,
        ExternalIngestor(
            "k8s", plugin.address, breaker=TWO_STRIKES, max_response_bytes=limit
        ) as ingestor,
    ):
        assert len(await ingestor.ingest_async(CTX, b"x")) == 10
        plugin.answer = events(10, b"p" * (limit // 5))
        assert len(plugin.answer) > limit
        with pytest.raises(PluginTransformError, match=f"max_response_bytes={limit}") as caught:
            await ingestor.ingest_async(CTX, b"x")
        assert caught.value.address == plugin.address
        # The refusal broke the stream, not the channel: a fitting answer comes through
        # on the same one (and, a success, resets the breaker's count).
        plugin.answer = fits
        assert len(await ingestor.ingest_async(CTX, b"x")) == 10
        assert ingestor.channels() == 1
        plugin.answer = events(10, b"p" * (limit // 5))
        plugin.ingest_calls = 0
        await breaker_opens(ingestor, plugin, f"max_response_bytes={limit}")


@pytest.mark.parametrize("how", ["own-status", "request-over-its-limit"])
async def test_a_plugins_own_resource_exhausted_is_an_answer_not_a_breaker_failure(how):
    """Only this side's receive limit counts: a plugin that says RESOURCE_EXHAUSTED is up."""
    options = [("grpc.max_receive_message_length", 4096)] if how != "own-status" else []
    async with (
        RawPlugin(events(1), server_options=options) as plugin,
        ExternalIngestor("k8s", plugin.address, breaker=TWO_STRIKES) as ingestor,
    ):
        if how == "own-status":
            plugin.status, plugin.details = grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"
        payload = b"x" * 8192 if how != "own-status" else b"x"
        for _ in range(3):
            with pytest.raises(PluginTransformError) as caught:
                await ingestor.ingest_async(CTX, payload)
            assert caught.value.code == "RESOURCE_EXHAUSTED"
            assert "max_response_bytes" not in str(caught.value)
        plugin.status = None
        assert len(await ingestor.ingest_async(CTX, b"x")) == 1  # never opened


# -- split Watch snapshots -------------------------------------------------------------


def test_the_split_budget_is_the_registrys():
    assert SPLIT_BUDGET == MESSAGE_BUDGET


def plugin_message(pid: str, port: int, source: str, size: int = 0) -> pb.RegisteredPlugin:
    return pb.RegisteredPlugin(
        plugin_id=pid,
        address=f"127.0.0.1:{port}",
        status=pb.PLUGIN_STATUS_HEALTHY,
        info=pb.PluginInfo(
            name=pid, type=pb.PLUGIN_TYPE_INGESTOR, sources=[source], description="d" * size
        ),
    )


def test_a_full_message_is_held_until_the_next_one_shows_its_revision_ended():
    big = [plugin_message(f"p{i}", 1000 + i, f"s{i}", size=60_000) for i in range(17)]
    first = pb.WatchResponse(revision=9, snapshot=True, upserted=big)
    assert first.ByteSize() > SPLIT_BUDGET - 64 * 1024  # no room for another plugin
    assembler = RevisionAssembler()
    assert assembler.feed(first) == []
    assert assembler.holding
    last = pb.WatchResponse(revision=9, upserted=[plugin_message("q", 2000, "t")])
    (whole,) = assembler.feed(last)  # room left: it was the last part
    assert whole.snapshot
    assert whole.revision == 9
    assert [p.plugin_id for p in whole.upserted] == [*(f"p{i}" for i in range(17)), "q"]
    # Full again: held until a progress message, or the next revision, says it ended.
    assert assembler.feed(pb.WatchResponse(revision=10, upserted=big)) == []
    (ended, progress) = assembler.feed(pb.WatchResponse(revision=10))
    assert (ended.revision, len(ended.upserted), progress.progress) == (10, 17, True)
    assert assembler.feed(pb.WatchResponse(revision=11, upserted=big)) == []
    (ended, delta) = assembler.feed(pb.WatchResponse(revision=12, removed_plugin_ids=["p0"]))
    assert (ended.revision, delta.revision, delta.removed) == (11, 12, ("p0",))
    # A stream that broke mid-revision drops the part it had.
    assert assembler.feed(pb.WatchResponse(revision=13, upserted=big)) == []
    assembler.reset()
    assert not assembler.holding
    (snapshot,) = assembler.feed(pb.WatchResponse(revision=13, snapshot=True))
    assert snapshot.snapshot
    assert snapshot.upserted == ()


def test_a_part_after_a_revision_looked_whole_is_still_applied(caplog):
    """A registry with plugins over max_plugin_bytes: late parts apply as changes."""
    assembler = RevisionAssembler(max_plugin_bytes=1024)
    (snapshot,) = assembler.feed(
        pb.WatchResponse(revision=3, snapshot=True, upserted=[plugin_message("a", 1, "s")])
    )
    (late,) = assembler.feed(pb.WatchResponse(revision=3, upserted=[plugin_message("b", 2, "t")]))
    view = ResolverView.snapshot(snapshot.revision, snapshot.upserted)
    view = view.apply(late.revision, late.upserted, late.removed)
    assert view.sources() == {"s", "t"}
    assert "raise it" in caplog.text


async def register_large(
    client: RegistryClient, count: int, plugins: list[FakePlugin]
) -> dict[str, str]:
    """``count`` registrations of ~20 kB, 64 sources each; source → its address."""
    labels = {f"k{j:02}": "v" * 256 for j in range(32)}
    routes: dict[str, str] = {}
    calls = []
    for i in range(count):
        sources = [f"l{i}-{j:02}-" + "s" * 110 for j in range(64)]
        address = plugins[i % len(plugins)].address
        info = pb.PluginInfo(
            name=f"large-{i}",
            type=pb.PLUGIN_TYPE_INGESTOR,
            version="v" * 64,
            description="d" * 1024,
            sources=sources,
            capabilities=[f"c{j:02}-" + "c" * 60 for j in range(32)],
        )
        routes.update(dict.fromkeys(sources, address))
        calls.append(client.register(info, address, labels=labels))
    await asyncio.gather(*calls)
    return routes


async def snapshot_messages(client: RegistryClient, expected: int) -> int:
    """How many messages the registry's snapshot takes, read as a plain Watch client."""
    seen: set[str] = set()
    messages = 0
    async with asyncio.timeout(60):
        async for message in client.watch():
            assert message.snapshot == (messages == 0)
            messages += 1
            seen.update(p.plugin_id for p in message.upserted)
            if len(seen) == expected:
                return messages
    raise AssertionError("the stream ended")


@contextlib.asynccontextmanager
async def fake_plugins(count: int) -> AsyncIterator[list[FakePlugin]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(FakePlugin()) for _ in range(count)]


async def test_a_split_snapshot_is_published_only_once_whole(tmp_path: Path):
    """The registry splits a 3 MB snapshot into several messages of one revision; the
    resolver's first view, the one wait_synced returns, routes every source of it."""
    count = 150
    async with (
        running_registry(tmp_path, health_interval=60) as registry,
        fake_plugins(3) as plugins,
        RegistryClient(registry.address) as client,
    ):
        routes = await register_large(client, count, plugins)
        healthy = [pb.PLUGIN_STATUS_HEALTHY]
        await eventually(
            lambda: _all_listed(client, healthy, count), within=60, what="every plugin HEALTHY"
        )
        assert await snapshot_messages(client, count) >= 3

        published: list[ResolverView] = []
        resolver = RegistryResolver(registry.address)
        resolver.subscribe(published.append)
        async with resolver:
            view = await resolver.wait_synced_async(30)
            missing = [s for s, address in routes.items() if not _routes(resolver, s, address)]
            assert missing == [], f"{len(missing)} of {len(routes)} sources do not resolve"
            assert len(view.plugins) == count
            # No view, not even a passing one, held part of the snapshot.
            assert published
            assert all(len(v.plugins) == count for v in published)
            assert published[0].sources() == set(routes)
            async with Hub(resolver=resolver).build() as hub:  # and the next ingest works
                got = await hub.ingest_async(IngestContext(next(iter(routes))), b"one\ntwo")
                assert [e.payload for e in got] == [b"one", b"two"]


async def _all_listed(client: RegistryClient, statuses: Sequence[int], count: int) -> bool:
    return len(await client.list_plugins(statuses=statuses)) == count


def _routes(resolver: RegistryResolver, source: str, address: str) -> bool:
    try:
        return [e.address for e in resolver.resolve(source)] == [address]
    except PluginConnectionError:
        return False


async def test_health_of_a_plugin_answering_empty_bytes_is_a_default_answer():
    """Positive control for the raw Health path: empty bytes are a valid (empty) message."""
    async with (
        RawPlugin(health=Empty().SerializeToString()) as plugin,
        ExternalIngestor("k8s", plugin.address) as ingestor,
    ):
        health = await ingestor.health_async()
        assert health == pb.PluginHealthResponse()
