"""SPEC §6 end to end through the real RegistryServer: identity, scopes, ownership,
limits, the address policy, audit and what failures tell a client.

Every test runs a real registry (``running_registry``) with an auth policy written under
tmp_path, on 127.0.0.1:0 (one test listens on 0.0.0.0:0 and is reached through
127.0.0.1 only), with and without TLS and mTLS from trustme. Host names resolve
through stub resolvers; refusals to dial are proved with a canary listener on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from trust_helpers import Canary, Pki, RebindingResolver, Who, write_policy

from registry.client import RegistryClient
from registry.errors import (
    AlreadyExists,
    InvalidArgument,
    PermissionDenied,
    RegistryError,
    RegistryUnavailable,
    ResourceExhausted,
)
from registry.server import RegistryServer
from registry.testing import StaticResolver, eventually, running_registry
from registry.trust.tls import TlsFiles, channel_credentials
from registry.wire import pb, pb_grpc

CODE = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["PluginRegistry"]
DEADLINE = 10.0
UNKNOWN_ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"  # well-formed, never issued
DEAD = "127.0.0.1:9"  # nothing answers there; health checks of it fail, on loopback
CLI = [sys.executable, "-m", "registry"]

# The scope of each PluginRegistry RPC as SPEC §6 words it, written out here rather than
# read from the implementation. An RPC added to the proto fails the matrix until it is
# given a scope and a request below.
SPEC_SCOPES = {
    "Register": "register",
    "Heartbeat": "register",
    "Unregister": "register",
    "KeepAlive": "register",
    "Drain": "register",
    "ListPlugins": "read",
    "GetPlugin": "read",
    "Resolve": "read",
    "Watch": "read",
    "GetStatus": "read",
    "Release": "admin",
}

A = Who("team-a", ("register", "read"), names=("team-a-*",))
B = Who("team-b", ("register", "read"), names=("*",))
ADMIN = Who("admin", ("admin",))
READER = Who("reader", ("read",))
REGISTRAR = Who("registrar", ("register",))
NARROW = Who("narrow", ("register", "read"), names=("narrow-*",), sources=("k8s-*",))
SVC_READER = Who("svc-reader", ("read",), certificate="spiffe://test/reader", with_token=False)
SVC_REGISTRAR = Who(
    "svc-registrar", ("register",), certificate="spiffe://test/registrar", with_token=False
)
SVC_ADMIN = Who("svc-admin", ("admin",), certificate="spiffe://test/admin", with_token=False)
PRINCIPALS = (A, B, ADMIN, READER, REGISTRAR, NARROW, SVC_READER, SVC_REGISTRAR, SVC_ADMIN)
TOKENS = [p.token for p in PRINCIPALS]

# Headers a client might hope are trusted. None of them is.
SPOOFED = (
    ("x-identity", "admin"),
    ("x-principal", "admin"),
    ("x-forwarded-for", "127.0.0.1"),
    ("x-spiffe-id", "spiffe://test/admin"),
    ("x-client-cert", "spiffe://test/admin"),
)


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def certs(pki: Pki) -> dict[str, tuple[Path, Path]]:
    """Client certificates by name: the policy's identities, a stranger, bad ones."""
    made = {
        who.name: pki.spiffe(who.certificate, who.name)
        for who in (SVC_READER, SVC_REGISTRAR, SVC_ADMIN)
        if who.certificate is not None
    }
    made["stranger"] = pki.spiffe("spiffe://test/stranger", "stranger")
    made["foreign"] = pki.foreign("spiffe://test/admin")
    made["expired"] = pki.expired("spiffe://test/admin")
    return made


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "policy.toml", PRINCIPALS)


def secured(
    tmp_path: Path, policy: Path, **settings: Any
) -> contextlib.AbstractAsyncContextManager[RegistryServer]:
    settings.setdefault("health_interval", 3600.0)  # one check right after Register suffices
    settings.setdefault("deregister_after", 0)
    return running_registry(tmp_path, auth_policy=str(policy), **settings)


def target(server: RegistryServer) -> str:
    """Where a client reaches the server: always through 127.0.0.1."""
    return f"127.0.0.1:{server.port}"


def open_channel(server: RegistryServer, tls: TlsFiles | None = None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target(server))
    return grpc.aio.secure_channel(target(server), channel_credentials(tls))


def client(server: RegistryServer, who: Who | None = None, **kwargs: Any) -> RegistryClient:
    return RegistryClient(target(server), token=who.token if who else None, **kwargs)


def ingestor(name: str, *sources: str) -> pb.PluginInfo:
    return pb.PluginInfo(name=name, type=pb.PLUGIN_TYPE_INGESTOR, sources=list(sources or [name]))


