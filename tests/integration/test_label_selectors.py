"""label_selector on ListPlugins, Resolve and Watch (SPEC §1.3), against a real registry.

Statuses are set through the in-process state, as the health checker would set them:
the checker is not what is tested here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest

from ingestor import PluginConnectionError, RegistryResolver
from registry import InvalidArgument, PluginStatus, RegistryClient, RegistryServer
from registry.wire import pb, pb_grpc

INGESTOR = pb.PLUGIN_TYPE_INGESTOR
PROD = {"env": "prod", "zone": "a"}
STAGING = {"env": "staging", "zone": "b"}
WITHIN = 10.0


def ingestor(name: str, *sources: str) -> pb.PluginInfo:
    return pb.PluginInfo(name=name, type=INGESTOR, sources=list(sources or [name]))


async def register(
    client: RegistryClient, name: str, port: int, labels: Mapping[str, str], *sources: str
) -> str:
    response = await client.register(ingestor(name, *sources), f"127.0.0.1:{port}", labels=labels)
    assert response.accepted
    return str(response.plugin_id)


async def set_status(registry: RegistryServer, plugin_id: str, status: PluginStatus) -> None:
    plugin = registry.state.catalog.get(plugin_id)
    assert plugin is not None
    await registry.state.update([dataclasses.replace(plugin, status=status)])


class Changes:
    """One Watch stream, read message by message with a deadline; progress skipped."""

    def __init__(self, client: RegistryClient, **request: Any) -> None:
        self._messages: AsyncIterator[pb.WatchResponse] = client.watch(**request)

    async def next(self) -> pb.WatchResponse:
        async with asyncio.timeout(WITHIN):
            while True:
                message = await anext(self._messages)
                if message.snapshot or message.upserted or message.removed_plugin_ids:
                    return message

    async def close(self) -> None:
        await self._messages.aclose()  # type: ignore[attr-defined]


@pytest.fixture
async def stub(registry: RegistryServer) -> AsyncIterator[pb_grpc.PluginRegistryStub]:
    async with grpc.aio.insecure_channel(registry.address) as channel:
        yield pb_grpc.PluginRegistryStub(channel)


# -- ListPlugins ----------------------------------------------------------------


@pytest.mark.parametrize("page_size", [0, 1])
async def test_list_plugins_by_label_selector(client, page_size):
    await register(client, "prod-1", 7101, PROD)
    await register(client, "prod-2", 7102, {"env": "prod", "zone": "b", "canary": "yes"})
    await register(client, "staging-1", 7103, STAGING)
    await register(client, "bare", 7104, {})

    async def names(selector: str, **filters: Any) -> list[str]:
        plugins = await client.list_plugins(label_selector=selector, page_size=page_size, **filters)
        return sorted(p.info.name for p in plugins)

    assert await names("") == ["bare", "prod-1", "prod-2", "staging-1"]
    assert await names("env=prod") == ["prod-1", "prod-2"]
    assert await names("env!=prod") == ["bare", "staging-1"]
    assert await names("zone") == ["prod-1", "prod-2", "staging-1"]
    assert await names("!zone") == ["bare"]
    assert await names("env=prod,!canary") == ["prod-1"]
    assert await names(" zone = b , env ") == ["prod-2", "staging-1"]
    assert await names("env=qa") == []
    # Beside the other filters: all must hold.
    assert await names("env=prod", source="prod-2") == ["prod-2"]
    assert await names("env=prod", name="staging-1") == []


# -- Resolve --------------------------------------------------------------------


async def test_resolve_by_label_selector(registry, client):
    a = await register(client, "shared", 7201, PROD, "logs")
    b = await register(client, "shared", 7202, STAGING, "logs")
    sick = await register(client, "shared", 7203, PROD, "logs")
    for plugin_id, status in ((a, PluginStatus.HEALTHY), (b, PluginStatus.HEALTHY)):
        await set_status(registry, plugin_id, status)
    await set_status(registry, sick, PluginStatus.UNHEALTHY)

    async def resolved(selector: str) -> list[str]:
        response = await client.resolve(source="logs", label_selector=selector)
        return [e.plugin_id for e in response.endpoints]

    assert sorted(await resolved("")) == sorted([a, b])
    # Still routable endpoints only: the UNHEALTHY prod instance is left out.
    assert await resolved("env=prod") == [a]
    assert await resolved("zone!=a") == [b]
    assert await resolved("!env") == []


async def test_resolve_an_emitter_by_label_selector(registry, client):
    info = pb.PluginInfo(name="out", type=pb.PLUGIN_TYPE_EMITTER, emitter_name="sink")
    a = (await client.register(info, "127.0.0.1:7211", labels=PROD)).plugin_id
    b = (await client.register(info, "127.0.0.1:7212", labels=STAGING)).plugin_id
    await set_status(registry, a, PluginStatus.HEALTHY)
    await set_status(registry, b, PluginStatus.HEALTHY)
    response = await client.resolve(emitter_name="sink", label_selector="zone=b")
    assert [e.plugin_id for e in response.endpoints] == [b]


# -- Watch ----------------------------------------------------------------------


async def test_watch_sends_only_what_the_selector_matches(registry, client):
    prod = await register(client, "prod-1", 7301, PROD)
    staging = await register(client, "staging-1", 7302, STAGING)
    changes = Changes(client, label_selector="env=prod")
    try:
        snapshot = await changes.next()
        assert snapshot.snapshot
        assert [p.plugin_id for p in snapshot.upserted] == [prod]

        # A plugin that does not match, then one that does: only the second is sent.
        await register(client, "staging-2", 7303, STAGING)
        later = await register(client, "prod-2", 7304, PROD)
        message = await changes.next()
        assert [p.plugin_id for p in message.upserted] == [later]
        assert list(message.removed_plugin_ids) == []

        # Status changes alike, and removals of plugins it never sent.
        await set_status(registry, staging, PluginStatus.HEALTHY)
        await client.unregister(staging)
        await set_status(registry, prod, PluginStatus.HEALTHY)
        message = await changes.next()
        assert [(p.plugin_id, p.status) for p in message.upserted] == [
            (prod, pb.PLUGIN_STATUS_HEALTHY)
        ]
        await client.unregister(later)
        message = await changes.next()
        assert list(message.removed_plugin_ids) == [later]
        assert list(message.upserted) == []
    finally:
        await changes.close()


async def test_a_label_change_makes_a_plugin_leave_the_selection_as_a_removal(client):
    """Labels change by re-registering at the same (name, address): a new id replaces
    the old in one revision. A watcher whose selector the new labels no longer match
    hears the old id removed, and nothing of the new one."""
    first = await register(client, "mover", 7401, PROD)
    selected = Changes(client, label_selector="env=prod")
    everything = Changes(client)
    try:
        assert [p.plugin_id for p in (await selected.next()).upserted] == [first]
        assert [p.plugin_id for p in (await everything.next()).upserted] == [first]
        before = (await client.get_plugin(first)).revision

        second = await register(client, "mover", 7401, STAGING)
        message = await selected.next()
        assert list(message.removed_plugin_ids) == [first]
        assert list(message.upserted) == []
        assert not message.snapshot
        # The unfiltered watcher sees the same revision as a replacement.
        replaced = await everything.next()
        assert replaced.revision == message.revision
        assert list(replaced.removed_plugin_ids) == [first]
        assert [p.plugin_id for p in replaced.upserted] == [second]

        # Matching again: the new id comes as upserted; the staging id, never sent,
        # is not sent as removed.
        third = await register(client, "mover", 7401, PROD)
        message = await selected.next()
        assert [(p.plugin_id, dict(p.labels)) for p in message.upserted] == [(third, PROD)]
        assert list(message.removed_plugin_ids) == []
    finally:
        await selected.close()
        await everything.close()

    # A watcher resuming from before the change gets the same, from the change log.
    resumed = Changes(client, since_revision=before, label_selector="env=prod")
    try:
        message = await resumed.next()
        assert not message.snapshot
        assert list(message.removed_plugin_ids) == [first]
        message = await resumed.next()
        assert [p.plugin_id for p in message.upserted] == [third]
    finally:
        await resumed.close()


async def test_watch_selector_beside_sources(client):
    await register(client, "a", 7501, PROD)
    b_prod = await register(client, "b", 7502, PROD)
    await register(client, "b", 7503, STAGING)
    changes = Changes(client, sources=["b"], label_selector="zone=a")
    try:
        snapshot = await changes.next()
        assert [p.plugin_id for p in snapshot.upserted] == [b_prod]
    finally:
        await changes.close()


async def test_the_resolver_follows_only_what_its_selector_matches(registry, client):
    prod = await register(client, "shared", 7601, PROD, "logs")
    staging = await register(client, "shared", 7602, STAGING, "logs")
    await set_status(registry, prod, PluginStatus.HEALTHY)
    await set_status(registry, staging, PluginStatus.HEALTHY)
    async with RegistryResolver(registry.address, label_selector="env=prod") as resolver:
        view = await resolver.wait_for_async(lambda v: bool(v.endpoints("logs")), WITHIN)
        assert set(view.plugins) == {prod}
        assert [e.plugin_id for e in resolver.resolve("logs")] == [prod]

        # Relabelled out of the selection: the resolver drops it.
        await register(client, "shared", 7601, STAGING, "logs")
        await resolver.wait_for_async(lambda v: prod not in v.plugins, WITHIN)
        with pytest.raises(PluginConnectionError, match="no registered plugin declares"):
            resolver.resolve("logs")


# -- bad syntax -----------------------------------------------------------------

BAD = ["a b", "env=prod,", "!a=1", "a!b", "=x"]


@pytest.mark.parametrize("selector", BAD)
async def test_bad_syntax_is_invalid_argument_over_the_wire(stub, selector):
    calls = [
        stub.ListPlugins(pb.ListPluginsRequest(label_selector=selector)),
        stub.Resolve(pb.ResolveRequest(source="logs", label_selector=selector)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith("label_selector: ")

    stream = stub.Watch(pb.WatchRequest(label_selector=selector))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(WITHIN):
            await stream.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("label_selector: ")


async def test_the_client_raises_invalid_argument_naming_label_selector(client):
    with pytest.raises(InvalidArgument) as caught:
        await client.list_plugins(label_selector="a b")
    assert caught.value.field == "label_selector"
    with pytest.raises(InvalidArgument) as caught:
        await client.resolve(source="x", label_selector="!")
    assert caught.value.field == "label_selector"
    with pytest.raises(InvalidArgument) as caught:
        await Changes(client, label_selector="a,,b").next()
    assert caught.value.field == "label_selector"


async def test_a_resolver_with_a_bad_selector_says_why_it_is_not_synced(registry, wait_for):
    async with RegistryResolver(registry.address, label_selector="a b") as resolver:

        def reason() -> str:
            try:
                resolver.current_view()
            except PluginConnectionError as exc:
                return str(exc)
            return ""

        message = await wait_for(lambda: "label_selector" in reason() and reason())
        assert "no view of registry" in str(message)
        assert not resolver.synced
