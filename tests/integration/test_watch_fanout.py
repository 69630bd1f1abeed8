"""Serialise once, fan out many (issue 13): one encoding per change, coalesced laggards.

The hub encodes a Watch message once and yields the same ``bytes`` object to every
stream whose filters give the same content; gRPC sends it as it is. Shown at the wire
(100 real streams read as raw bytes, through the registry's interceptors, metrics on)
and in process (the hub's own streams: the very same object). A stream that is not
read while many changes commit gets them as one message at the newest revision, which
the clients' assemblers and views apply to the right state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from ingestor.revisions import RevisionAssembler
from ingestor.view import ResolverView
from registry import RegistryClient, RegistryServer, convert
from registry.revisions import WholeRevisions
from registry.testing import running_registry
from registry.wire import pb

WATCH = "/polku.v1.PluginRegistry/Watch"
WITHIN = 30.0  # a bound on a failure, never a measure
NOWHERE = "127.0.0.1:9"  # nothing listens: one failed check, one revision per write
QUIET: dict[str, Any] = {"health_interval": 60, "watch_progress_interval": 60}
PROD = {"env": "prod"}
STAGING = {"env": "staging"}


def info(name: str, *sources: str) -> pb.PluginInfo:
    return pb.PluginInfo(
        name=name, version="1.0.0", type=pb.PLUGIN_TYPE_INGESTOR, sources=list(sources or [name])
    )


async def register(
    client: RegistryClient, name: str, *sources: str, labels: dict[str, str] | None = None
) -> str:
    response = await client.register(info(name, *sources), NOWHERE, labels=labels, no_lease=True)
    assert response.accepted, response
    return response.plugin_id


def applied(messages: Iterable[pb.WatchResponse]) -> dict[str, pb.RegisteredPlugin]:
    """What a client holds after these messages (a snapshot first)."""
    plugins: dict[str, pb.RegisteredPlugin] = {}
    for message in messages:
        if message.snapshot:
            plugins.clear()
        for plugin_id in message.removed_plugin_ids:
            plugins.pop(plugin_id, None)
        plugins.update((p.plugin_id, p) for p in message.upserted)
    return plugins


class RawStreams:
    """Watch streams on one channel whose messages are the bytes as sent (no parsing)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._watch = channel.unary_stream(
            WATCH, request_serializer=pb.WatchRequest.SerializeToString, response_deserializer=None
        )
        self.calls: list[Any] = []

    def open(self, count: int, **request: Any) -> list[Any]:
        calls = [self._watch(pb.WatchRequest(**request)) for _ in range(count)]
        self.calls += calls
        return calls

    def close(self) -> None:
        for call in self.calls:
            call.cancel()


@asynccontextmanager
async def raw_streams(address: str) -> AsyncIterator[RawStreams]:
    async with grpc.aio.insecure_channel(address) as channel:
        streams = RawStreams(channel)
        try:
            yield streams
        finally:
            streams.close()


async def next_of(calls: list[Any]) -> list[bytes]:
    """The next message of every stream, as bytes."""
    async with asyncio.timeout(WITHIN):
        messages = await asyncio.gather(*(call.read() for call in calls))
    assert all(isinstance(m, bytes) for m in messages), [type(m) for m in messages]
    return cast(list[bytes], messages)


async def test_a_hundred_watchers_receive_identical_bytes_for_a_change(tmp_path: Path) -> None:
    """At the wire, through the metrics and trust interceptors: Watch's handler keeps
    the pass-through serializer they wrap, and a selector's streams get only theirs."""
    async with (
        running_registry(tmp_path, metrics_listen="127.0.0.1:0", **QUIET) as registry,
        RegistryClient(registry.address) as client,
        raw_streams(registry.address) as streams,
    ):
        before = await register(client, "before", labels=PROD)
        everything = streams.open(100)
        selected = streams.open(10, label_selector="env=prod")
        snapshots = await next_of(everything)
        assert len(set(snapshots)) == 1
        snapshot = pb.WatchResponse.FromString(snapshots[0])
        assert snapshot.snapshot
        assert [p.plugin_id for p in snapshot.upserted] == [before]
        assert len(set(await next_of(selected))) == 1

        staging = await register(client, "staging", labels=STAGING)
        prod = await register(client, "prod", labels=PROD)

        for expected in (staging, prod):
            got = await next_of(everything)
            assert len(set(got)) == 1, "the 100 streams got different bytes for one change"
            message = pb.WatchResponse.FromString(got[0])
            assert [p.plugin_id for p in message.upserted] == [expected]
            assert not message.snapshot
            assert not message.removed_plugin_ids
            # What protobuf itself writes for that message: canonical encoding.
            assert message.SerializeToString() == got[0]

        got = await next_of(selected)
        assert len(set(got)) == 1
        message = pb.WatchResponse.FromString(got[0])
        assert [p.plugin_id for p in message.upserted] == [prod]  # staging never sent

        await client.unregister(before)
        removed = {
            pb.WatchResponse.FromString(m).removed_plugin_ids[0] for m in await next_of(everything)
        }
        assert removed == {before}
        assert registry.metrics is not None