class Outcome:
    """A call's status code and details (OK for a call that succeeded)."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code = code
        self.details = details

    def __repr__(self) -> str:
        return f"{self.code.name}({self.details!r})"


async def outcome(call: Awaitable[Any]) -> Outcome:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    return Outcome(CODE.OK)


class Matrix:
    """Calls every PluginRegistry RPC with a request that succeeds for the right scope."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = pb_grpc.PluginRegistryStub(channel)
        self.serial = 0

    def request(self, method: str) -> Any:
        self.serial += 1
        name = f"matrix-{self.serial}"
        requests: dict[str, Callable[[], Any]] = {
            "Register": lambda: pb.RegisterRequest(
                info=ingestor(name), address=DEAD, no_lease=True
            ),
            "Heartbeat": lambda: pb.HeartbeatRequest(plugin_id=UNKNOWN_ID),
            "KeepAlive": lambda: pb.KeepAliveRequest(plugin_id=UNKNOWN_ID),
            "Unregister": lambda: pb.UnregisterRequest(plugin_id=UNKNOWN_ID),
            "Drain": lambda: pb.DrainRequest(plugin_id=UNKNOWN_ID),
            "ListPlugins": lambda: pb.ListPluginsRequest(),
            "GetPlugin": lambda: pb.GetPluginRequest(plugin_id=UNKNOWN_ID),
            "Resolve": lambda: pb.ResolveRequest(source="matrix"),
            "Watch": lambda: pb.WatchRequest(),
            "Release": lambda: pb.ReleaseRequest(name="nobody-owns-this"),
            "GetStatus": Empty,
        }
        assert method in requests, f"a new RPC {method}: give it a request in this matrix"
        return requests[method]()

    # What the right scope gets: these requests are fine, only GetPlugin's and Drain's
    # id is unknown.
    EXPECTED = {"GetPlugin": CODE.NOT_FOUND, "Drain": CODE.NOT_FOUND}

    async def call(self, method: str, metadata: Sequence[tuple[str, str]] = ()) -> Outcome:
        rpc = getattr(self.stub, method)
        request = self.request(method)
        descriptor = SERVICE.methods_by_name[method]
        if descriptor.server_streaming and not descriptor.client_streaming:
            stream = rpc(request, metadata=tuple(metadata), timeout=DEADLINE)
            try:
                return await outcome(stream.read())  # the first message, or the refusal
            finally:
                stream.cancel()
        if descriptor.client_streaming and descriptor.server_streaming:
            stream = rpc(metadata=tuple(metadata), timeout=DEADLINE)
            try:
                await stream.write(request)
                return await outcome(stream.read())  # the first answer, or the refusal
            finally:
                stream.cancel()
        assert not descriptor.client_streaming, f"{method}: a client stream, add it here"
        return await outcome(rpc(request, metadata=tuple(metadata), timeout=DEADLINE))


def check_matrix(
    results: list[tuple[str, str, Outcome, str]],
) -> None:
    """Fail with every mismatch at once: (method, identity, outcome, what was wanted)."""
    wrong = [f"{m} as {who}: got {got!r}, wanted {want}" for m, who, got, want in results if want]
    assert not wrong, "\n".join(wrong)


def expect(method: str, got: Outcome, kind: str, scope: str) -> str:
    """'' when ``got`` is what ``kind`` of identity should get, else what it should."""
    if kind == "none":
        return "" if got.code == CODE.UNAUTHENTICATED else "UNAUTHENTICATED"
    if kind == "wrong":
        ok = got.code == CODE.PERMISSION_DENIED and f"'{scope}'" in got.details
        return "" if ok else f"PERMISSION_DENIED naming scope {scope!r}"
    want = Matrix.EXPECTED.get(method, CODE.OK)
    return "" if got.code == want else want.name


def scope_of(method: str) -> str:
    assert method in SPEC_SCOPES, f"a new RPC {method}: which scope of SPEC §6 needs it?"
    return SPEC_SCOPES[method]


# token identities by scope: the one that holds it, ones that do not
RIGHT = {"register": REGISTRAR, "read": READER, "admin": ADMIN}
WRONG = {"register": (READER,), "read": (REGISTRAR,), "admin": (READER, REGISTRAR, A)}


# -- 1. every RPC x identity ---------------------------------------------------------------


