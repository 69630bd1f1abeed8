"""Bytes that do not decode answer INVALID_ARGUMENT naming the request type (SPEC §7).

Raw calls (no serializer) send crafted bytes to every method of PluginRegistry on a
real registry: invalid UTF-8 in a string field (also nested and in a map key),
truncated varints, a length beyond the end, wire types 6 and 7, an end-group with no
start, groups nested past protobuf's recursion limit. Each must answer
INVALID_ARGUMENT ``request: cannot be decoded as <type> (...)`` — without the guard,
grpc 1.85 answers UNKNOWN with the exception's text and logs a traceback. The log gets
no traceback and at most one line per peer host a minute.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection_pb2
from trust_helpers import Who, write_policy

from registry.server import RegistryServer
from registry.testing import running_registry
from registry.trust.auth import AuthInterceptor, CallerLimits, parse_peer
from registry.trust.decoding import DecodingGuard
from registry.wire import pb, pb_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVICE = pb.DESCRIPTOR.services_by_name["PluginRegistry"]
METHODS: list[MethodDescriptor] = list(SERVICE.methods)
DECODING_LOG = "registry.trust.decoding"

# -- crafting bytes ---------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def nest(path: Sequence[FieldDescriptor], payload: bytes) -> bytes:
    """``payload`` as the value of the last field of ``path``, wrapped in the others."""
    for field in reversed(path):
        payload = tag(field.number, 2) + varint(len(payload)) + payload
    return payload


def string_path(message: Descriptor, depth: int = 0) -> list[FieldDescriptor] | None:
    """Fields leading to a string field (through message fields and map entries)."""
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return [field]
    if depth < 3:
        for field in message.fields:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                inner = string_path(field.message_type, depth + 1)
                if inner is not None:
                    return [field, *inner]
    return None


def invalid_utf8(message: Descriptor) -> bytes | None:
    path = string_path(message)
    return nest(path, b"ok\xff\xfe") if path is not None else None


def valid_prefix(message: Descriptor) -> bytes:
    """A well-formed start: a valid string field, if the message has one."""
    path = string_path(message)
    return nest(path, b"fine") if path is not None else b""


# Field 15 is unused by every request, so these fail on framing alone.
CASES: dict[str, Callable[[Descriptor], bytes | None]] = {
    "invalid-utf8": invalid_utf8,
    "truncated-varint": lambda m: valid_prefix(m) + tag(15, 0) + b"\xff",
    "truncated-10-byte-varint": lambda m: tag(15, 0) + b"\xff" * 11,
    "length-beyond-end": lambda m: valid_prefix(m) + tag(15, 2) + varint(1000) + b"abc",
    "wire-type-6": lambda m: tag(15, 6) + b"\x00",
    "wire-type-7": lambda m: valid_prefix(m) + tag(15, 7),
    "end-group-without-start": lambda m: tag(15, 4),
    "field-number-0": lambda m: b"\x00\x00",
    "groups-nested-200-deep": lambda m: tag(15, 3) * 200 + tag(15, 4) * 200,
    "unterminated-groups": lambda m: tag(15, 3) * 1000,
}


def _params() -> list[Any]:
    params = []
    for method in METHODS:
        for case, craft in CASES.items():
            raw = craft(method.input_type)
            # protobuf (upb) reads a zero tag as the end of a message with no fields at
            # all (Empty, GetStatus's request): there is nothing such bytes could set.
            if case == "field-number-0" and not method.input_type.fields:
                continue
            if raw is not None:
                params.append(pytest.param(method, raw, id=f"{method.name}-{case}"))
    return params


PARAMS = _params()


async def test_the_crafted_bytes_really_do_not_decode():
    """The test's own premise: each crafted message fails to parse, for the right type."""
    assert {p.values[0].name for p in PARAMS} == {m.name for m in METHODS}
    for param in PARAMS:
        method, raw = param.values
        with pytest.raises(DecodeError):
            GetMessageClass(method.input_type).FromString(raw)
    register = SERVICE.methods_by_name["Register"].input_type
    # Nested (info.name) and map-key cases, besides the first string field.
    info_name = [register.fields_by_name["info"], pb.PluginInfo.DESCRIPTOR.fields_by_name["name"]]
    with pytest.raises(DecodeError, match="UTF-8"):
        pb.RegisterRequest.FromString(nest(info_name, b"\xc3\x28"))
    labels = register.fields_by_name["labels"]
    with pytest.raises(DecodeError, match="UTF-8"):
        pb.RegisterRequest.FromString(nest([labels], tag(1, 2) + b"\x01\xff"))


