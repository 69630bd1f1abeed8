"""Every bad-input rule of SPEC §2, over the wire, against one registry.

Each bad request must answer INVALID_ARGUMENT with details that start with the
field at fault (``info.name: ...``), an oversized one RESOURCE_EXHAUSTED, and the
registry must keep serving afterwards. The tests share one registry on purpose:
the last ones check that it survived everything before them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry.server import RegistryServer
from registry.testing import running_registry
from registry.wire import pb, pb_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")

INGESTOR = pb.PLUGIN_TYPE_INGESTOR
EMITTER = pb.PLUGIN_TYPE_EMITTER


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RegistryServer]:
    folder: Path = tmp_path_factory.mktemp("bad-input")
    async with running_registry(
        folder, max_message_bytes=1024 * 1024, allow_unix_dirs=("/tmp",)
    ) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(shared_registry: RegistryServer) -> AsyncIterator[pb_grpc.PluginRegistryStub]:
    async with grpc.aio.insecure_channel(shared_registry.address) as channel:
        yield pb_grpc.PluginRegistryStub(channel)


def register(**changes: Any) -> pb.RegisterRequest:
    """A valid RegisterRequest, then ``changes``: info fields by name, or request fields."""
    info = pb.PluginInfo(name="bad-input", type=INGESTOR, sources=["src"])
    request = pb.RegisterRequest(address="127.0.0.1:1")
    for key, value in changes.items():
        target = request if key in ("address", "lease_ttl_seconds", "labels", "no_lease") else info
        if isinstance(value, dict):
            target.ClearField(key)
            getattr(target, key).update(value)
        elif isinstance(value, list):
            target.ClearField(key)
            getattr(target, key).extend(value)
        else:
            setattr(target, key, value)
    request.info.CopyFrom(info)
    return request


def without_info() -> pb.RegisterRequest:
    return pb.RegisterRequest(address="127.0.0.1:1")


Call = Callable[[pb_grpc.PluginRegistryStub], Any]


def reg(request: pb.RegisterRequest) -> Call:
    return lambda stub: stub.Register(request)


async def watch_first(stub: pb_grpc.PluginRegistryStub, request: pb.WatchRequest) -> None:
    """Read a Watch stream's first message (a bad request fails before any)."""
    call = stub.Watch(request)
    try:
        await call.read()
    finally:
        call.cancel()