@pytest.mark.parametrize("transport", ["plaintext", "tls"])
async def test_every_rpc_by_token_scope(
    transport: str, tmp_path: Path, policy: Path, pki: Pki
) -> None:
    tls = transport == "tls"
    server_tls = pki.server(mtls=False) if tls else None
    async with (
        secured(tmp_path, policy, tls=server_tls) as server,
        open_channel(server, pki.client() if tls else None) as channel,
    ):
        matrix = Matrix(channel)
        results: list[tuple[str, str, Outcome, str]] = []
        for descriptor in SERVICE.methods:
            method, scope = descriptor.name, scope_of(descriptor.name)
            cases: list[tuple[str, str, Sequence[tuple[str, str]]]] = [
                ("no identity", "none", ()),
                ("spoofed headers only", "none", SPOOFED),
                ("spoofed user-agent", "none", (("user-agent", "admin"),)),
                ("an unknown token", "none", (("authorization", "Bearer not-a-token"),)),
                ("a token without Bearer", "none", (("authorization", ADMIN.token),)),
                ("a certificate identity as token", "none",
                 (("authorization", "Bearer spiffe://test/admin"),)),
                *((f"{w.name} + spoofed", "wrong", (*w.bearer, *SPOOFED)) for w in WRONG[scope]),
                (RIGHT[scope].name, "right", RIGHT[scope].bearer),
                ("admin", "right", ADMIN.bearer),
            ]  # fmt: skip
            for label, kind, metadata in cases:
                got = await matrix.call(method, metadata)
                results.append((method, label, got, expect(method, got, kind, scope)))
        check_matrix(results)
        # Exactly the right identities registered (the matrix is not vacuous).
        owners = sorted(str(server.state.catalog.owner_of(p.name)) for p in server.state.view)
        assert owners == ["admin", "registrar"], owners


async def test_every_rpc_by_client_certificate(
    tmp_path: Path, policy: Path, pki: Pki, certs: dict[str, tuple[Path, Path]]
) -> None:
    right = {"register": SVC_REGISTRAR, "read": SVC_READER, "admin": SVC_ADMIN}
    wrong = {"register": (SVC_READER,), "read": (SVC_REGISTRAR,), "admin": (SVC_READER,)}
    async with secured(tmp_path, policy, tls=pki.server(mtls=True)) as server:
        channels = {
            name: open_channel(server, pki.client(certs[name]))
            for name in ("svc-reader", "svc-registrar", "svc-admin", "stranger")
        }
        try:
            matrices = {name: Matrix(channel) for name, channel in channels.items()}
            results: list[tuple[str, str, Outcome, str]] = []
            for descriptor in SERVICE.methods:
                method, scope = descriptor.name, scope_of(descriptor.name)
                cases: list[tuple[str, str, str, Sequence[tuple[str, str]]]] = [
                    ("stranger", "a certificate not in the policy", "none", ()),
                    ("stranger", "a stranger + spoofed", "none", SPOOFED),
                    *((w.name, f"{w.name} + spoofed", "wrong", SPOOFED) for w in wrong[scope]),
                    (right[scope].name, right[scope].name, "right", ()),
                    ("svc-admin", "svc-admin", "right", ()),
                    # A token beats the certificate; a bad token never falls back to it.
                    ("stranger", "stranger + right token", "right", RIGHT[scope].bearer),
                    ("svc-admin", "svc-admin + unknown token", "none",
                     (("authorization", "Bearer not-a-token"),)),
                ]  # fmt: skip
                for channel_name, label, kind, metadata in cases:
                    got = await matrices[channel_name].call(method, metadata)
                    results.append((method, label, got, expect(method, got, kind, scope)))
            check_matrix(results)
            stranger = await matrices["stranger"].call("ListPlugins")
            assert "spiffe://test/stranger" in stranger.details  # the identity TLS proved
        finally:
            for channel in channels.values():
                await channel.close()


async def test_register_records_the_principal_of_the_certificate(
    tmp_path: Path, pki: Pki, certs: dict[str, tuple[Path, Path]]
) -> None:
    """The spiffe URI SAN is the identity, not the decoy DNS SAN or the CN."""
    owner = Who("svc-owner", ("register", "read"), names=("svc-*",),
                certificate="spiffe://test/registrar", with_token=False)  # fmt: skip
    decoys = [
        Who("decoy-dns", ("admin",), certificate="svc-registrar.decoy.test", with_token=False),
        Who("decoy-cn", ("admin",), certificate="svc-registrar-cn", with_token=False),
    ]
    policy = write_policy(tmp_path / "policy.toml", [owner, *decoys, B])
    async with (
        secured(tmp_path, policy, tls=pki.server(mtls=True)) as server,
        client(server, tls=pki.client(certs["svc-registrar"])) as svc,
        client(server, B, tls=pki.client(certs["stranger"])) as b,
    ):
        with pytest.raises(PermissionDenied, match="lacks scope 'admin'"):
            await svc.release("anything")  # the decoys' admin scope is not this caller's
        await svc.register(ingestor("svc-one", "svc-source"), DEAD, no_lease=True)
        assert server.state.catalog.owner_of("svc-one") == "svc-owner"
        with pytest.raises(PermissionDenied):
            await b.register(ingestor("svc-one", "other"), DEAD, no_lease=True)