# -- calling ----------------------------------------------------------------------------


async def raw_call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    raw: bytes,
    metadata: Sequence[tuple[str, str]] = (),
    *,
    service: str = SERVICE.full_name,
) -> tuple[grpc.StatusCode, str]:
    """Send ``raw`` as the request (a stream's only one); the first answer's status."""
    path = f"/{service}/{method.name}"
    kwargs: dict[str, Any] = {"metadata": tuple(metadata), "timeout": 10}
    try:
        if method.client_streaming:
            if method.server_streaming:
                call = channel.stream_stream(path)(iter([raw]), **kwargs)
                try:
                    await call.read()
                finally:
                    call.cancel()
            else:
                await channel.stream_unary(path)(iter([raw]), **kwargs)
        elif method.server_streaming:
            call = channel.unary_stream(path)(raw, **kwargs)
            try:
                await call.read()  # the first message, or the error
            finally:
                call.cancel()
        else:
            await channel.unary_unary(path)(raw, **kwargs)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def assert_undecodable(answer: tuple[grpc.StatusCode, str], message_type: str) -> None:
    code, details = answer
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith(f"request: cannot be decoded as {message_type} ("), details
    assert details.endswith(")")
    assert "\\x" not in details  # never the caller's bytes
    assert "\ufffd" not in details


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert [r for r in caplog.records if r.exc_info] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def decoding_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == DECODING_LOG]


# -- one open registry for the per-method cases ---------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RegistryServer]:
    async with running_registry(tmp_path_factory.mktemp("undecodable")) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel(shared_registry: RegistryServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(shared_registry.address) as opened:
        yield opened


@pytest.mark.parametrize(("method", "raw"), PARAMS)
async def test_undecodable_bytes_are_invalid_argument_naming_the_request(
    channel, caplog, method, raw
):
    assert_undecodable(await raw_call(channel, method, raw), method.input_type.full_name)
    assert_no_traceback(caplog)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            nest(
                [
                    pb.RegisterRequest.DESCRIPTOR.fields_by_name["info"],
                    pb.PluginInfo.DESCRIPTOR.fields_by_name["name"],
                ],
                b"\xc3\x28",
            ),
            id="nested-string",
        ),
        pytest.param(
            nest([pb.RegisterRequest.DESCRIPTOR.fields_by_name["labels"]], tag(1, 2) + b"\x01\xff"),
            id="map-key",
        ),
        pytest.param(
            nest([pb.RegisterRequest.DESCRIPTOR.fields_by_name["info"]], tag(5, 2) + b"\x7fab"),
            id="nested-length-beyond-end",
        ),
    ],
)
async def test_register_with_nested_garbage(channel, caplog, raw):
    register = SERVICE.methods_by_name["Register"]
    answer = await raw_call(channel, register, raw)
    assert_undecodable(answer, "polku.v1.RegisterRequest")
    if b"\xff" in raw or b"\xc3" in raw:
        assert "UTF-8" in answer[1]
    assert_no_traceback(caplog)


async def test_a_stream_of_requests_is_checked_request_by_request(channel, caplog):
    """Reflection is a stream of requests: a good one is answered, then a bad one refused."""
    path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    call = channel.stream_stream(path)(iter([good, b"\x0a\x02\xff\xfe"]), timeout=10)
    first = reflection_pb2.ServerReflectionResponse.FromString(await call.read())
    assert SERVICE.full_name in {s.name for s in first.list_services_response.service}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert_undecodable(
        (caught.value.code(), caught.value.details() or ""),
        "grpc.reflection.v1alpha.ServerReflectionRequest",
    )
    assert_no_traceback(caplog)


