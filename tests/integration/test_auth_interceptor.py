"""The auth interceptor over the wire (SPEC §6 Modes, Identities, Limits).

A real grpc.aio server on 127.0.0.1:0 runs the interceptor in front of a canned
PluginRegistry servicer, built from the proto's own descriptor so that every RPC of
the service (and any added later) is in the method-by-scope matrix, plus the health
service. Each canned handler records ``current_principal()``. Certificates come from
trustme; the ones trustme cannot make (URI SANs) are signed with its CA's key.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from registry.model import Principal
from registry.testing import eventually
from registry.trust.auth import METHOD_SCOPES, AuthInterceptor, CallerLimits, current_principal
from registry.trust.policy import AuthPolicy
from registry.wire import pb, pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["PluginRegistry"]
METHODS = list(SERVICE.methods)
CODE = grpc.StatusCode

TOKENS = {
    name: f"token-of-{name}-{'x' * 20}" for name in ("registrar", "reader", "admin", "a", "b")
}
SCOPES = {
    "registrar": "register",
    "reader": "read",
    "admin": "admin",
    "a": "register",
    "b": "register",
}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def scope_of(method: Any) -> str:
    return METHOD_SCOPES.get(f"/{SERVICE.full_name}/{method.name}", "admin")


def message(descriptor: Any) -> Any:
    return message_factory.GetMessageClass(descriptor)()


# -- certificates ---------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    key: bytes
    chain: bytes


def leaf(cert: trustme.LeafCert) -> Pem:
    return Pem(cert.private_key_pem.bytes(), b"".join(b.bytes() for b in cert.cert_chain_pems))


def signed_by(ca: trustme.CA, names: list[x509.GeneralName], common_name: str) -> Pem:
    """A client certificate with exactly these SANs, which trustme cannot make (URIs)."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Pem(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert.public_bytes(serialization.Encoding.PEM),
    )


@dataclass(frozen=True)
class Pki:
    ca: bytes
    server: Pem
    spiffe: Pem  # spiffe://test/svc, plus a DNS SAN and a CN that other principals own
    two_spiffe: Pem
    dns: Pem  # first.example, second.example
    cn: Pem  # only a CN
    stranger: Pem  # from our CA, but not in the policy
    expired: Pem
    foreign: Pem  # from another CA


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    uri = x509.UniformResourceIdentifier
    return Pki(
        ca=ca.cert_pem.bytes(),
        server=leaf(ca.issue_cert("127.0.0.1", "localhost")),
        spiffe=signed_by(
            ca,
            [
                uri("https://not-an-identity/x"),
                uri("spiffe://test/svc"),
                x509.DNSName("first.example"),
            ],
            common_name="cn-client",
        ),
        two_spiffe=signed_by(
            ca, [uri("spiffe://test/svc"), uri("spiffe://test/admin")], common_name="cn-client"
        ),
        dns=leaf(ca.issue_cert("first.example", "second.example", common_name="cn-client")),
        cn=leaf(ca.issue_cert(common_name="cn-client")),
        stranger=leaf(ca.issue_cert("stranger.example")),
        expired=leaf(
            ca.issue_cert(
                "first.example",
                not_before=now - datetime.timedelta(days=2),
                not_after=now - datetime.timedelta(days=1),
            )
        ),
        foreign=leaf(trustme.CA().issue_cert("first.example")),
    )


POLICY = AuthPolicy.parse(
    "".join(
        f'[[principals]]\nname = "{name}"\ntoken_sha256 = "{sha(token)}"\n'
        f'scopes = ["{SCOPES[name]}"]\nnames = ["*"]\n\n'
        for name, token in TOKENS.items()
    )
    + """
[[principals]]
name = "spiffe-svc"
certificate = "spiffe://test/svc"
scopes = ["read"]

[[principals]]
name = "dns-svc"
certificate = "first.example"
scopes = ["read"]

[[principals]]
name = "second-dns"
certificate = "second.example"
scopes = ["admin"]

[[principals]]
name = "cn-svc"
certificate = "cn-client"
scopes = ["register"]

[[principals]]
name = "spiffe-admin"
certificate = "spiffe://test/admin"
scopes = ["admin"]
""",
    source="test-policy",
)