@pytest.mark.parametrize("transport", ["plaintext", "tls", "mtls"])
async def test_health_needs_no_identity(
    transport: str, tmp_path: Path, policy: Path, pki: Pki, certs: dict[str, tuple[Path, Path]]
) -> None:
    server_tls = {"plaintext": None, "tls": pki.server(mtls=False), "mtls": pki.server(mtls=True)}
    # Under mTLS every connection has a certificate; the stranger's names no principal.
    client_tls = {"plaintext": None, "tls": pki.client(), "mtls": pki.client(certs["stranger"])}
    async with (
        secured(tmp_path, policy, tls=server_tls[transport]) as server,
        open_channel(server, client_tls[transport]) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE.full_name):
            response = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        # ...while the registry itself is closed to the same connection.
        refused = await Matrix(channel).call("ListPlugins")
        assert refused.code == CODE.UNAUTHENTICATED


async def list_services(channel: grpc.aio.Channel) -> Outcome | set[str]:
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=DEADLINE)
    try:
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        response = await call.read()
        await call.done_writing()
    except grpc.aio.AioRpcError as exc:
        return Outcome(exc.code(), exc.details() or "")
    finally:
        call.cancel()
    return {s.name for s in response.list_services_response.service}


@pytest.mark.parametrize("reflection", [True, False])
async def test_reflection_is_open_unless_turned_off(
    reflection: bool, tmp_path: Path, policy: Path
) -> None:
    async with (
        secured(tmp_path, policy, reflection=reflection) as server,
        open_channel(server) as channel,
    ):
        services = await list_services(channel)
    if reflection:
        assert isinstance(services, set)
        assert SERVICE.full_name in services
    else:
        assert isinstance(services, Outcome)
        assert services.code == CODE.UNIMPLEMENTED


@pytest.mark.parametrize("certificate", ["foreign", "expired", None])
async def test_a_bad_client_certificate_fails_the_handshake(
    certificate: str | None,
    tmp_path: Path,
    policy: Path,
    pki: Pki,
    certs: dict[str, tuple[Path, Path]],
) -> None:
    """A foreign CA's certificate, an expired one or none: no call gets through at all."""
    async with secured(tmp_path, policy, tls=pki.server(mtls=True)) as server:
        bad = pki.client(certs[certificate]) if certificate else pki.client()
        async with open_channel(server, bad) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            refused = await outcome(health.Check(health_pb2.HealthCheckRequest(), timeout=5))
            with_token = await Matrix(channel).call("ListPlugins", ADMIN.bearer)
        assert refused.code == CODE.UNAVAILABLE, refused
        assert with_token.code == CODE.UNAVAILABLE, with_token  # a token does not help
        # The same server answers a good certificate (the refusal was the certificate's).
        async with open_channel(server, pki.client(certs["svc-reader"])) as channel:
            served = await Matrix(channel).call("ListPlugins")
        assert served.code == CODE.OK, served


# -- 2. ownership over the wire ----------------------------------------------------------


def assert_no_leak(messages: Sequence[str], secrets: Sequence[str]) -> None:
    """No refusal carries another plugin's id or address."""
    assert messages
    for message in messages:
        for secret in secrets:
            assert secret not in message, (secret, message)


async def refused(call: Awaitable[Any], kind: type[RegistryError]) -> str:
    with pytest.raises(kind) as caught:
        await call
    return str(caught.value)