async def hub_streams(
    registry: RegistryServer, count: int, since_revision: int = 0, sources: Iterable[str] = ()
) -> list[AsyncGenerator[bytes, None]]:
    hub = registry._hub
    assert hub is not None
    return [
        cast(AsyncGenerator[bytes, None], hub.stream(since_revision, frozenset(sources)))
        for _ in range(count)
    ]


async def take(streams: list[AsyncGenerator[bytes, None]]) -> list[bytes]:
    async with asyncio.timeout(WITHIN):
        return [await anext(stream) for stream in streams]


async def close(streams: list[AsyncGenerator[bytes, None]]) -> None:
    for stream in streams:
        await stream.aclose()


async def test_the_hub_hands_the_very_same_bytes_object_to_every_watcher(tmp_path: Path) -> None:
    async with (
        running_registry(tmp_path, **QUIET) as registry,
        RegistryClient(registry.address) as client,
    ):
        await register(client, "first")
        streams = await hub_streams(registry, 100)
        try:
            await take(streams)  # the snapshots
            second = await register(client, "second")
            messages = await take(streams)
            assert all(m is messages[0] for m in messages)
            assert [p.plugin_id for p in pb.WatchResponse.FromString(messages[0]).upserted] == [
                second
            ]
            # Resumed with nothing missed: the progress message, shared too.
            revision = registry.state.view.revision
            resumed = await hub_streams(registry, 10, since_revision=revision)
            try:
                progress = await take(resumed)
            finally:
                await close(resumed)
            assert all(m is progress[0] for m in progress)
            assert pb.WatchResponse.FromString(progress[0]) == pb.WatchResponse(revision=revision)
        finally:
            await close(streams)


def source(name: str, alpha: int) -> str:
    """A plugin's own source (a source belongs to one name), in the alpha group or not."""
    return f"alpha-{name}" if alpha else f"beta-{name}"


# What the filtered stream watches: the alpha sources of the plugins below.
ALPHA = frozenset(
    {"alpha-kept", "alpha-gone", "alpha-transient", "alpha-last"}
    | {source(f"new-{i}", 1) for i in range(1, 14, 2)}
)