def principal(name: str) -> Principal:
    return next(p for p in POLICY.principals if p.name == name)


# -- a canned servicer ------------------------------------------------------------


class Canned(pb_grpc.PluginRegistryServicer):
    """Every PluginRegistry RPC answers an empty message and records its principal.

    Methods named in ``hold`` wait until cancelled (a streaming one after its first
    message), so that a test can keep a call in flight.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, Principal | None]] = []
        self.hold: set[str] = set()
        self.entered = 0


# What the client-streaming handlers send first: "the call got past the interceptor".
ADMITTED = (("x-admitted", "1"),)


def _canned(method: Any) -> Callable[..., Any]:
    name = method.name
    output = message_factory.GetMessageClass(method.output_type)

    async def _after(self: Canned) -> None:
        if name in self.hold:
            await asyncio.Event().wait()

    if method.server_streaming:

        async def streaming(self: Canned, request: Any, context: Any) -> AsyncIterator[Any]:
            self.entered += 1
            if method.client_streaming:
                await context.send_initial_metadata(ADMITTED)
                async for _ in request:
                    pass
            self.seen.append((name, current_principal()))
            yield output()
            # Still the same principal after the handler was suspended in a yield.
            self.seen.append((name, current_principal()))
            await _after(self)

        return streaming

    async def unary(self: Canned, request: Any, context: Any) -> Any:
        self.entered += 1
        if method.client_streaming:
            await context.send_initial_metadata(ADMITTED)
            async for _ in request:
                pass
        self.seen.append((name, current_principal()))
        await _after(self)
        return output()

    return unary


for _method in METHODS:
    setattr(Canned, _method.name, _canned(_method))


async def _echo_unary(request: bytes, context: Any) -> bytes:
    echoed.append(current_principal())
    return request


async def _echo_stream_unary(requests: Any, context: Any) -> bytes:
    await context.send_initial_metadata(ADMITTED)
    chunks = [chunk async for chunk in requests]
    echoed.append(current_principal())
    return b"".join(chunks)


async def _echo_stream_stream(requests: Any, context: Any) -> AsyncIterator[bytes]:
    await context.send_initial_metadata(ADMITTED)
    async for chunk in requests:
        echoed.append(current_principal())
        yield chunk


echoed: list[Principal | None] = []
# Raw bytes (no serializers) on two kinds of handler the proto has no example of yet:
# under PluginRegistry (not in METHOD_SCOPES, so admin only), and under an open service.
EXTRA = {
    "EchoStreamUnary": grpc.stream_unary_rpc_method_handler(_echo_stream_unary),
    "EchoStreamStream": grpc.stream_stream_rpc_method_handler(_echo_stream_stream),
}
if "KeepAlive" not in SERVICE.methods_by_name:
    # SPEC §1.3 adds KeepAlive (stream-stream); until the proto has it, a stand-in.
    EXTRA["KeepAlive"] = grpc.stream_stream_rpc_method_handler(_echo_stream_stream)


def _sync(request: bytes, context: Any) -> bytes:
    return request


OPEN_SERVICE = "test.Open"
OPEN = {
    "Echo": grpc.unary_unary_rpc_method_handler(_echo_unary),
    "Sync": grpc.unary_unary_rpc_method_handler(_sync),
    **EXTRA,
}


@dataclass
class Running:
    port: int
    tls_port: int
    unix: str
    interceptor: AuthInterceptor
    servicer: Canned
    policy: list[AuthPolicy | None] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(
    pki: Pki, folder: Path, policy: AuthPolicy | None = POLICY, **limits: Any
) -> AsyncIterator[Running]:
    box: list[AuthPolicy | None] = [policy]
    interceptor = AuthInterceptor(lambda: box[0], CallerLimits(**limits))
    server = grpc.aio.server(interceptors=[interceptor])
    servicer = Canned()
    pb_grpc.add_PluginRegistryServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(SERVICE.full_name, EXTRA),
            grpc.method_handlers_generic_handler(OPEN_SERVICE, OPEN),
        )
    )
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    credentials = grpc.ssl_server_credentials(
        [(pki.server.key, pki.server.chain)], root_certificates=pki.ca, require_client_auth=True
    )
    tls_port = server.add_secure_port("127.0.0.1:0", credentials)
    unix = f"unix:{folder / 'registry.sock'}"
    server.add_insecure_port(unix)
    await server.start()
    echoed.clear()
    try:
        yield Running(port, tls_port, unix, interceptor, servicer, box)
    finally:
        await server.stop(None)


@pytest.fixture
async def running(pki: Pki, tmp_path: Path) -> AsyncIterator[Running]:
    async with serving(pki, tmp_path) as server:
        yield server


@contextlib.asynccontextmanager
async def channel(
    target: str, pki: Pki | None = None, cert: Pem | None = None, *, own_connection: bool = False
) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    if pki is None:
        async with grpc.aio.insecure_channel(target, options=options) as plain:
            yield plain
        return
    credentials = grpc.ssl_channel_credentials(
        pki.ca, cert.key if cert else None, cert.chain if cert else None
    )
    async with grpc.aio.secure_channel(target, credentials, options=options) as secure:
        yield secure


def bearer(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}")]


async def invoke(ch: grpc.aio.Channel, method: Any, metadata: Any = None) -> None:
    """One call of a PluginRegistry method with an empty request; raises AioRpcError."""
    stub = pb_grpc.PluginRegistryStub(ch)
    request = message(method.input_type)
    if method.client_streaming:
        answer = await streamed(getattr(stub, method.name), [request], metadata)
        if method.server_streaming:
            assert len(answer) == 1
        return
    call = getattr(stub, method.name)(request, metadata=metadata, timeout=10)
    if method.server_streaming:
        assert len([r async for r in call]) == 1
    else:
        await call


async def streamed(multicallable: Any, requests: list[Any], metadata: Any = None) -> Any:
    """A client-streaming call that writes only once the server has admitted it.

    grpc-python's client now and then turns a write that races with an early status
    from the server into INTERNAL "Internal error from Core", whoever aborts (seen with
    a bare handler that aborts, no interceptor). The handlers here send ADMITTED as
    initial metadata as soon as they run; a refused call ends without it.
    """
    call = multicallable(metadata=metadata, timeout=10)
    if tuple(await call.initial_metadata()) == ADMITTED:
        for request in requests:
            await call.write(request)
        await call.done_writing()
    if isinstance(call, grpc.aio.StreamStreamCall):
        return [answer async for answer in call]
    return await call


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return CODE.OK, ""


def resolve_method() -> Any:
    return SERVICE.methods_by_name["Resolve"]


# -- the method-by-scope matrix ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
async def test_every_method_needs_its_scope(running, method):
    needed = scope_of(method)
    async with channel(running.address) as ch:
        code, details = await status_of(invoke(ch, method))
        assert code is CODE.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in details
        code, details = await status_of(
            invoke(ch, method, [("authorization", "Bearer not-a-known-token")])
        )
        assert code is CODE.UNAUTHENTICATED
        assert "not-a-known-token" not in details
        for name in ("registrar", "reader", "admin"):
            before = len(running.servicer.seen)
            code, details = await status_of(invoke(ch, method, bearer(name)))
            if SCOPES[name] in (needed, "admin"):
                assert code is CODE.OK, (name, details)
                seen = running.servicer.seen[before:]
                assert seen, f"{method.name} never reached the handler"
                assert set(seen) == {(method.name, principal(name))}
            else:
                assert code is CODE.PERMISSION_DENIED
                assert details == f"principal {name!r} lacks scope {needed!r} ({method.name})"
                assert running.servicer.seen[before:] == []
    await eventually(lambda: running.interceptor.in_flight == 0, what="every call to end")


def test_the_matrix_covers_the_whole_service():
    names = {m.name for m in METHODS}
    assert {"Register", "Heartbeat", "Unregister", "ListPlugins", "GetPlugin", "Resolve"} <= names
    assert {"Watch", "Release"} <= names
    assert scope_of(SERVICE.methods_by_name["Release"]) == "admin"


async def test_methods_missing_from_the_scope_table_are_admin_only_on_every_handler_kind(running):
    async with channel(running.address) as ch:
        stream_unary = ch.stream_unary(f"/{SERVICE.full_name}/EchoStreamUnary")
        stream_stream = ch.stream_stream(f"/{SERVICE.full_name}/EchoStreamStream")
        code, details = await status_of(streamed(stream_unary, [b"a", b"b"], bearer("registrar")))
        assert code is CODE.PERMISSION_DENIED
        assert "lacks scope 'admin' (EchoStreamUnary)" in details
        assert await streamed(stream_unary, [b"a", b"b"], bearer("admin")) == b"ab"
        code, details = await status_of(streamed(stream_stream, [b"x"], bearer("reader")))
        assert code is CODE.PERMISSION_DENIED, details
        assert "lacks scope 'admin' (EchoStreamStream)" in details
        assert await streamed(stream_stream, [b"x", b"y"], bearer("admin")) == [b"x", b"y"]
    assert echoed == [principal("admin")] * 3


# -- what identifies a caller, and what does not ----------------------------------------


async def test_spoofed_headers_change_nothing(running):
    release = SERVICE.methods_by_name["Release"]
    spoof = [
        ("x-identity", "admin"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x509_common_name", "cn-client"),
        ("peer_spiffe_id", "spiffe://test/admin"),
        ("user-agent", "admin"),
    ]
    async with channel(running.address) as ch:
        code, _ = await status_of(invoke(ch, resolve_method(), spoof))
        assert code is CODE.UNAUTHENTICATED
        code, details = await status_of(invoke(ch, release, bearer("reader") + spoof))
        assert code is CODE.PERMISSION_DENIED
        assert "principal 'reader' lacks scope 'admin'" in details
        await invoke(ch, resolve_method(), spoof + bearer("reader"))
        assert running.servicer.seen[-1] == ("Resolve", principal("reader"))
        # A second authorization value is refused, not picked from.
        two = bearer("reader") + bearer("admin")
        code, details = await status_of(invoke(ch, release, two))
        assert code is CODE.UNAUTHENTICATED
        assert "exactly one" in details
        code, _ = await status_of(invoke(ch, resolve_method(), bearer("admin") + bearer("admin")))
        assert code is CODE.UNAUTHENTICATED
    assert running.servicer.seen == [("Resolve", principal("reader"))]


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (f"Bearer {TOKENS['reader']}", True),
        (f"bearer {TOKENS['reader']}", True),
        (f"BEARER  {TOKENS['reader']} ", True),
        (f"Basic {TOKENS['reader']}", False),
        (TOKENS["reader"], False),
        ("Bearer", False),
        ("Bearer ", False),
        (f"Bearer {TOKENS['reader']}x", False),
    ],
)
async def test_the_authorization_value_must_be_a_bearer_token(running, value, accepted):
    async with channel(running.address) as ch:
        code, details = await status_of(invoke(ch, resolve_method(), [("authorization", value)]))
    if accepted:
        assert code is CODE.OK
        assert running.servicer.seen == [("Resolve", principal("reader"))]
    else:
        assert code is CODE.UNAUTHENTICATED
        assert TOKENS["reader"] not in details
        assert running.servicer.seen == []


async def test_health_stays_open_without_identity(running):
    async with channel(running.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        # Another open service: no principal there, even after an authenticated call.
        await invoke(ch, resolve_method(), bearer("admin"))
        assert await ch.unary_unary(f"/{OPEN_SERVICE}/Echo")(b"hi", timeout=10) == b"hi"
        assert (
            await ch.unary_unary(f"/{OPEN_SERVICE}/Echo")(
                b"hi", metadata=[("authorization", "Bearer nonsense")], timeout=10
            )
            == b"hi"
        )
    assert echoed == [None, None]
    await eventually(lambda: running.interceptor.in_flight == 0, what="calls to end")


async def test_open_mode_lets_everything_through_without_a_principal(pki, tmp_path):
    async with serving(pki, tmp_path, policy=None) as running, channel(running.address) as ch:
        for method in METHODS:
            await invoke(ch, method)
            await invoke(ch, method, bearer("admin"))
        stream_unary = ch.stream_unary(f"/{SERVICE.full_name}/EchoStreamUnary")
        assert await streamed(stream_unary, [b"a"]) == b"a"
    assert running.servicer.seen
    assert {p for _, p in running.servicer.seen} == {None}
    assert echoed == [None]


async def test_a_policy_swapped_in_applies_to_the_next_call(pki, tmp_path):
    async with serving(pki, tmp_path, policy=None) as running, channel(running.address) as ch:
        await invoke(ch, resolve_method())
        running.policy[0] = POLICY
        code, _ = await status_of(invoke(ch, resolve_method()))
        assert code is CODE.UNAUTHENTICATED
        await invoke(ch, resolve_method(), bearer("reader"))
    assert running.servicer.seen == [("Resolve", None), ("Resolve", principal("reader"))]


# -- mTLS ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cert", "expected"),
    [
        # The single spiffe:// URI SAN wins over the DNS SAN and the CN.
        ("spiffe", "spiffe-svc"),
        # Else the first DNS SAN (the second one is an admin's), over the CN.
        ("dns", "dns-svc"),
        # Else the CN.
        ("cn", "cn-svc"),
    ],
)
async def test_a_verified_client_certificate_identifies_the_caller(running, pki, cert, expected):
    target = f"127.0.0.1:{running.tls_port}"
    async with channel(target, pki, getattr(pki, cert)) as ch:
        name = "Resolve" if principal(expected).allows("read") else "Heartbeat"
        method = SERVICE.methods_by_name[name]
        await invoke(ch, method)
        release = SERVICE.methods_by_name["Release"]
        code, details = await status_of(invoke(ch, release))
        assert code is CODE.PERMISSION_DENIED
        assert f"principal {expected!r} lacks scope 'admin'" in details
    assert running.servicer.seen[-1] == (method.name, principal(expected))


async def test_certificates_the_policy_does_not_name_are_unauthenticated(running, pki):
    target = f"127.0.0.1:{running.tls_port}"
    async with channel(target, pki, pki.stranger) as ch:
        code, details = await status_of(invoke(ch, resolve_method()))
        assert code is CODE.UNAUTHENTICATED
        assert details == "client certificate 'stranger.example' is not in the auth policy"
    async with channel(target, pki, pki.two_spiffe) as ch:
        code, details = await status_of(invoke(ch, resolve_method()))
        assert code is CODE.UNAUTHENTICATED
        assert "2 spiffe:// URI SANs" in details
    assert running.servicer.seen == []


async def test_a_token_over_mtls_wins_and_a_wrong_one_never_falls_back(running, pki):
    target = f"127.0.0.1:{running.tls_port}"
    async with channel(target, pki, pki.spiffe) as ch:
        await invoke(ch, SERVICE.methods_by_name["Release"], bearer("admin"))
        assert running.servicer.seen[-1] == ("Release", principal("admin"))
        before = len(running.servicer.seen)
        code, _ = await status_of(invoke(ch, resolve_method(), [("authorization", "Bearer wrong")]))
        assert code is CODE.UNAUTHENTICATED
        assert len(running.servicer.seen) == before


@pytest.mark.parametrize("cert", ["foreign", "expired", None])
async def test_a_client_certificate_that_does_not_verify_fails_the_handshake(running, pki, cert):
    target = f"127.0.0.1:{running.tls_port}"
    async with channel(target, pki, getattr(pki, cert) if cert else None) as ch:
        code, _ = await status_of(invoke(ch, resolve_method(), bearer("admin")))
    assert code is CODE.UNAVAILABLE
    assert running.servicer.entered == 0


# -- limits ---------------------------------------------------------------------------


async def test_a_register_burst_is_limited_per_principal(pki, tmp_path):
    register = SERVICE.methods_by_name["Register"]
    heartbeat = SERVICE.methods_by_name["Heartbeat"]
    # A rate this low refills nothing during the test.
    async with (
        serving(pki, tmp_path, register_rate=0.001, register_burst=3) as running,
        channel(running.address) as ch,
    ):
        for _ in range(3):
            await invoke(ch, register, bearer("a"))
        code, details = await status_of(invoke(ch, register, bearer("a")))
        assert code is CODE.RESOURCE_EXHAUSTED
        assert details.startswith("register_rate: principal 'a'")
        await invoke(ch, register, bearer("b"))
        await invoke(ch, heartbeat, bearer("a"))  # only Register is rate-limited
    assert [p.name for m, p in running.servicer.seen if m == "Register"] == ["a"] * 3 + ["b"]


async def test_the_register_rate_is_on_by_default_with_a_policy(pki, tmp_path):
    register = SERVICE.methods_by_name["Register"]
    async with serving(pki, tmp_path) as running, channel(running.address) as ch:
        codes = [(await status_of(invoke(ch, register, bearer("a"))))[0] for _ in range(200)]
    # The default burst is 100; the refill at 20/s adds a few while the calls run.
    assert codes[:100] == [CODE.OK] * 100
    assert CODE.RESOURCE_EXHAUSTED in codes[100:]


async def watching(ch: grpc.aio.Channel, name: str | None) -> Any:
    """A Watch stream that has been admitted (its first message is in)."""
    stub = pb_grpc.PluginRegistryStub(ch)
    call = stub.Watch(pb.WatchRequest(), metadata=bearer(name) if name else None, timeout=60)
    await call.read()
    return call


async def test_streams_per_principal_are_limited_and_released_on_cancel(pki, tmp_path):
    async with (
        serving(pki, tmp_path, max_streams_per_principal=2) as running,
        channel(running.address) as ch,
    ):
        running.servicer.hold.add("Watch")
        first = await watching(ch, "reader")
        second = await watching(ch, "reader")
        assert running.interceptor.streams("reader") == 2
        code, details = await status_of(watching(ch, "reader"))
        assert code is CODE.RESOURCE_EXHAUSTED
        assert details.startswith("max_streams_per_principal: principal 'reader'")
        other = await watching(ch, "admin")
        first.cancel()
        await eventually(
            lambda: running.interceptor.streams("reader") == 1, what="the stream to be released"
        )
        third = await watching(ch, "reader")
        for call in (second, third, other):
            call.cancel()
        await eventually(lambda: running.interceptor.in_flight == 0, what="every call to end")
        assert running.interceptor.streams("reader") == 0
        assert running.interceptor.streams("admin") == 0


async def test_a_stream_whose_channel_goes_away_is_released(pki, tmp_path):
    async with serving(pki, tmp_path, max_streams_per_principal=1) as running:
        running.servicer.hold.add("Watch")
        async with channel(running.address) as ch:
            await watching(ch, "reader")
            assert running.interceptor.streams("reader") == 1
        await eventually(
            lambda: running.interceptor.streams("reader") == 0, what="the stream to be released"
        )
        async with channel(running.address) as ch:
            call = await watching(ch, "reader")
            call.cancel()


async def test_keepalive_streams_count_with_watch_streams(pki, tmp_path):
    async with (
        serving(pki, tmp_path, max_streams_per_principal=1) as running,
        channel(running.address) as ch,
    ):
        running.servicer.hold.add("Watch")
        keepalive = ch.stream_stream(f"/{SERVICE.full_name}/KeepAlive")
        code, details = await status_of(streamed(keepalive, [b""], bearer("reader")))
        assert code is CODE.PERMISSION_DENIED
        assert "lacks scope 'register' (KeepAlive)" in details
        watch = await watching(ch, "admin")
        code, details = await status_of(streamed(keepalive, [b""], bearer("admin")))
        assert code is CODE.RESOURCE_EXHAUSTED
        assert details.startswith("max_streams_per_principal: principal 'admin'")
        assert await streamed(keepalive, [b""], bearer("registrar")) == [b""]
        watch.cancel()
        await eventually(lambda: running.interceptor.in_flight == 0, what="every call to end")


async def test_a_sync_handler_is_refused_not_served_unguarded(running):
    async with channel(running.address) as ch:
        code, _ = await status_of(ch.unary_unary(f"/{OPEN_SERVICE}/Sync")(b"x", timeout=10))
    assert code is CODE.UNIMPLEMENTED


async def test_calls_in_flight_are_limited_across_the_server(pki, tmp_path):
    async with (
        serving(pki, tmp_path, policy=None, max_concurrent_rpcs=2) as running,
        channel(running.address) as ch,
    ):
        running.servicer.hold.update({"Watch", "GetPlugin"})
        watch = await watching(ch, None)
        get = pb_grpc.PluginRegistryStub(ch).GetPlugin(pb.GetPluginRequest(), timeout=30)
        await eventually(lambda: running.interceptor.in_flight == 2, what="two calls in flight")
        code, details = await status_of(invoke(ch, resolve_method()))
        assert code is CODE.RESOURCE_EXHAUSTED
        assert details.startswith("max_concurrent_rpcs: 2")
        health = health_pb2_grpc.HealthStub(ch)
        code, _ = await status_of(health.Check(health_pb2.HealthCheckRequest(), timeout=10))
        assert code is CODE.RESOURCE_EXHAUSTED
        get.cancel()  # a unary call cancelled by its client is released too
        await eventually(lambda: running.interceptor.in_flight == 1, what="the call to end")
        await invoke(ch, resolve_method())
        watch.cancel()
        await eventually(lambda: running.interceptor.in_flight == 0, what="the stream to end")


async def test_connections_per_peer_count_connections_with_calls_in_flight(pki, tmp_path):
    async with serving(pki, tmp_path, policy=None, max_connections_per_peer=2) as running:
        running.servicer.hold.add("Watch")
        async with contextlib.AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(channel(running.address, own_connection=True))
                for _ in range(3)
            ]
            streams = [await watching(ch, None) for ch in channels[:2]]
            assert running.interceptor.connections("127.0.0.1") == 2
            code, details = await status_of(invoke(channels[2], resolve_method()))
            assert code is CODE.RESOURCE_EXHAUSTED
            assert details.startswith("max_connections_per_peer: 127.0.0.1")
            # More calls on a connection already counted are fine.
            await invoke(channels[0], resolve_method())
            streams[1].cancel()
            await eventually(
                lambda: running.interceptor.connections("127.0.0.1") == 1,
                what="the connection to have no call in flight",
            )
            await invoke(channels[2], resolve_method())
            streams[0].cancel()
        await eventually(lambda: running.interceptor.in_flight == 0, what="every call to end")
        assert running.interceptor.connections("127.0.0.1") == 0


async def test_unix_socket_peers_are_not_counted_per_connection(pki, tmp_path):
    async with serving(pki, tmp_path, policy=None, max_connections_per_peer=1) as running:
        running.servicer.hold.add("Watch")
        async with (
            channel(running.unix, own_connection=True) as one,
            channel(running.unix, own_connection=True) as two,
        ):
            first = await watching(one, None)
            second = await watching(two, None)
            first.cancel()
            second.cancel()
        assert running.interceptor.connections("127.0.0.1") == 0


async def test_refused_calls_leave_nothing_counted(running, pki):
    async with channel(running.address) as ch:
        for _ in range(5):
            await status_of(invoke(ch, resolve_method()))
            await status_of(invoke(ch, SERVICE.methods_by_name["Release"], bearer("reader")))
    async with channel(f"127.0.0.1:{running.tls_port}", pki, pki.stranger) as ch:
        await status_of(invoke(ch, resolve_method()))
    # The status reaches the client before the handler's clean-up has run.
    await eventually(lambda: running.interceptor.in_flight == 0, what="every call to end")
    assert running.interceptor.connections("127.0.0.1") == 0
    assert running.servicer.entered == 0