async def test_ownership_between_principals(tmp_path: Path, policy: Path) -> None:
    a_addresses = ["127.0.0.1:40101", "127.0.0.1:40102"]
    async with (
        secured(tmp_path, policy) as server,
        client(server, A) as a,
        client(server, B) as b,
        client(server, ADMIN) as admin,
    ):
        first = await a.register(ingestor("team-a-x", "a-src"), a_addresses[0], no_lease=True)
        second = await a.register(ingestor("team-a-x", "a-src"), a_addresses[1], no_lease=True)
        a_ids = [first.plugin_id, second.plugin_id]
        secrets = [*a_ids, *a_addresses, "40101", "40102"]
        messages = []

        # B may use any name by its policy, but not one A owns, nor A's source.
        for info in (ingestor("team-a-x", "b-src"), ingestor("team-a-x", "a-src")):
            messages.append(await refused(b.register(info, DEAD, no_lease=True), PermissionDenied))
        text = await refused(
            b.register(ingestor("b-plugin", "a-src"), DEAD, no_lease=True), PermissionDenied
        )
        assert "team-a-x" in text  # names the owning plugin name
        messages.append(text)
        for plugin_id in a_ids:
            messages.append(await refused(b.heartbeat(plugin_id), PermissionDenied))
            messages.append(await refused(b.unregister(plugin_id), PermissionDenied))
        assert {p.plugin_id for p in await b.list_plugins()} == set(a_ids)  # nothing removed

        # Two names of one principal: the §2 rule, ALREADY_EXISTS naming the name only.
        text = await refused(
            a.register(ingestor("team-a-y", "a-src"), DEAD, no_lease=True), AlreadyExists
        )
        assert "team-a-x" in text
        messages.append(text)

        # An admin may act on A's instances.
        assert await admin.heartbeat(a_ids[0]) is True
        await admin.unregister(a_ids[0])
        await a.unregister(a_ids[1])
        assert await b.list_plugins() == []

        # No instance is live, and still the name and the source are A's.
        for info in (ingestor("team-a-x", "b-src"), ingestor("b-plugin", "a-src")):
            messages.append(await refused(b.register(info, DEAD, no_lease=True), PermissionDenied))
        assert_no_leak(messages, secrets)

        # Only an admin releases; then B may claim what A had.
        messages = [await refused(b.release("team-a-x"), PermissionDenied)]
        assert "admin" in messages[0]
        released = await admin.release("team-a-x")
        assert released.released
        assert released.principal == "team-a"
        assert list(released.sources) == ["a-src"]
        assert (await admin.release("team-a-x")).released is False  # idempotent
        taken = await b.register(ingestor("b-plugin", "a-src"), DEAD, no_lease=True)
        assert server.state.catalog.owner_of("b-plugin") == "team-b"
        # Now A is the stranger to B's instances.
        messages.append(await refused(a.unregister(taken.plugin_id), PermissionDenied))
        messages.append(
            await refused(
                a.register(ingestor("team-a-x", "a-src"), DEAD, no_lease=True), PermissionDenied
            )
        )
        assert_no_leak(messages, [taken.plugin_id, DEAD])


async def test_ownership_survives_a_restart(tmp_path: Path, policy: Path) -> None:
    async with secured(tmp_path, policy) as server, client(server, A) as a:
        registered = await a.register(ingestor("team-a-keep", "keep-src"), DEAD, no_lease=True)
        await a.unregister(registered.plugin_id)
    async with secured(tmp_path, policy) as server, client(server, B) as b:
        for info in (ingestor("team-a-keep", "x"), ingestor("b-other", "keep-src")):
            await refused(b.register(info, DEAD, no_lease=True), PermissionDenied)


async def test_a_principal_claims_only_sources_its_globs_allow(
    tmp_path: Path, policy: Path
) -> None:
    async with secured(tmp_path, policy) as server, client(server, NARROW) as narrow:
        text = await refused(
            narrow.register(ingestor("narrow-1", "k8s-pods", "audit"), DEAD, no_lease=True),
            PermissionDenied,
        )
        assert "'audit'" in text
        assert "narrow" in text
        text = await refused(
            narrow.register(ingestor("other-name", "k8s-pods"), DEAD, no_lease=True),
            PermissionDenied,
        )
        assert "'other-name'" in text  # its names glob
        emitter = pb.PluginInfo(
            name="narrow-out", type=pb.PLUGIN_TYPE_EMITTER, emitter_name="kafka"
        )
        await refused(narrow.register(emitter, DEAD, no_lease=True), PermissionDenied)
        accepted = await narrow.register(ingestor("narrow-1", "k8s-pods"), DEAD, no_lease=True)
        assert accepted.accepted
        assert server.state.catalog.owner_of("narrow-1") == "narrow"


async def test_live_instances_per_principal(tmp_path: Path, policy: Path) -> None:
    async with (
        secured(tmp_path, policy, max_instances_per_principal=2) as server,
        client(server, A) as a,
        client(server, B) as b,
    ):
        info = ingestor("team-a-many", "many")
        await a.register(info, "127.0.0.1:40201", no_lease=True)
        kept = await a.register(info, "127.0.0.1:40202", no_lease=True)
        text = await refused(a.register(info, "127.0.0.1:40203", no_lease=True), ResourceExhausted)
        assert "max_instances_per_principal" in text
        # Replacing an instance at the same (name, address) is not one more.
        again = await a.register(info, "127.0.0.1:40202", no_lease=True)
        assert again.plugin_id != kept.plugin_id
        assert len(await a.list_plugins()) == 2
        # Another principal has a budget of its own.
        await b.register(ingestor("b-many", "b-many"), DEAD, no_lease=True)
        # Freeing one makes room again.
        await a.unregister(again.plugin_id)
        await a.register(info, "127.0.0.1:40203", no_lease=True)