# (call, field at fault)
INVALID: list[Any] = [
    # info and name
    pytest.param(reg(without_info()), "info", id="missing-info"),
    pytest.param(reg(register(name="")), "info.name", id="empty-name"),
    pytest.param(reg(register(name="my plugin")), "info.name", id="name-with-space"),
    pytest.param(reg(register(name=".hidden")), "info.name", id="name-leading-dot"),
    pytest.param(reg(register(name="-dash")), "info.name", id="name-leading-dash"),
    pytest.param(reg(register(name="a" * 64)), "info.name", id="name-too-long"),
    pytest.param(reg(register(name="tab\tname")), "info.name", id="name-control-char"),
    pytest.param(reg(register(name="nämé")), "info.name", id="name-non-ascii"),
    # address
    pytest.param(reg(register(address="")), "address", id="empty-address"),
    pytest.param(reg(register(address="localhost")), "address", id="address-no-port"),
    pytest.param(reg(register(address="localhost:")), "address", id="address-empty-port"),
    pytest.param(reg(register(address=":50051")), "address", id="address-no-host"),
    pytest.param(reg(register(address="h:0")), "address", id="address-port-0"),
    pytest.param(reg(register(address="h:70000")), "address", id="address-port-70000"),
    pytest.param(reg(register(address="h:65536")), "address", id="address-port-65536"),
    pytest.param(reg(register(address="h:-1")), "address", id="address-port-negative"),
    pytest.param(reg(register(address="host:abc")), "address", id="address-port-abc"),
    pytest.param(reg(register(address="ftp://h:1")), "address", id="address-ftp"),
    pytest.param(reg(register(address="http://h")), "address", id="address-http-no-port"),
    pytest.param(reg(register(address="http://h:1/path")), "address", id="address-with-path"),
    pytest.param(reg(register(address="[::1")), "address", id="address-open-bracket"),
    pytest.param(reg(register(address="[zz]:1")), "address", id="address-bad-v6"),
    pytest.param(reg(register(address="::1:50051")), "address", id="address-v6-unbracketed"),
    pytest.param(reg(register(address="unix:relative")), "address", id="address-unix-relative"),
    pytest.param(reg(register(address="unix:")), "address", id="address-unix-empty"),
    pytest.param(reg(register(address="bad host:1")), "address", id="address-host-space"),
    pytest.param(reg(register(address="h:1\n")), "address", id="address-newline"),
    pytest.param(reg(register(address="h" * 250 + ":50051")), "address", id="address-too-long"),
    # type
    pytest.param(
        reg(register(type=pb.PLUGIN_TYPE_UNSPECIFIED)), "info.type", id="type-unspecified"
    ),
    pytest.param(reg(register(type=99)), "info.type", id="type-99"),
    pytest.param(reg(register(type=-1)), "info.type", id="type-negative"),
    # sources
    pytest.param(reg(register(sources=[])), "info.sources", id="ingestor-without-sources"),
    pytest.param(reg(register(sources=["bad source"])), "info.sources[0]", id="source-space"),
    pytest.param(reg(register(sources=["ok", "/abs"])), "info.sources[1]", id="source-slash"),
    pytest.param(reg(register(sources=["ok", ""])), "info.sources[1]", id="source-empty"),
    pytest.param(reg(register(sources=["s" * 129])), "info.sources[0]", id="source-too-long"),
    pytest.param(
        reg(register(sources=[f"s{i}" for i in range(65)])), "info.sources", id="sources-65"
    ),
    pytest.param(reg(register(sources=["a", "b", "a"])), "info.sources[2]", id="source-duplicate"),
    # emitters
    pytest.param(
        reg(register(type=EMITTER, sources=[], name="")), "info.name", id="emitter-without-names"
    ),
    pytest.param(
        reg(register(type=EMITTER, sources=[], emitter_name="bad name")),
        "info.emitter_name",
        id="emitter-name-malformed",
    ),
    pytest.param(
        reg(register(type=EMITTER, sources=[], emitter_name="e" * 64)),
        "info.emitter_name",
        id="emitter-name-too-long",
    ),
    # strings over their limits
    pytest.param(reg(register(version="v" * 65)), "info.version", id="version-too-long"),
    pytest.param(reg(register(version="1.0\x00")), "info.version", id="version-control-char"),
    pytest.param(
        reg(register(description="d" * 1025)), "info.description", id="description-too-long"
    ),
    pytest.param(
        reg(register(capabilities=[f"c{i}" for i in range(33)])),
        "info.capabilities",
        id="capabilities-33",
    ),
    pytest.param(
        reg(register(capabilities=["c" * 65])), "info.capabilities[0]", id="capability-too-long"
    ),
    pytest.param(
        reg(register(capabilities=["x", ""])), "info.capabilities[1]", id="capability-empty"
    ),
    pytest.param(
        reg(register(capabilities=["x", "x"])), "info.capabilities[1]", id="capability-duplicate"
    ),
    pytest.param(reg(register(labels={"bad key": "v"})), "labels", id="label-key-malformed"),
    pytest.param(reg(register(labels={"": "v"})), "labels", id="label-key-empty"),
    pytest.param(reg(register(labels={"k" * 64: "v"})), "labels", id="label-key-too-long"),
    pytest.param(reg(register(labels={"k": "v" * 257})), "labels[k]", id="label-value-too-long"),
    pytest.param(reg(register(labels={"k": "a\nb"})), "labels[k]", id="label-value-newline"),
    pytest.param(reg(register(labels={f"k{i}": "v" for i in range(33)})), "labels", id="labels-33"),
    # leases
    pytest.param(reg(register(lease_ttl_seconds=3601)), "lease_ttl_seconds", id="ttl-3601"),
    pytest.param(reg(register(lease_ttl_seconds=100000)), "lease_ttl_seconds", id="ttl-100000"),
    pytest.param(
        reg(register(lease_ttl_seconds=2**32 - 1)), "lease_ttl_seconds", id="ttl-uint32-max"
    ),
    pytest.param(
        reg(register(lease_ttl_seconds=10, no_lease=True)),
        "lease_ttl_seconds",
        id="ttl-with-no-lease",
    ),
    # plugin ids
    pytest.param(
        lambda stub: stub.Heartbeat(pb.HeartbeatRequest(plugin_id="")),
        "plugin_id",
        id="heartbeat-empty-id",
    ),
    pytest.param(
        lambda stub: stub.Heartbeat(pb.HeartbeatRequest(plugin_id="x" * 65)),
        "plugin_id",
        id="heartbeat-id-too-long",
    ),
    pytest.param(
        lambda stub: stub.Unregister(pb.UnregisterRequest(plugin_id="")),
        "plugin_id",
        id="unregister-empty-id",
    ),
    pytest.param(
        lambda stub: stub.GetPlugin(pb.GetPluginRequest(plugin_id="")),
        "plugin_id",
        id="get-empty-id",
    ),
    # Resolve and ListPlugins
    pytest.param(lambda stub: stub.Resolve(pb.ResolveRequest()), "target", id="resolve-no-target"),
    pytest.param(
        lambda stub: stub.Resolve(pb.ResolveRequest(source="")), "target", id="resolve-empty-source"
    ),
    pytest.param(
        lambda stub: stub.ListPlugins(pb.ListPluginsRequest(type=99)), "type", id="list-type-99"
    ),
    pytest.param(
        lambda stub: stub.ListPlugins(pb.ListPluginsRequest(statuses=[99])),
        "statuses[0]",
        id="list-status-99",
    ),
    pytest.param(
        lambda stub: stub.ListPlugins(pb.ListPluginsRequest(statuses=[2, 0])),
        "statuses[1]",
        id="list-status-unspecified",
    ),
    pytest.param(
        lambda stub: stub.ListPlugins(pb.ListPluginsRequest(page_token="garbage")),
        "page_token",
        id="list-garbage-token",
    ),
    # Watch
    pytest.param(
        lambda stub: watch_first(stub, pb.WatchRequest(since_revision=-1)),
        "since_revision",
        id="watch-negative-revision",
    ),
    pytest.param(
        lambda stub: watch_first(stub, pb.WatchRequest(sources=["bad source"])),
        "sources[0]",
        id="watch-bad-source",
    ),
]