async def test_a_stream_far_behind_gets_its_changes_coalesced_and_ends_right(
    tmp_path: Path,
) -> None:
    """Not read while 20 changes commit (more than coalesce_after = 64 // 8): one message at
    the newest revision, per filter; then one message per change again. The clients'
    assemblers and views take the revision jump."""
    async with (
        running_registry(tmp_path, watch_max_backlog=64, **QUIET) as registry,
        RegistryClient(registry.address) as client,
    ):
        kept = await register(client, "kept", "alpha-kept")
        gone = await register(client, "gone", "alpha-gone")
        other = await register(client, "other", "beta-other")
        everything, alpha = (
            await hub_streams(registry, 1),
            await hub_streams(registry, 1, 0, ALPHA),
        )
        streams = everything + alpha
        try:
            snapshots = [pb.WatchResponse.FromString(m) for m in await take(streams)]
            start = snapshots[0].revision
            # 20 changes, none of them read: registrations, removals, one of each for
            # the same plugin (sent as removed only), on both sources.
            new = [await register(client, f"new-{i}", source(f"new-{i}", i % 2)) for i in range(14)]
            for plugin_id in (gone, other, new[0], new[1]):
                await client.unregister(plugin_id)
            transient = await register(client, "transient", "alpha-transient")
            await client.unregister(transient)
            latest = registry.state.view.revision
            assert latest == start + 20

            raw = await take(streams)
            coalesced = [pb.WatchResponse.FromString(m) for m in raw]
            assert [m.revision for m in coalesced] == [latest, latest]
            assert not any(m.snapshot for m in coalesced)
            listed = {p.plugin_id: p for p in await client.list_plugins()}
            assert set(applied([snapshots[0], coalesced[0]])) == set(listed) == {kept, *new[2:]}
            assert applied([snapshots[0], coalesced[0]]) == listed
            assert set(coalesced[0].removed_plugin_ids) == {gone, other, new[0], new[1], transient}
            alpha_ids = {i for i, p in listed.items() if ALPHA.intersection(p.info.sources)}
            assert set(applied([snapshots[1], coalesced[1]])) == alpha_ids
            assert set(coalesced[1].removed_plugin_ids) == {gone, new[1], transient}

            # The gateway's assembler and view, and the CLI's whole revisions, take it.
            assembler, whole = RevisionAssembler(), WholeRevisions()
            view = ResolverView()
            for message in (snapshots[0], coalesced[0]):
                assert whole.feed(message)
                for revision in assembler.feed(message):
                    if revision.snapshot:
                        view = ResolverView.snapshot(revision.revision, revision.upserted)
                    else:
                        view = view.apply(revision.revision, revision.upserted, revision.removed)
            assert view.revision == latest
            assert set(view.plugins) == set(listed)
            assert view.sources() == {s for p in listed.values() for s in p.info.sources}

            # A resume that missed as much gets the same message.
            resumed = await hub_streams(registry, 1, since_revision=start)
            try:
                assert await take(resumed) == raw[:1]
            finally:
                await close(resumed)

            # Caught up: one change is one message again.
            last = await register(client, "last", "alpha-last")
            after = [pb.WatchResponse.FromString(m) for m in await take(streams)]
            assert [(m.revision, [p.plugin_id for p in m.upserted]) for m in after] == [
                (latest + 1, [last]),
                (latest + 1, [last]),
            ]
        finally:
            await close(streams)


@pytest.mark.parametrize(
    ("revision", "snapshot", "removed"),
    [(0, False, []), (1, True, []), (300, False, ["a", "é" * 200]), (2**40, True, ["x"])],
)
def test_an_encoded_watch_message_is_what_protobuf_writes(
    revision: int, snapshot: bool, removed: list[str]
) -> None:
    plugins = [
        pb.RegisteredPlugin(plugin_id="p1", address="127.0.0.1:1", revision=revision),
        pb.RegisteredPlugin(plugin_id="p2", labels={"k": "v" * 300}),
    ]
    # The items as MessageCache.encoded frames them: field 1 of a list.
    items = [pb.ListPluginsResponse(plugins=[p]).SerializeToString() for p in plugins]
    encoded = convert.watch_message(revision, items, removed, snapshot=snapshot)
    expected = pb.WatchResponse(
        revision=revision, snapshot=snapshot, upserted=plugins, removed_plugin_ids=removed
    )
    assert encoded == expected.SerializeToString()
    assert (
        convert.watch_message(revision, [], [], snapshot=snapshot)
        == pb.WatchResponse(revision=revision, snapshot=snapshot).SerializeToString()
    )


@pytest.mark.parametrize(
    ("revision", "token"), [(0, ""), (1, "next"), (300, "é" * 200), (2**40, "x")]
)
def test_an_encoded_plugin_list_is_what_protobuf_writes(revision: int, token: str) -> None:
    plugins = [
        pb.RegisteredPlugin(plugin_id="p1", address="127.0.0.1:1", revision=revision),
        pb.RegisteredPlugin(plugin_id="p2", labels={"k": "v" * 300}),
    ]
    items = [pb.ListPluginsResponse(plugins=[p]).SerializeToString() for p in plugins]
    for listed in (plugins, []):
        encoded = convert.plugin_list(items[: len(listed)], revision, token)
        expected = pb.ListPluginsResponse(plugins=listed, revision=revision, next_page_token=token)
        assert encoded == expected.SerializeToString()