# -- 3. limits per principal ------------------------------------------------------------


async def test_register_rate_per_principal(tmp_path: Path, policy: Path) -> None:
    async with (
        secured(tmp_path, policy, register_rate=1, register_burst=3) as server,
        client(server, A) as a,
        client(server, B) as b,
    ):
        # A full bucket holds the burst; then, at one a second, the bucket runs dry.
        for n in range(3):
            await a.register(ingestor(f"team-a-r{n}"), f"127.0.0.1:{40300 + n}", no_lease=True)
        text = ""
        for n in range(3, 30):
            try:
                await a.register(ingestor(f"team-a-r{n}"), f"127.0.0.1:{40300 + n}", no_lease=True)
            except ResourceExhausted as exc:
                text = str(exc)
                break
        assert "register_rate" in text
        assert "team-a" in text
        # B is served meanwhile: the bucket is A's.
        assert (await b.register(ingestor("b-rate"), DEAD, no_lease=True)).accepted


async def open_watch(stub: pb_grpc.PluginRegistryStub, who: Who) -> tuple[Any, Outcome]:
    call = stub.Watch(pb.WatchRequest(), metadata=who.bearer)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as exc:
        return call, Outcome(exc.code(), exc.details() or "")
    assert first.snapshot
    return call, Outcome(CODE.OK)


async def test_watch_streams_per_principal(tmp_path: Path, policy: Path) -> None:
    async with (
        secured(tmp_path, policy, max_streams_per_principal=2) as server,
        open_channel(server) as channel,
    ):
        stub = pb_grpc.PluginRegistryStub(channel)
        calls = []
        try:
            for _ in range(2):
                call, got = await open_watch(stub, A)
                calls.append(call)
                assert got.code == CODE.OK, got
            call, third = await open_watch(stub, A)
            assert third.code == CODE.RESOURCE_EXHAUSTED, third
            assert "max_streams_per_principal" in third.details
            call, other = await open_watch(stub, B)  # B's count is its own
            calls.append(call)
            assert other.code == CODE.OK, other

            calls.pop(0).cancel()

            async def reopened() -> bool:
                call, got = await open_watch(stub, A)
                if got.code == CODE.OK:
                    calls.append(call)
                    return True
                assert got.code == CODE.RESOURCE_EXHAUSTED, got
                return False

            await eventually(reopened, within=DEADLINE, what="a freed Watch slot")
        finally:
            for call in calls:
                call.cancel()


async def test_open_mode_has_no_per_principal_limits_unless_set(tmp_path: Path) -> None:
    """Without a policy the per-principal limits are off (more streams than the policy
    default of 64, more Registers than its burst of 100); set, they apply per peer host."""
    async with (
        running_registry(tmp_path / "off", health_interval=3600.0) as server,
        open_channel(server) as channel,
        client(server) as anyone,
    ):
        stub = pb_grpc.PluginRegistryStub(channel)
        calls = []
        try:
            for _ in range(70):
                call = stub.Watch(pb.WatchRequest())
                calls.append(call)
                assert (await call.read()).snapshot
        finally:
            for call in calls:
                call.cancel()
        for n in range(110):
            await anyone.register(ingestor(f"open-{n}"), f"127.0.0.1:{41000 + n}", no_lease=True)

    async with (
        running_registry(tmp_path / "on", max_streams_per_principal=1) as server,
        open_channel(server) as channel,
    ):
        stub = pb_grpc.PluginRegistryStub(channel)
        first = stub.Watch(pb.WatchRequest())
        try:
            assert (await first.read()).snapshot
            second = await outcome(stub.Watch(pb.WatchRequest()).read())
        finally:
            first.cancel()
        assert second.code == CODE.RESOURCE_EXHAUSTED, second
        assert "max_streams_per_principal" in second.details
        assert "127.0.0.1" in second.details  # the peer host stands in for a principal


# -- 4. the address policy at Register and before a dial ------------------------------------


