"""The PluginRegistry service over the wire: SPEC §1.2 and §2.

The first group is ported from the upstream POLKU gateway's discovery tests; the rest
covers this project's rules. Some tests use the generated stub on a grpc.aio channel,
others the RegistryClient; a few set a status through the in-process state, because
the health checker that would do so is not part of what is tested here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from registry import (
    AlreadyExists,
    NotFound,
    PluginStatus,
    RegistryClient,
    RegistryServer,
)
from registry.model import Change
from registry.testing import FakePlugin
from registry.ulid import ULID_PATTERN
from registry.wire import pb, pb_grpc

INGESTOR = pb.PLUGIN_TYPE_INGESTOR
EMITTER = pb.PLUGIN_TYPE_EMITTER
SERVICE = "polku.v1.PluginRegistry"


def ingestor(name: str, *sources: str, **fields: Any) -> pb.PluginInfo:
    return pb.PluginInfo(name=name, type=INGESTOR, sources=list(sources or [name]), **fields)


def emitter(name: str, emitter_name: str = "", **fields: Any) -> pb.PluginInfo:
    return pb.PluginInfo(name=name, type=EMITTER, emitter_name=emitter_name, **fields)


@pytest.fixture
async def stub(registry: RegistryServer) -> AsyncIterator[pb_grpc.PluginRegistryStub]:
    async with grpc.aio.insecure_channel(registry.address) as channel:
        yield pb_grpc.PluginRegistryStub(channel)


async def revision(client: RegistryClient) -> int:
    response = await client.stub.ListPlugins(pb.ListPluginsRequest(page_size=1))
    return int(response.revision)


async def set_status(registry: RegistryServer, plugin_id: str, status: PluginStatus) -> None:
    """Change a status as the health checker or the lease reaper would."""
    plugin = registry.state.catalog.get(plugin_id)
    assert plugin is not None
    await registry.state.update([dataclasses.replace(plugin, status=status)])


# -- ported from the upstream gateway's discovery tests -----------------------


async def test_unreachable_plugin_is_accepted_and_heartbeats(stub):
    response = await stub.Register(
        pb.RegisterRequest(info=ingestor("far-away"), address="127.0.0.1:1")
    )
    assert response.accepted
    assert response.plugin_id
    assert ULID_PATTERN.match(response.plugin_id)
    beat = await stub.Heartbeat(pb.HeartbeatRequest(plugin_id=response.plugin_id))
    assert beat.acknowledged
    plugin = await stub.GetPlugin(pb.GetPluginRequest(plugin_id=response.plugin_id))
    assert plugin.status == pb.PLUGIN_STATUS_UNKNOWN


async def test_twenty_concurrent_registrations_get_distinct_ids(stub):
    responses = await asyncio.gather(
        *(
            stub.Register(
                pb.RegisterRequest(
                    info=ingestor(f"concurrent-{i}"), address=f"127.0.0.1:{9000 + i}"
                )
            )
            for i in range(20)
        )
    )
    assert all(r.accepted for r in responses)
    ids = {r.plugin_id for r in responses}
    assert len(ids) == 20
    assert "" not in ids
    listed = await stub.ListPlugins(pb.ListPluginsRequest())
    assert {p.plugin_id for p in listed.plugins} == ids


async def test_reregistering_on_a_new_address_gives_a_new_id(client):
    first = await client.register(ingestor("mover"), "127.0.0.1:7001")
    second = await client.register(ingestor("mover"), "127.0.0.1:7002")
    assert second.accepted
    assert second.plugin_id != first.plugin_id


async def test_heartbeat_of_an_unknown_id_then_reregister(client):
    assert not await client.heartbeat("01ARZ3NDEKTSV4RRFFQ69G5FAV")
    first = await client.register(ingestor("comeback"), "127.0.0.1:7003")
    again = await client.register(ingestor("comeback"), "127.0.0.1:7003")
    assert again.plugin_id != first.plugin_id
    assert not await client.heartbeat(first.plugin_id)
    assert await client.heartbeat(again.plugin_id)


async def test_two_hundred_heartbeats_in_a_row_are_acknowledged(client):
    plugin_id = (await client.register(ingestor("steady"), "127.0.0.1:7004")).plugin_id
    acks = [await client.heartbeat(plugin_id) for _ in range(200)]
    assert acks == [True] * 200


async def test_heartbeat_after_unregister_is_not_acknowledged(stub):
    registered = await stub.Register(pb.RegisterRequest(info=ingestor("gone"), address="h:1"))
    await stub.Unregister(pb.UnregisterRequest(plugin_id=registered.plugin_id))
    beat = await stub.Heartbeat(pb.HeartbeatRequest(plugin_id=registered.plugin_id))
    assert not beat.acknowledged


async def test_double_unregister_succeeds_twice(client):
    plugin_id = (await client.register(ingestor("twice"), "127.0.0.1:7005")).plugin_id
    await client.unregister(plugin_id)
    after_first = await revision(client)
    await client.unregister(plugin_id)
    assert await revision(client) == after_first  # the second one changed nothing
    with pytest.raises(NotFound):
        await client.get_plugin(plugin_id)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(
            pb.RegisterRequest(
                info=pb.PluginInfo(name="x", type=pb.PLUGIN_TYPE_UNSPECIFIED, sources=["x"]),
                address="h:1",
            ),
            "info.type",
            id="type-unspecified",
        ),
        pytest.param(pb.RegisterRequest(address="h:1"), "info", id="missing-info"),
        pytest.param(
            pb.RegisterRequest(info=ingestor("", "x"), address="h:1"), "info.name", id="empty-name"
        ),
        pytest.param(
            pb.RegisterRequest(info=ingestor("x"), address=""), "address", id="empty-address"
        ),
        pytest.param(
            pb.RegisterRequest(info=pb.PluginInfo(name="x", type=INGESTOR), address="h:1"),
            "info.sources",
            id="ingestor-without-sources",
        ),
    ],
)
async def test_upstream_invalid_registrations(stub, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Register(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")


# -- replacement, replicas and ownership --------------------------------------


async def test_same_name_and_address_replaces_in_one_revision(registry, client):
    changes: list[Change] = []
    registry.state.subscribe(changes.extend)
    old = await client.register(ingestor("svc"), "127.0.0.1:7100")
    before = await revision(client)
    new = await client.register(ingestor("svc", version="2"), "127.0.0.1:7100")

    assert new.plugin_id != old.plugin_id
    assert await revision(client) == before + 1
    last = changes[-1]
    assert last.revision == before + 1
    assert [p.plugin_id for p in last.upserted] == [new.plugin_id]
    assert last.removed_ids == [old.plugin_id]

    assert not await client.heartbeat(old.plugin_id)
    assert await client.heartbeat(new.plugin_id)
    with pytest.raises(NotFound):
        await client.get_plugin(old.plugin_id)
    listed = await client.list_plugins()
    assert [p.plugin_id for p in listed] == [new.plugin_id]
    assert listed[0].info.version == "2"


async def test_same_name_on_another_address_is_a_replica(registry, client):
    first = await client.register(ingestor("rep", "logs"), "127.0.0.1:7201")
    second = await client.register(ingestor("rep", "logs"), "127.0.0.1:7202")
    for plugin_id in (first.plugin_id, second.plugin_id):
        await set_status(registry, plugin_id, PluginStatus.HEALTHY)
    listed = await client.list_plugins(name="rep")
    assert {p.plugin_id for p in listed} == {first.plugin_id, second.plugin_id}
    resolved = await client.resolve(source="logs")
    assert {(e.plugin_id, e.address) for e in resolved.endpoints} == {
        (first.plugin_id, "127.0.0.1:7201"),
        (second.plugin_id, "127.0.0.1:7202"),
    }
    assert await client.heartbeat(first.plugin_id)
    assert await client.heartbeat(second.plugin_id)


async def test_a_source_of_a_live_owner_cannot_be_claimed(registry, client):
    owner = await client.register(ingestor("owner", "k8s", "syslog"), "127.0.0.1:7301")
    before = await revision(client)
    with pytest.raises(AlreadyExists) as caught:
        await client.register(ingestor("thief", "other", "syslog"), "127.0.0.1:7302")
    assert "'owner'" in str(caught.value)
    assert "syslog" in str(caught.value)
    assert await revision(client) == before
    assert await client.list_plugins(name="thief") == []

    # Once the owner's lease lapses the source is free again.
    await set_status(registry, owner.plugin_id, PluginStatus.EXPIRED)
    claimed = await client.register(ingestor("thief", "other", "syslog"), "127.0.0.1:7302")
    assert claimed.accepted


async def test_a_source_is_free_after_its_owner_unregisters(client):
    owner = await client.register(ingestor("first-owner", "audit"), "127.0.0.1:7303")
    with pytest.raises(AlreadyExists):
        await client.register(ingestor("second-owner", "audit"), "127.0.0.1:7304")
    await client.unregister(owner.plugin_id)
    assert (await client.register(ingestor("second-owner", "audit"), "127.0.0.1:7304")).accepted


async def test_the_already_exists_status_names_the_owner(stub):
    await stub.Register(pb.RegisterRequest(info=ingestor("holder", "metrics"), address="h:1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Register(pb.RegisterRequest(info=ingestor("claimer", "metrics"), address="h:2"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'holder'" in caught.value.details()


async def test_an_emitter_name_of_a_live_owner_cannot_be_claimed(client):
    await client.register(emitter("kafka-out", "kafka"), "127.0.0.1:7401")
    with pytest.raises(AlreadyExists) as caught:
        await client.register(emitter("other-out", "kafka"), "127.0.0.1:7402")
    assert "'kafka-out'" in str(caught.value)
    # A replica of the owner may use it.
    assert (await client.register(emitter("kafka-out", "kafka"), "127.0.0.1:7403")).accepted


async def test_an_emitter_without_emitter_name_is_owned_by_its_plugin_name(client):
    await client.register(emitter("stdout"), "127.0.0.1:7501")
    with pytest.raises(AlreadyExists) as caught:
        await client.register(emitter("printer", "stdout"), "127.0.0.1:7502")
    assert "'stdout'" in str(caught.value)


# -- Resolve ------------------------------------------------------------------


async def test_resolve_by_source(registry, client):
    live = await client.register(ingestor("res", "alpha", "beta"), "127.0.0.1:7601")
    gone = await client.register(ingestor("res", "alpha"), "127.0.0.1:7602")
    await client.register(ingestor("unrelated", "gamma"), "127.0.0.1:7603")
    await set_status(registry, live.plugin_id, PluginStatus.HEALTHY)
    await set_status(registry, gone.plugin_id, PluginStatus.EXPIRED)

    for source in ("alpha", "beta"):
        response = await client.resolve(source=source)
        assert [(e.plugin_id, e.address, e.status) for e in response.endpoints] == [
            (live.plugin_id, "127.0.0.1:7601", pb.PLUGIN_STATUS_HEALTHY)
        ]
        assert response.revision == await revision(client)
    assert list((await client.resolve(source="nobody")).endpoints) == []


async def test_resolve_by_emitter_name(registry, stub):
    named = await stub.Register(
        pb.RegisterRequest(info=emitter("es-writer", "elastic"), address="http://es:9200")
    )
    plain = await stub.Register(pb.RegisterRequest(info=emitter("stdout"), address="h:2"))
    await set_status(registry, named.plugin_id, PluginStatus.HEALTHY)
    await set_status(registry, plain.plugin_id, PluginStatus.HEALTHY)

    response = await stub.Resolve(pb.ResolveRequest(emitter_name="elastic"))
    assert [(e.plugin_id, e.address) for e in response.endpoints] == [
        (named.plugin_id, "http://es:9200")
    ]
    response = await stub.Resolve(pb.ResolveRequest(emitter_name="stdout"))
    assert [e.plugin_id for e in response.endpoints] == [plain.plugin_id]
    # An emitter is found by its emitter name, not its plugin name, when it has one.
    assert list((await stub.Resolve(pb.ResolveRequest(emitter_name="es-writer"))).endpoints) == []
    # Emitter names and sources are separate name spaces.
    assert list((await stub.Resolve(pb.ResolveRequest(source="elastic"))).endpoints) == []


async def test_resolve_returns_only_routable_endpoints(registry, client):
    """SPEC: Resolve gives the routable endpoints, and routable = HEALTHY."""
    healthy = await client.register(ingestor("mixed", "delta"), "127.0.0.1:7701")
    sick = await client.register(ingestor("mixed", "delta"), "127.0.0.1:7702")
    await client.register(ingestor("mixed", "delta"), "127.0.0.1:7703")  # stays UNKNOWN
    await set_status(registry, healthy.plugin_id, PluginStatus.HEALTHY)
    await set_status(registry, sick.plugin_id, PluginStatus.UNHEALTHY)
    response = await client.resolve(source="delta")
    assert [e.plugin_id for e in response.endpoints] == [healthy.plugin_id]


# -- ListPlugins and GetPlugin ------------------------------------------------


async def test_list_plugins_filters(registry, client):
    a = await client.register(ingestor("lister-a", "src-1", "src-2"), "127.0.0.1:7801")
    b = await client.register(ingestor("lister-b", "src-3"), "127.0.0.1:7802")
    c = await client.register(emitter("lister-c"), "127.0.0.1:7803")
    d = await client.register(ingestor("lister-a", "src-1", "src-2"), "127.0.0.1:7804")
    await set_status(registry, b.plugin_id, PluginStatus.HEALTHY)
    await set_status(registry, c.plugin_id, PluginStatus.UNHEALTHY)

    async def ids(**filters: Any) -> set[str]:
        return {p.plugin_id for p in await client.list_plugins(**filters)}

    everyone = {a.plugin_id, b.plugin_id, c.plugin_id, d.plugin_id}
    assert await ids() == everyone
    assert await ids(type=INGESTOR) == {a.plugin_id, b.plugin_id, d.plugin_id}
    assert await ids(type=EMITTER) == {c.plugin_id}
    assert await ids(source="src-1") == {a.plugin_id, d.plugin_id}
    assert await ids(source="src-2") == {a.plugin_id, d.plugin_id}
    assert await ids(source="src-3") == {b.plugin_id}
    assert await ids(source="nowhere") == set()
    assert await ids(statuses=[pb.PLUGIN_STATUS_HEALTHY]) == {b.plugin_id}
    assert await ids(statuses=[pb.PLUGIN_STATUS_HEALTHY, pb.PLUGIN_STATUS_UNHEALTHY]) == {
        b.plugin_id,
        c.plugin_id,
    }
    assert await ids(statuses=[pb.PLUGIN_STATUS_UNKNOWN]) == {a.plugin_id, d.plugin_id}
    assert await ids(name="lister-a") == {a.plugin_id, d.plugin_id}
    assert await ids(name="lister-a", source="src-2", type=INGESTOR) == {a.plugin_id, d.plugin_id}
    assert await ids(name="lister-a", statuses=[pb.PLUGIN_STATUS_HEALTHY]) == set()
    assert await ids(name="lister-b", type=EMITTER) == set()


@pytest.mark.parametrize(("count", "page_size"), [(25, 7), (25, 5), (3, 0)])
async def test_list_plugins_pages_without_duplicates_or_gaps(stub, count, page_size):
    registered = await asyncio.gather(
        *(
            stub.Register(
                pb.RegisterRequest(info=ingestor(f"paged-{i:02}"), address=f"127.0.0.1:{8000 + i}")
            )
            for i in range(count)
        )
    )
    seen: list[str] = []
    pages: list[int] = []
    request = pb.ListPluginsRequest(page_size=page_size)
    while True:
        response = await stub.ListPlugins(request)
        pages.append(len(response.plugins))
        seen.extend(p.plugin_id for p in response.plugins)
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    assert len(seen) == len(set(seen)) == count
    assert set(seen) == {r.plugin_id for r in registered}
    size = page_size or count
    assert pages == [size] * (count // size) + ([count % size] if count % size else [])


async def test_list_plugins_rejects_a_garbage_page_token(stub):
    for token in ("garbage", "!!!", "YWZ0ZXI"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListPlugins(pb.ListPluginsRequest(page_token=token))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("page_token: ")


async def test_get_plugin_of_an_unknown_id_is_not_found(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPlugin(pb.GetPluginRequest(plugin_id="01ARZ3NDEKTSV4RRFFQ69G5FAV"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_plugin_returns_what_was_registered(client):
    info = ingestor(
        "full",
        "s1",
        "s2",
        version="1.2.3",
        description="all fields",
        capabilities=["batch", "gzip"],
    )
    response = await client.register(
        info,
        "https://full.example:8443",
        lease_ttl_seconds=12,
        labels={"zone": "eu-1", "tier": "x"},
    )
    plugin = await client.get_plugin(response.plugin_id)
    assert plugin.plugin_id == response.plugin_id
    assert plugin.info == info
    assert plugin.address == "https://full.example:8443"
    assert plugin.status == pb.PLUGIN_STATUS_UNKNOWN
    assert plugin.lease_ttl_seconds == 12
    assert dict(plugin.labels) == {"zone": "eu-1", "tier": "x"}
    assert plugin.HasField("registered_at")
    assert plugin.last_heartbeat_at == plugin.registered_at
    assert plugin.revision == await revision(client)
    [listed] = await client.list_plugins(name="full")
    for message in (listed, plugin):  # the health checker may have run in between
        message.ClearField("last_check_at")
        message.ClearField("last_error")
    assert listed == plugin


# -- leases and labels --------------------------------------------------------


async def test_lease_zero_takes_the_default(client):
    response = await client.register(ingestor("defaulted"), "127.0.0.1:7901")
    assert response.lease_ttl_seconds == 30
    assert response.heartbeat_interval_seconds == 10
    assert (await client.get_plugin(response.plugin_id)).lease_ttl_seconds == 30


async def test_a_requested_lease_is_granted(client):
    response = await client.register(ingestor("leased"), "127.0.0.1:7902", lease_ttl_seconds=9)
    assert response.lease_ttl_seconds == 9
    assert response.heartbeat_interval_seconds == 3


async def test_no_lease(client):
    response = await client.register(ingestor("operator-made"), "127.0.0.1:7903", no_lease=True)
    assert response.accepted
    assert response.lease_ttl_seconds == 0
    assert response.heartbeat_interval_seconds == 0
    plugin = await client.get_plugin(response.plugin_id)
    assert plugin.lease_ttl_seconds == 0
    assert not plugin.HasField("last_heartbeat_at")


async def test_labels_are_stored_and_returned(client):
    labels = {"team": "edge", "k8s.io/zone": "eu-north-1a", "empty": ""}
    response = await client.register(ingestor("labelled"), "127.0.0.1:7904", labels=labels)
    assert dict((await client.get_plugin(response.plugin_id)).labels) == labels
    [listed] = await client.list_plugins(name="labelled")
    assert dict(listed.labels) == labels


# -- revisions ----------------------------------------------------------------


async def test_revision_moves_with_changes_not_with_heartbeats(registry, client):
    start = await revision(client)
    first = await client.register(ingestor("rev-a"), "127.0.0.1:7951")
    assert await revision(client) == start + 1
    assert (await client.get_plugin(first.plugin_id)).revision == start + 1
    second = await client.register(ingestor("rev-b"), "127.0.0.1:7952")
    assert await revision(client) == start + 2

    for _ in range(5):
        assert await client.heartbeat(first.plugin_id)
    assert await revision(client) == start + 2
    assert (await client.get_plugin(first.plugin_id)).revision == start + 1

    await set_status(registry, second.plugin_id, PluginStatus.HEALTHY)
    assert await revision(client) == start + 3
    assert (await client.get_plugin(second.plugin_id)).revision == start + 3

    await client.unregister(first.plugin_id)
    assert await revision(client) == start + 4
    with pytest.raises(AlreadyExists):
        await client.register(ingestor("rev-c", "rev-b"), "127.0.0.1:7953")
    assert await revision(client) == start + 4  # a refused registration changes nothing


# -- the registry's own health and reflection ---------------------------------


@pytest.mark.parametrize("service", ["", SERVICE])
async def test_health_check_is_serving(registry, service):
    async with grpc.aio.insecure_channel(registry.address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service)
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_registry(registry):
    async with grpc.aio.insecure_channel(registry.address) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await call.read()
        await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


async def test_reflection_describes_the_registry_like_grpcurl(registry):
    """What grpcurl does: list the services, then resolve the registry's descriptor."""

    def describe() -> tuple[list[str], list[str]]:
        # The reflection database is synchronous: it runs on its own thread and channel.
        with grpc.insecure_channel(registry.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            service = DescriptorPool(database).FindServiceByName(SERVICE)
            return list(database.get_services()), [m.name for m in service.methods]

    services, methods = await asyncio.to_thread(describe)
    assert SERVICE in services
    assert set(methods) >= {
        "Register",
        "Heartbeat",
        "Unregister",
        "ListPlugins",
        "GetPlugin",
        "Resolve",
        "Watch",
    }


async def test_a_live_plugin_becomes_healthy_and_resolvable(client, wait_for):
    """With a real plugin behind the address, no status has to be set by hand."""
    async with FakePlugin(name="real", sources=["real-src"]) as plugin:
        response = await client.register(plugin.info(), plugin.address)

        async def healthy() -> bool:
            found = await client.get_plugin(response.plugin_id)
            return found.status == pb.PLUGIN_STATUS_HEALTHY

        await wait_for(healthy)
        resolved = await client.resolve(source="real-src")
        assert [(e.plugin_id, e.address) for e in resolved.endpoints] == [
            (response.plugin_id, plugin.address)
        ]
        assert plugin.health_calls >= 1


# -- large but valid registrations ----------------------------------------------

GRPC_DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024


async def register_large(client: RegistryClient, count: int) -> set[str]:
    """Registrations with every field at its limit (about 20 kB each on the wire)."""

    def info(i: int) -> pb.PluginInfo:
        return pb.PluginInfo(
            name=f"large-{i}",
            type=INGESTOR,
            version="v" * 64,
            description="d" * 1024,
            sources=[f"l{i}-{j:02}-" + "s" * 110 for j in range(64)],
            capabilities=[f"c{j:02}-" + "c" * 60 for j in range(32)],
        )

    labels = {f"k{j:02}": "v" * 256 for j in range(32)}
    responses = await asyncio.gather(
        *(client.register(info(i), f"127.0.0.1:{6000 + i}", labels=labels) for i in range(count))
    )
    size = (await client.get_plugin(responses[0].plugin_id)).ByteSize()
    assert size * count > GRPC_DEFAULT_MAX_RECEIVE  # together they exceed one message
    return {r.plugin_id for r in responses}


async def test_large_registrations_can_all_be_listed(client):
    """Regression: a page was bounded by count only and passed the 4 MiB default limit."""
    ids = await register_large(client, 230)
    listed = await client.list_plugins()
    assert {p.plugin_id for p in listed} == ids


async def test_large_registrations_can_be_watched(client):
    """Regression: the snapshot was one message past the 4 MiB default limit."""
    ids = await register_large(client, 230)
    seen: set[str] = set()
    async with asyncio.timeout(60):
        async for message in client.watch():
            seen.update(p.plugin_id for p in message.upserted)
            if seen >= ids:
                break
    assert seen >= ids
