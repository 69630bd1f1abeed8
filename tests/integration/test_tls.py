"""TLS for the registry and its clients: credentials, mTLS, reload, bearer tokens.

Each test serves a canned PluginRegistry on 127.0.0.1:0 with the registry's own
:class:`ServerCredentials` and talks to it through the real clients (RegistryClient,
the SDK's PluginHost, the gateway's RegistryResolver). Certificates come from trustme.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from google.protobuf.empty_pb2 import Empty

from ingestor.resolver import RegistryResolver
from registry.client import RegistryClient
from registry.errors import RegistryError, RegistryUnavailable, Unauthenticated
from registry.sdk import Backoff, PluginHost
from registry.testing import eventually
from registry.trust.tls import ServerCredentials, TlsFiles
from registry.wire import event_pb, pb, pb_grpc

TOKEN = "s3cr3t-token.value~1"
BEARER = ("authorization", f"Bearer {TOKEN}")


# -- certificates on disk -----------------------------------------------------------------


def write_leaf(leaf: trustme.LeafCert, folder: Path, name: str) -> TlsFiles:
    """A leaf's chain and key as files ``name.pem`` / ``name.key`` under ``folder``."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return TlsFiles(cert=cert, key=key)


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


def replace_file(path: Path, data: bytes) -> None:
    """Swap a file's content atomically, as a deploy tool would, and move its mtime on."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(data)
    before = path.stat().st_mtime_ns
    os.utime(staging, ns=(before + 10**9, before + 10**9))
    os.replace(staging, path)


def leaf_bytes(leaf: trustme.LeafCert) -> tuple[bytes, bytes]:
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems), leaf.private_key_pem.bytes()


@dataclass
class Pki:
    folder: Path
    ca: trustme.CA
    ca_file: Path
    server: TlsFiles  # cert and key only

    def server_files(self, client_ca: Path | None = None) -> TlsFiles:
        return TlsFiles(ca=client_ca, cert=self.server.cert, key=self.server.key)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    return Pki(
        tmp_path, ca, write_ca(ca, tmp_path / "ca.pem"), write_leaf(leaf, tmp_path, "server")
    )


# -- a canned registry that records what it was sent ----------------------------------------


@dataclass
class Seen:
    method: str
    metadata: dict[str, str]
    peer_identities: tuple[bytes, ...]


@dataclass
class CannedRegistry(pb_grpc.PluginRegistryServicer):
    """Answers a few RPCs with fixed messages and records each call's metadata."""

    require_token: bool = False
    seen: list[Seen] = field(default_factory=list)

    async def _record(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        identities = tuple(context.auth_context().get("x509_common_name", ()))
        self.seen.append(Seen(method, metadata, identities))
        if self.require_token and metadata.get("authorization") != BEARER[1]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no identity")

    def methods(self, method: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.method == method]

    async def ListPlugins(self, request, context):
        await self._record("ListPlugins", context)
        return pb.ListPluginsResponse()

    async def Register(self, request, context):
        await self._record("Register", context)
        return pb.RegisterResponse(
            accepted=True, plugin_id="01PLUGIN", lease_ttl_seconds=60, heartbeat_interval_seconds=20
        )

    async def Heartbeat(self, request, context):
        await self._record("Heartbeat", context)
        return pb.HeartbeatResponse(acknowledged=True)

    async def Unregister(self, request, context):
        await self._record("Unregister", context)
        return Empty()

    async def Release(self, request, context):
        await self._record("Release", context)
        return pb.ReleaseResponse(released=True, principal="team-a")

    async def Watch(self, request, context):
        await self._record("Watch", context)
        yield pb.WatchResponse(revision=7, snapshot=True)
        if request.since_revision == 0:
            await asyncio.Event().wait()  # an open stream, as the registry keeps it


@contextlib.asynccontextmanager
async def serving(
    credentials: ServerCredentials | None, servicer: CannedRegistry | None = None
) -> AsyncIterator[tuple[int, CannedRegistry]]:
    """The canned registry on 127.0.0.1:0, over TLS unless ``credentials`` is None."""
    servicer = servicer or CannedRegistry()
    server = grpc.aio.server()
    pb_grpc.add_PluginRegistryServicer_to_server(servicer, server)
    add_streams(server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials.credentials())
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(None)


# Client- and bidirectional-streaming methods (the PluginRegistry stub has none yet;
# KeepAlive will be one): they echo the authorization header they received.
STREAM_UNARY = "/test.Echo/StreamUnary"
STREAM_STREAM = "/test.Echo/StreamStream"


def _authorization(context: grpc.aio.ServicerContext) -> bytes:
    return dict(context.invocation_metadata() or ()).get("authorization", "").encode()


def add_streams(server: grpc.aio.Server) -> None:
    async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
        async for _ in requests:
            pass
        return _authorization(context)

    async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield _authorization(context)

    handlers = {
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", handlers)])


async def reaches(address: str, **client: Any) -> bool:
    """Whether a fresh client completes a call: a new channel, so a new handshake."""
    async with RegistryClient(address, timeout=5, **client) as registry:
        try:
            await registry.list_plugins()
        except RegistryUnavailable:
            return False
    return True


# -- credentials --------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["https://localhost:{port}", "https://127.0.0.1:{port}"])
async def test_tls_with_the_ca_given(pki: Pki, form: str) -> None:
    async with serving(ServerCredentials(pki.server_files())) as (port, servicer):
        address = form.format(port=port)
        client = RegistryClient(address, tls=TlsFiles(ca=pki.ca_file))
        async with client:
            assert client.secure
            assert await client.list_plugins() == []
    assert [seen.method for seen in servicer.seen] == ["ListPlugins"]


async def test_tls_files_make_a_bare_address_tls(pki: Pki) -> None:
    async with serving(ServerCredentials(pki.server_files())) as (port, _):
        assert await reaches(f"127.0.0.1:{port}", tls=TlsFiles(ca=pki.ca_file))
        assert await reaches(f"http://localhost:{port}", tls=TlsFiles(ca=pki.ca_file))


async def test_a_tls_server_refuses_what_cannot_verify_it(pki: Pki, tmp_path: Path) -> None:
    foreign_ca = write_ca(trustme.CA(), tmp_path / "foreign-ca.pem")
    async with serving(ServerCredentials(pki.server_files())) as (port, servicer):
        assert not await reaches(f"127.0.0.1:{port}")  # plaintext to a TLS port
        assert not await reaches(f"https://127.0.0.1:{port}")  # the system roots
        assert not await reaches(f"https://127.0.0.1:{port}", tls=TlsFiles(ca=foreign_ca))
        # A name the certificate does not carry: 127.0.0.2 is loopback, but not in the SAN.
        assert not await reaches(f"https://127.0.0.2:{port}", tls=TlsFiles(ca=pki.ca_file))
    assert servicer.seen == []


# -- mTLS ---------------------------------------------------------------------------------


@pytest.fixture
def client_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    return ca, write_ca(ca, tmp_path / "client-ca.pem")


async def test_mtls_needs_a_client_certificate_from_the_client_ca(
    pki: Pki, client_ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    ca, ca_file = client_ca
    good = write_leaf(ca.issue_cert("team-a.clients", common_name="team-a"), tmp_path, "good")
    foreign = write_leaf(trustme.CA().issue_cert("team-a.clients"), tmp_path, "foreign")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    expired = write_leaf(
        ca.issue_cert(
            "team-a.clients", not_before=past - datetime.timedelta(days=30), not_after=past
        ),
        tmp_path,
        "expired",
    )
    address = "https://localhost:{port}"

    def tls(leaf: TlsFiles | None) -> TlsFiles:
        if leaf is None:
            return TlsFiles(ca=pki.ca_file)
        return TlsFiles(ca=pki.ca_file, cert=leaf.cert, key=leaf.key)

    credentials = ServerCredentials(pki.server_files(client_ca=ca_file))
    assert credentials.requires_client_certificate
    async with serving(credentials) as (port, servicer):
        target = address.format(port=port)
        assert not await reaches(target, tls=tls(None))
        assert not await reaches(target, tls=tls(foreign))
        assert not await reaches(target, tls=tls(expired))
        assert servicer.seen == []
        assert await reaches(target, tls=tls(good))
    assert [seen.peer_identities for seen in servicer.seen] == [(b"team-a",)]


async def test_without_a_client_ca_no_client_certificate_is_asked(pki: Pki) -> None:
    credentials = ServerCredentials(pki.server_files())
    assert not credentials.requires_client_certificate
    async with serving(credentials) as (port, servicer):
        assert await reaches(f"https://localhost:{port}", tls=TlsFiles(ca=pki.ca_file))
    assert servicer.seen[0].peer_identities == ()


# -- reload -------------------------------------------------------------------------------


async def test_a_new_certificate_is_served_without_a_restart(pki: Pki, tmp_path: Path) -> None:
    new_ca = trustme.CA()
    new_ca_file = write_ca(new_ca, tmp_path / "new-ca.pem")
    chain, key = leaf_bytes(new_ca.issue_cert("localhost", "127.0.0.1"))
    async with serving(ServerCredentials(pki.server_files())) as (port, _):
        address = f"https://127.0.0.1:{port}"
        assert await reaches(address, tls=TlsFiles(ca=pki.ca_file))
        assert not await reaches(address, tls=TlsFiles(ca=new_ca_file))

        replace_file(pki.server.key, key)
        replace_file(pki.server.cert, chain)

        await eventually(
            lambda: reaches(address, tls=TlsFiles(ca=new_ca_file)),
            what="a client trusting only the new CA to connect",
        )
        assert not await reaches(address, tls=TlsFiles(ca=pki.ca_file))


async def test_a_broken_new_key_keeps_the_old_certificate(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.trust.tls")
    stranger_key = trustme.CA().issue_cert("localhost").private_key_pem.bytes()
    async with serving(ServerCredentials(pki.server_files())) as (port, _):
        address = f"https://127.0.0.1:{port}"
        replace_file(pki.server.key, stranger_key)  # a key that does not match the cert
        for _ in range(3):  # every handshake checks the files; only the first one warns
            assert await reaches(address, tls=TlsFiles(ca=pki.ca_file))

        warnings = [r for r in caplog.records if r.name == "registry.trust.tls"]
        assert len(warnings) == 1
        assert warnings[0].levelno == logging.WARNING
        message = warnings[0].getMessage()
        assert str(pki.server.key) in message
        assert "does not belong" in message
        assert "PRIVATE KEY" not in message

        replace_file(pki.server.key, b"-----BEGIN PRIVATE KEY-----\nhalf a ke")  # half-written
        assert await reaches(address, tls=TlsFiles(ca=pki.ca_file))
        assert len([r for r in caplog.records if r.name == "registry.trust.tls"]) == 2
    assert "half a ke" not in caplog.text


async def test_the_files_are_checked_per_handshake_not_per_call(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = ServerCredentials(pki.server_files())
    checks = 0
    check = credentials._current

    def counting() -> Any:
        nonlocal checks
        checks += 1
        return check()

    monkeypatch.setattr(credentials, "_current", counting)
    async with serving(credentials) as (port, _):
        address = f"https://localhost:{port}"
        async with RegistryClient(address, tls=TlsFiles(ca=pki.ca_file)) as client:
            await client.list_plugins()
            after_handshake = checks
            for _ in range(20):
                await client.list_plugins()
            assert checks == after_handshake >= 1
        assert await reaches(address, tls=TlsFiles(ca=pki.ca_file))
        assert checks > after_handshake


# -- bearer tokens ------------------------------------------------------------------------


async def test_the_token_goes_with_every_kind_of_call(pki: Pki) -> None:
    async with serving(ServerCredentials(pki.server_files())) as (port, servicer):
        client = RegistryClient(
            f"https://localhost:{port}", token=TOKEN, tls=TlsFiles(ca=pki.ca_file)
        )
        async with client:
            await client.list_plugins()  # unary, wrapped
            assert (await client.release("lines")).principal == "team-a"
            async for message in client.watch(since_revision=3):  # server stream, wrapped
                assert message.revision == 7
            # Through the stub, as the SDK and the resolver use it; our token replaces theirs.
            await client.stub.Heartbeat(
                pb.HeartbeatRequest(plugin_id="x"),
                metadata=(("authorization", "Bearer someone-else"), ("x-trace", "1")),
                timeout=5,
            )
            async for message in client.stub.Watch(pb.WatchRequest(since_revision=3), timeout=5):
                assert message.snapshot

            channel = client._channel
            assert channel is not None
            stream_unary = channel.stream_unary(STREAM_UNARY)
            assert await stream_unary(iter([b"a", b"b"]), timeout=5) == BEARER[1].encode()
            stream_stream = channel.stream_stream(STREAM_STREAM)
            replies = [reply async for reply in stream_stream(iter([b"a"]), timeout=5)]
            assert replies == [BEARER[1].encode()]

    assert [seen.method for seen in servicer.seen] == [
        "ListPlugins",
        "Release",
        "Watch",
        "Heartbeat",
        "Watch",
    ]
    for seen in servicer.seen:
        assert seen.metadata["authorization"] == BEARER[1], seen.method
    assert servicer.methods("Heartbeat")[0].metadata["x-trace"] == "1"


async def test_a_token_over_plaintext_loopback(pki: Pki) -> None:
    async with serving(None, CannedRegistry(require_token=True)) as (port, servicer):
        async with RegistryClient(f"127.0.0.1:{port}", token=TOKEN) as client:
            await client.list_plugins()
        async with RegistryClient(f"127.0.0.1:{port}") as anonymous:
            with pytest.raises(Unauthenticated, match="no identity"):
                await anonymous.list_plugins()
    assert [seen.metadata.get("authorization") for seen in servicer.seen] == [BEARER[1], None]


async def test_no_token_no_authorization_header(pki: Pki) -> None:
    async with serving(ServerCredentials(pki.server_files())) as (port, servicer):
        assert await reaches(f"https://localhost:{port}", tls=TlsFiles(ca=pki.ca_file))
    assert "authorization" not in servicer.seen[0].metadata


# -- the other clients pass token and TLS through ---------------------------------------------


async def test_plugin_host_registers_over_tls_with_its_token(pki: Pki) -> None:
    def ingest(request: pb.IngestRequest) -> list[event_pb.Event]:
        return []

    async with serving(
        ServerCredentials(pki.server_files()), CannedRegistry(require_token=True)
    ) as (port, servicer):
        host = PluginHost(
            {"name": "lines", "sources": ["lines"]},
            ingest=ingest,
            registry=f"https://localhost:{port}",
            token=TOKEN,
            tls=TlsFiles(ca=pki.ca_file),
            backoff=Backoff(initial=0.05, maximum=0.2),
        )
        async with host:
            assert await host.wait_registered() == "01PLUGIN"
    assert [seen.method for seen in servicer.seen] == ["Register", "Unregister"]
    assert all(seen.metadata["authorization"] == BEARER[1] for seen in servicer.seen)


async def test_resolver_watches_over_tls_with_its_token(pki: Pki) -> None:
    async with serving(
        ServerCredentials(pki.server_files()), CannedRegistry(require_token=True)
    ) as (port, servicer):
        resolver = RegistryResolver(
            f"https://localhost:{port}", token=TOKEN, tls=TlsFiles(ca=pki.ca_file)
        )
        async with resolver:
            view = await resolver.wait_synced_async(10)
            assert view.revision == 7
    assert servicer.methods("Watch")[0].metadata["authorization"] == BEARER[1]


# -- files that do not load ---------------------------------------------------------------


def test_server_credentials_name_the_file_that_does_not_load(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=f"cannot read certificate {missing}"):
        ServerCredentials(TlsFiles(cert=missing, key=pki.server.key))
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValueError, match=f"certificate {junk} holds no valid PEM"):
        ServerCredentials(TlsFiles(cert=junk, key=pki.server.key))
    with pytest.raises(ValueError, match=f"key {junk} holds no PEM private key"):
        ServerCredentials(TlsFiles(cert=pki.server.cert, key=junk))
    other_key = tmp_path / "other.key"
    trustme.CA().issue_cert("x").private_key_pem.write_to_path(str(other_key))
    with pytest.raises(ValueError, match=f"key {other_key} does not belong to certificate"):
        ServerCredentials(TlsFiles(cert=pki.server.cert, key=other_key))
    with pytest.raises(ValueError, match=f"client CA bundle {junk}"):
        ServerCredentials(TlsFiles(ca=junk, cert=pki.server.cert, key=pki.server.key))
    binary = tmp_path / "cert.der"
    binary.write_bytes(pki.ca.cert_pem.bytes().replace(b"-", b"\xff"))
    with pytest.raises(ValueError, match=f"certificate {binary} is not PEM"):
        ServerCredentials(TlsFiles(cert=binary, key=pki.server.key))
    with pytest.raises(ValueError, match="needs a certificate and its key"):
        ServerCredentials(TlsFiles(ca=pki.ca_file))


def test_a_client_names_the_tls_file_that_does_not_load(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(RegistryError, match=f"cannot read CA bundle {missing}") as caught:
        RegistryClient("https://localhost:1", tls=TlsFiles(ca=missing))
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(RegistryError, match=f"key {pki.ca_file} holds no PEM private key"):
        RegistryClient(
            "https://localhost:1",
            tls=TlsFiles(ca=pki.ca_file, cert=pki.server.cert, key=pki.ca_file),
        )