REFUSED_ADDRESSES = [
    ("169.254.169.254:80", "address policy"),
    ("[::ffff:169.254.169.254]:80", "address policy"),
    ("0.0.0.0:80", "address policy"),
    ("[fe80::1]:80", "address policy"),
    ("[::]:80", "address policy"),
    ("224.0.0.1:80", "address policy"),
    ("100.100.100.200:80", "address policy"),
    ("[fd00:ec2::254]:80", "address policy"),
    ("[::ffff:a9fe:a9fe]:80", "address policy"),
    ("2130706433:80", "numeric host"),
    ("0x7f000001:80", "numeric host"),
    ("127.1:80", "numeric host"),
    ("0177.0.0.1:80", "numeric host"),
    ("unix://x", "unix://authority"),
    ("dns:x:1", "gRPC reads as its own scheme"),
    ("ipv4:127.0.0.1:1", "gRPC reads as its own scheme"),
    ("[fe80::1%25eth0]:80", "zone id"),
    ("unix:/tmp/x.sock", "address policy"),  # no --allow-unix-dir
    ("metadata.test:80", "address policy"),  # a name that resolves to 169.254.169.254
]


async def test_register_refuses_addresses_by_form_and_policy(tmp_path: Path, policy: Path) -> None:
    resolver = StaticResolver({"metadata.test": ["127.0.0.1", "169.254.169.254"]})
    async with (
        Canary() as canary,
        secured(tmp_path, policy, resolver=resolver) as server,
        client(server, ADMIN) as admin,
    ):
        wrong = []
        for n, (address, words) in enumerate(REFUSED_ADDRESSES):
            try:
                await admin.register(ingestor(f"addr-{n}"), address, no_lease=True)
            except InvalidArgument as exc:
                if exc.field != "address" or words not in str(exc):
                    wrong.append(f"{address}: {exc}")
            else:
                wrong.append(f"{address}: accepted")
        assert not wrong, "\n".join(wrong)
        assert await admin.list_plugins() == []
        # Control: the same registry accepts the canary's loopback address.
        await admin.register(ingestor("addr-ok"), f"127.0.0.1:{canary.port}", no_lease=True)
        await eventually(lambda: canary.connections, what="the health check of a good address")


async def test_off_loopback_registry_refuses_loopback_plugins(tmp_path: Path, policy: Path) -> None:
    """Listening on all interfaces, the default allows the private ranges, not loopback."""
    async with (
        Canary() as canary,
        secured(tmp_path, policy, listen="0.0.0.0:0") as server,
        client(server, ADMIN) as admin,
    ):
        for address in (f"127.0.0.1:{canary.port}", f"localhost:{canary.port}", "[::1]:80"):
            text = await refused(admin.register(ingestor("loop"), address, no_lease=True),
                                 InvalidArgument)  # fmt: skip
            assert "address policy" in text, text
        assert await admin.list_plugins() == []
        assert canary.connections == 0


async def test_dns_rebinding_after_register_is_never_dialled(tmp_path: Path, policy: Path) -> None:
    """The name is vetted at Register, then again before the dial: a flip to a refused
    address (the canary's 127.0.0.1) is caught there, and nothing connects to it."""
    async with Canary() as canary:
        resolver = RebindingResolver({"plugin.test": ["127.0.0.2"]})
        resolver.rebind("plugin.test", 1, "127.0.0.1")  # Register's lookup is the first
        async with (
            secured(
                tmp_path, policy, resolver=resolver, allow_addresses=("127.0.0.2/32",),
                health_interval=0.2, unhealthy_threshold=1,
            ) as server,
            client(server, ADMIN) as admin,
        ):  # fmt: skip
            registered = await admin.register(
                ingestor("rebound"), f"plugin.test:{canary.port}", no_lease=True
            )
            assert registered.accepted

            async def checked() -> pb.RegisteredPlugin | None:
                plugin = await admin.get_plugin(registered.plugin_id)
                return plugin if plugin.status == pb.PLUGIN_STATUS_UNHEALTHY else None

            plugin = await eventually(checked, within=DEADLINE, what="a failed check")
            assert "address policy" in plugin.last_error, plugin.last_error
            assert "127.0.0.1" not in plugin.last_error  # no DNS oracle
            # Later checks resolve and refuse again; none of them dials either.
            await eventually(lambda: len(resolver.lookups) >= 3, what="a second check")
        assert canary.connections == 0


async def test_the_dial_reaches_the_ip_vetted_at_check_time(tmp_path: Path, policy: Path) -> None:
    """Control for the test above: allowed, the same name is dialled (at the canary)."""
    async with Canary() as canary:
        resolver = StaticResolver({"plugin.test": ["127.0.0.1"]})
        async with (
            secured(
                tmp_path, policy, resolver=resolver, allow_addresses=("127.0.0.1/32",)
            ) as server,
            client(server, ADMIN) as admin,
        ):
            await admin.register(ingestor("direct"), f"plugin.test:{canary.port}", no_lease=True)
            await eventually(lambda: canary.connections, what="a dial of the canary")