async def expect_invalid(stub: pb_grpc.PluginRegistryStub, call: Call, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"{field}: "), error.details()
    assert len(error.details()) > len(field) + 2  # and says why


@pytest.mark.parametrize(("call", "field"), INVALID)
async def test_bad_input_is_invalid_argument_naming_the_field(stub, call, field):
    await expect_invalid(stub, call, field)


async def test_a_superscript_port_is_invalid_argument_not_internal(stub):
    """Regression: int('²') raised ValueError, which answered INTERNAL."""
    await expect_invalid(stub, reg(register(address="127.0.0.1:²")), "address")


async def test_a_non_ascii_digit_port_is_invalid_argument(stub):
    """Regression: '127.0.0.1:١٢' was stored as a plugin address."""
    request = register(name="digit-port", sources=["digit-port"], address="127.0.0.1:\u0661\u0662")
    await expect_invalid(stub, reg(request), "address")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:50051",
        "localhost:1",
        "plugin-1.svc.cluster.local:65535",
        "[::1]:50051",
        "http://h:1",
        "https://h:1",
        "https://[::1]:443",
        "unix:/tmp/x.sock",
    ],
)
async def test_accepted_address_forms(stub, address):
    response = await stub.Register(
        register(name="address-forms", sources=["address-forms"], address=address)
    )
    assert response.accepted
    got = await stub.GetPlugin(pb.GetPluginRequest(plugin_id=response.plugin_id))
    assert got.address == address


@pytest.mark.parametrize(
    ("address", "why"),
    [
        # SPEC §6: forms gRPC would read differently, and addresses never dialled.
        ("unix:///var/run/plugin.sock", "unix:/absolute/path"),
        ("[fe80::1]:8080", "address policy"),
        ("unix:/var/run/plugin.sock", "address policy"),
        ("10.0.0.1:80", "address policy"),
    ],
)
async def test_refused_address_forms(stub, address, why):
    request = register(name="address-forms", sources=["address-forms"], address=address)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Register(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("address: ")
    assert why in caught.value.details()


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"name": "a" * 63}, id="name-at-limit"),
        pytest.param({"version": "v" * 64}, id="version-at-limit"),
        pytest.param({"description": "d" * 1024}, id="description-at-limit"),
        pytest.param({"sources": [f"s{i}" for i in range(64)]}, id="64-sources"),
        pytest.param({"labels": {f"k{i}": "v" * 256 for i in range(32)}}, id="32-labels"),
        pytest.param({"lease_ttl_seconds": 3}, id="ttl-min"),
        pytest.param({"lease_ttl_seconds": 3600}, id="ttl-max"),
        pytest.param({"no_lease": True}, id="no-lease"),
        pytest.param({"type": EMITTER, "sources": []}, id="emitter-named-by-its-name"),
        pytest.param({"type": EMITTER, "sources": [], "emitter_name": "out"}, id="emitter-name"),
    ],
)
async def test_values_at_their_limits_are_accepted(stub, request, changes):
    # One plugin name per case, so no case claims another's sources.
    name = f"limits-{request.node.callspec.id}"[:63]
    response = await stub.Register(register(**{"name": name, "sources": [name], **changes}))
    assert response.accepted


async def test_an_oversized_message_is_resource_exhausted(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Register(register(description="d" * (2 * 1024 * 1024)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_registry_still_serves_after_all_of_that(shared_registry, stub):
    response = await stub.Register(register(name="survivor", sources=["survivor"]))
    assert response.accepted
    assert (await stub.Heartbeat(pb.HeartbeatRequest(plugin_id=response.plugin_id))).acknowledged
    listed = await stub.ListPlugins(pb.ListPluginsRequest(name="survivor"))
    assert [p.plugin_id for p in listed.plugins] == [response.plugin_id]
    # Nothing refused was stored: every refused Register above used the name "bad-input".
    everything = await stub.ListPlugins(pb.ListPluginsRequest())
    names = {p.info.name for p in everything.plugins}
    assert "address-forms" in names
    assert "bad-input" not in names
    async with grpc.aio.insecure_channel(shared_registry.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