async def test_health_is_guarded_too(channel, caplog):
    answer = await raw_call(
        channel,
        health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"],
        b"\x0a\x02\xff\xfe",
        service="grpc.health.v1.Health",
    )
    assert_undecodable(answer, "grpc.health.v1.HealthCheckRequest")
    assert_no_traceback(caplog)


async def test_the_registry_keeps_serving(shared_registry, channel):
    stub = pb_grpc.PluginRegistryStub(channel)
    response = await stub.Register(
        pb.RegisterRequest(
            info=pb.PluginInfo(name="survivor", type=pb.PLUGIN_TYPE_INGESTOR, sources=["s"]),
            address="127.0.0.1:1",
        )
    )
    assert response.accepted
    assert (await stub.Heartbeat(pb.HeartbeatRequest(plugin_id=response.plugin_id))).acknowledged
    listed = await stub.ListPlugins(pb.ListPluginsRequest())
    assert [p.info.name for p in listed.plugins] == ["survivor"]  # nothing garbled was stored
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# -- the log ----------------------------------------------------------------------------


async def test_a_hundred_bad_calls_log_one_line(tmp_path, caplog):
    """100 undecodable calls over 4 connections from one host: one line, no traceback."""
    async with running_registry(tmp_path) as server:
        channels = [grpc.aio.insecure_channel(server.address) for _ in range(4)]
        try:
            for i in range(100):
                method, raw = PARAMS[i % len(PARAMS)].values
                answer = await raw_call(channels[i % 4], method, raw)
                assert_undecodable(answer, method.input_type.full_name)
        finally:
            for opened in channels:
                await opened.close()
    lines = decoding_lines(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    line = lines[0]
    assert line.levelno == logging.WARNING
    message = line.getMessage()
    assert "undecodable polku.v1." in message
    assert "ipv4:127.0.0.1:" in message
    assert "not logged" in message
    assert "\\x" not in message
    assert_no_traceback(caplog)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def strict_decode(raw: bytes) -> bytes:
    raise ValueError(f"cannot parse {raw!r}: secret-detail")


async def _noop(request: Any, context: grpc.aio.ServicerContext) -> bytes:
    return b""


@contextlib.asynccontextmanager
async def guarded_server(max_peers: int) -> AsyncIterator[tuple[DecodingGuard, Clock, list[str]]]:
    """A grpc.aio server behind AuthInterceptor (open mode) with a fake-clock guard.

    Serves grpc.health.v1 and a method whose deserializer raises ValueError, on
    127.0.0.1 and, where there is one, on [::1]: two peer hosts.
    """
    clock = Clock()
    interceptor = AuthInterceptor(lambda: None, CallerLimits())
    guard = interceptor.decoding = DecodingGuard(parse_peer, max_peers=max_peers, clock=clock)
    server = grpc.aio.server(interceptors=[interceptor])
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    strict = grpc.unary_unary_rpc_method_handler(_noop, request_deserializer=strict_decode)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Strict", {"Call": strict}),)
    )
    targets = [f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"]
    with contextlib.suppress(RuntimeError):  # no IPv6 loopback: tests needing two hosts skip
        targets.append(f"[::1]:{server.add_insecure_port('[::1]:0')}")
    await server.start()
    try:
        yield guard, clock, targets
    finally:
        await server.stop(None)


def two_hosts(targets: list[str]) -> tuple[str, str]:
    if len(targets) < 2:
        pytest.skip("needs an IPv6 loopback for a second peer host")
    return targets[0], targets[1]


HEALTH_CHECK = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]


async def bad_health_calls(target: str, count: int) -> None:
    async with grpc.aio.insecure_channel(target) as opened:
        for _ in range(count):
            answer = await raw_call(
                opened, HEALTH_CHECK, b"\x08\xff", service="grpc.health.v1.Health"
            )
            assert_undecodable(answer, "grpc.health.v1.HealthCheckRequest")