# -- 5. audit ---------------------------------------------------------------------------


async def test_audit_logs_every_accepted_write_and_never_a_token(
    tmp_path: Path, policy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        secured(tmp_path, policy) as server,
        client(server, A) as a,
        client(server, ADMIN) as admin,
        client(server, B) as b,
    ):
        registered = await a.register(ingestor("team-a-audit", "audit-src"), DEAD, no_lease=True)
        await refused(b.unregister(registered.plugin_id), PermissionDenied)  # not accepted
        await refused(b.register(ingestor("team-a-audit"), DEAD, no_lease=True), PermissionDenied)
        await a.unregister(registered.plugin_id)
        await a.unregister(registered.plugin_id)  # nothing left to remove: no write
        await admin.release("team-a-audit")
        await admin.release("team-a-audit")  # nothing left to release: no write
        # Calls that fail authentication with a token must not echo it either.
        async with RegistryClient(target(server), token=A.token + "x") as bad:
            with pytest.raises(RegistryError):
                await bad.list_plugins()
        revision = server.state.catalog.revision

    lines = [r.getMessage() for r in caplog.records if r.name == "registry.audit"]
    assert len(lines) == 3, lines
    register, unregister, release = lines
    for line in lines:
        assert "peer=ipv4:127.0.0.1:" in line, line
        assert "name=team-a-audit" in line, line
    assert "principal=team-a " in register
    assert f"id={registered.plugin_id}" in register
    assert f"revision={revision - 1}" in register
    assert "principal=team-a " in unregister
    assert f"id={registered.plugin_id}" in unregister
    assert f"revision={revision}" in unregister
    assert "principal=admin " in release
    assert "team-a" in release.partition("name=")[2]  # whose ownership was released
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for token in [*TOKENS, A.token + "x"]:
        assert token not in text


async def test_audit_of_release_carries_a_revision(
    tmp_path: Path, policy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="registry.audit")
    async with secured(tmp_path, policy) as server, client(server, ADMIN) as admin:
        await admin.register(ingestor("released"), DEAD, no_lease=True)
        await admin.release("released")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("release")]
    assert "revision=" in line


# -- 6. a database that fails -------------------------------------------------------------


# What a failed write's log line holds (the SQL, its parameters, the driver, the file) and a
# client must never hear; "during" is the name of the plugin in the lost write.
LEAKS = ("no such table", "INSERT", "[SQL", "sqlite", "OperationalError", "registry.db",
         "Traceback", "parameters", "during")  # fmt: skip


async def test_a_failed_write_tells_the_client_nothing_of_the_database(
    tmp_path: Path, policy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    database = tmp_path / "registry.db"
    async with secured(tmp_path, policy) as server, client(server, ADMIN) as admin:
        await admin.register(ingestor("before"), DEAD, no_lease=True)
        # Another connection drops a table the next write needs: the write really fails.
        with contextlib.closing(sqlite3.connect(database, timeout=10)) as other:
            other.execute("DROP TABLE changes")
            other.commit()
        details = []
        for name in ("during", "again"):
            with pytest.raises(RegistryUnavailable) as caught:
                await admin.register(ingestor(name), DEAD, no_lease=True)
            details.append(str(caught.value))
        # Reads still answer, from memory.
        assert [p.info.name for p in await admin.list_plugins()] == ["before"]

        cli = await asyncio.create_subprocess_exec(
            *CLI, "register", "--registry", target(server), "--token", ADMIN.token,
            "--name", "by-cli", "--address", DEAD, "--source", "by-cli",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("POLKU_REGISTRY")},
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(cli.communicate(), DEADLINE * 3)

    assert "no such table" in caplog.text  # the log has the real reason...
    audited = [r.getMessage() for r in caplog.records if r.name == "registry.audit"]
    assert len(audited) == 1, audited  # only the write that was stored
    assert "name=before" in audited[0]
    lines = stderr.decode().strip().splitlines()
    assert cli.returncode == 1, (stdout, stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("polku-registry: error: ")
    assert "UNAVAILABLE" in lines[0] or "unavailable" in lines[0]
    details.append(lines[0])
    for text in details:  # ...the client hears none of it
        for leak in (*LEAKS, str(tmp_path)):
            assert leak not in text, (leak, text)
        assert "retry" in text
