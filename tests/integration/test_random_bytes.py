"""Random bytes to every RPC of PluginRegistry: only well-defined status codes, ever.

Each hypothesis example sends raw bytes (no serializer) to one method of one
registry: pure random bytes, or a real request of that method mutated (bytes
flipped, cut, inserted, a valid prefix then garbage), or the real request itself, or
an oversized one. Watch is read to its first message or its error. Whatever the
bytes, the answer is one of :data:`EXPECTED` — never UNKNOWN or INTERNAL — and the
registry logs no traceback.

The registry runs on its own event-loop thread for the whole test (not per
example); each example is one call through ``run_coroutine_threadsafe`` with a gRPC
deadline of its own (hypothesis' own deadline is off: it would be a timing assertion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loop_thread import LoopThread

from registry.testing import running_registry
from registry.wire import pb, pb_grpc

T = TypeVar("T")

# The registry's health checker draws its jitter from the global ``random`` on its own
# thread while hypothesis generates the next example; hypothesis takes that for a
# strategy using ``random``. It is not one.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

SERVICE = pb.DESCRIPTOR.services_by_name["PluginRegistry"]
METHODS: list[MethodDescriptor] = list(SERVICE.methods)
MAX_MESSAGE = 64 * 1024
CALL_DEADLINE = 10.0  # seconds, per example
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}


async def raw_call(
    channel: grpc.aio.Channel, method: MethodDescriptor, raw: bytes
) -> tuple[grpc.StatusCode, str]:
    """``raw`` as the request of ``method`` (a stream's only one): the first answer's status."""
    path = f"/{SERVICE.full_name}/{method.name}"
    try:
        if method.client_streaming:
            if method.server_streaming:
                call = channel.stream_stream(path)(iter([raw]), timeout=CALL_DEADLINE)
                try:
                    await call.read()
                finally:
                    call.cancel()
            else:
                await channel.stream_unary(path)(iter([raw]), timeout=CALL_DEADLINE)
        elif method.server_streaming:
            call = channel.unary_stream(path)(raw, timeout=CALL_DEADLINE)
            try:
                await call.read()  # the first message, or the error
            finally:
                call.cancel()
        else:
            await channel.unary_unary(path)(raw, timeout=CALL_DEADLINE)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# -- real requests, built from the descriptor so a new method is covered too ---------


def fill(message: Message, depth: int = 0) -> None:
    """Give every field of ``message`` a plausible value (a valid request, mostly)."""
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and message.WhichOneof(oneof.name):
            continue  # the first member of a oneof only
        target = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            target["k"] = _scalar(entry.fields_by_name["value"])
        elif entry is not None:
            if entry.full_name.startswith("google.protobuf.") or depth > 2:
                continue
            fill(target.add() if field.is_repeated else target, depth + 1)
        elif field.is_repeated:
            target.append(_scalar(field))
        else:
            setattr(message, field.name, _scalar(field))


def _scalar(field: FieldDescriptor) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return "random-bytes"
    if kind == FieldDescriptor.TYPE_BYTES:
        return b"bytes"
    if kind == FieldDescriptor.TYPE_BOOL:
        return False
    if kind == FieldDescriptor.TYPE_ENUM:
        return 1
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 1.0
    return 30  # integers: a TTL, a page size, a revision


def real_request(descriptor: Descriptor) -> bytes:
    message = GetMessageClass(descriptor)()
    fill(message)
    return message.SerializeToString()


# Every method gets one from the descriptor; those that need more to be valid, here.
REAL = {
    **{m.name: real_request(m.input_type) for m in METHODS},
    "Register": pb.RegisterRequest(
        info=pb.PluginInfo(name="random-bytes", type=1, sources=["random-bytes"]),
        address="127.0.0.1:1",
        lease_ttl_seconds=30,
        labels={"k": "v"},
    ).SerializeToString(),
    "ListPlugins": pb.ListPluginsRequest(type=1, statuses=[1], page_size=30).SerializeToString(),
}


# -- strategies -------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "prefix-then-garbage"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            data[at:] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


def oversized(size: int) -> bytes:
    """A well-formed message with an unknown field 15 of ``size`` bytes."""
    length = bytearray()
    n = size
    while True:
        low, n = n & 0x7F, n >> 7
        length.append(low | (0x80 if n else 0))
        if not n:
            break
    return b"\x7a" + bytes(length) + b"x" * size


def payloads(method: MethodDescriptor) -> st.SearchStrategy[bytes]:
    real = REAL[method.name]
    return st.one_of(
        st.binary(max_size=300),
        mutated(real),
        mutated(real),  # twice the weight: closest to what a broken client sends
        st.just(real),
        st.integers(MAX_MESSAGE, MAX_MESSAGE + 64).map(oversized),
    )


calls = st.sampled_from(METHODS).flatmap(lambda m: st.tuples(st.just(m), payloads(m)))


async def register_survivor(channel: grpc.aio.Channel) -> pb.RegisterResponse:
    stub = pb_grpc.PluginRegistryStub(channel)
    request = pb.RegisterRequest(
        info=pb.PluginInfo(name="after-the-noise", type=1, sources=["after-the-noise"]),
        address="127.0.0.1:1",
    )
    response: pb.RegisterResponse = await stub.Register(request, timeout=CALL_DEADLINE)
    return response


async def _open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target)  # on the loop that will use it


def test_random_bytes_to_every_rpc_get_only_well_defined_codes(tmp_path: Path, caplog):
    thread = LoopThread()
    context = running_registry(tmp_path, max_message_bytes=MAX_MESSAGE, health_interval=3600.0)
    server = thread.run(context.__aenter__())
    channel = thread.run(_open_channel(server.address))
    try:
        seen: dict[tuple[str, grpc.StatusCode], int] = {}
        undecodable = 0

        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(calls)
        def send(call: tuple[MethodDescriptor, bytes]) -> None:
            nonlocal undecodable
            method, raw = call
            code, details = thread.run(raw_call(channel, method, raw))
            key = (method.name, code)
            seen[key] = seen.get(key, 0) + 1
            assert code in EXPECTED, f"{method.name} {code.name}: {details} for {raw[:200]!r}"
            if details.startswith("request: cannot be decoded as "):
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert method.input_type.full_name in details
                undecodable += 1

        send()

        codes = {code for _, code in seen}
        assert grpc.StatusCode.OK in codes, seen
        assert grpc.StatusCode.INVALID_ARGUMENT in codes, seen
        assert undecodable > 0, seen  # the random bytes did reach the guard
        assert {name for name, _ in seen} == {m.name for m in METHODS}, seen
        # Still serving: a real registration goes through.
        response = thread.run(register_survivor(channel))
        assert response.accepted
    finally:
        try:
            thread.run(channel.close())
            thread.run(context.__aexit__(None, None, None))
        finally:
            thread.close()
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert tracebacks == []