async def test_one_line_per_peer_host_per_minute(caplog):
    async with guarded_server(max_peers=16) as (guard, clock, targets):
        v4, v6 = two_hosts(targets)
        await bad_health_calls(v4, 20)
        assert len(decoding_lines(caplog)) == 1
        await bad_health_calls(v6, 20)  # another host has its own line
        assert len(decoding_lines(caplog)) == 2
        assert "from ipv6:" in decoding_lines(caplog)[1].getMessage()
        clock.now += 59
        await bad_health_calls(v4, 5)
        await bad_health_calls(v6, 5)
        assert len(decoding_lines(caplog)) == 2
        clock.now += 2  # a minute after the first lines
        await bad_health_calls(v4, 5)
        assert len(decoding_lines(caplog)) == 3
        assert guard.refused == 55
        assert guard.peers_remembered == 1  # v6's line expired with v4's
    assert_no_traceback(caplog)


async def test_the_peers_remembered_are_bounded(caplog):
    """max_peers=1: the second host gets one line standing for all hosts beyond, a minute."""
    async with guarded_server(max_peers=1) as (guard, clock, targets):
        v4, v6 = two_hosts(targets)
        await bad_health_calls(v4, 3)
        await bad_health_calls(v6, 3)
        lines = [r.getMessage() for r in decoding_lines(caplog)]
        assert len(lines) == 2, lines
        assert "1 other peers were logged" in lines[1]
        assert guard.peers_remembered == 1
        clock.now += 30
        await bad_health_calls(v6, 3)
        assert len(decoding_lines(caplog)) == 2
        clock.now += 31  # v4's line has expired: v6 takes its place in the map
        await bad_health_calls(v6, 1)
        await bad_health_calls(v4, 1)
        lines = [r.getMessage() for r in decoding_lines(caplog)]
        assert len(lines) == 4, lines
        assert "from ipv6:" in lines[2]
        assert "more from this peer" in lines[2]
        assert "from ipv4:" in lines[3]
        assert "other peers" in lines[3]
        assert guard.peers_remembered == 1
    assert_no_traceback(caplog)


async def test_any_exception_of_a_deserializer_is_invalid_argument(caplog):
    async with (
        guarded_server(max_peers=16) as (_, _, targets),
        grpc.aio.insecure_channel(targets[0]) as opened,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await opened.unary_unary("/test.Strict/Call")(b"\x01\x02", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details == "request: cannot be decoded as strict_decode (ValueError)"
    assert "secret" not in caplog.text
    assert_no_traceback(caplog)


# -- with an auth policy ----------------------------------------------------------------


async def test_with_a_policy_admission_comes_first(tmp_path, caplog):
    """Admitted callers get INVALID_ARGUMENT; others learn nothing of their bytes."""
    admin = Who("operator", ("admin",))
    reader = Who("dashboard", ("read",))
    policy = write_policy(tmp_path / "policy.toml", [admin, reader])
    async with (
        running_registry(tmp_path, auth_policy=str(policy)) as server,
        grpc.aio.insecure_channel(server.address) as opened,
    ):
        for param in PARAMS:
            method, raw = param.values
            full_name = method.input_type.full_name
            assert_undecodable(await raw_call(opened, method, raw, admin.bearer), full_name)
            code, details = await raw_call(opened, method, raw)
            assert code == grpc.StatusCode.UNAUTHENTICATED, details
        register = SERVICE.methods_by_name["Register"]
        code, details = await raw_call(opened, register, b"\x08\xff", reader.bearer)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        watch = SERVICE.methods_by_name["Watch"]
        assert_undecodable(
            await raw_call(opened, watch, b"\x08\xff", reader.bearer), "polku.v1.WatchRequest"
        )
        # Still serving the admitted caller.
        stub = pb_grpc.PluginRegistryStub(opened)
        listed = await stub.ListPlugins(pb.ListPluginsRequest(), metadata=admin.bearer)
        assert list(listed.plugins) == []
    assert len(decoding_lines(caplog)) == 1
    assert_no_traceback(caplog)
    assert admin.token not in caplog.text
    assert reader.token not in caplog.text
