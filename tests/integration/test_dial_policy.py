"""Every dial of a plugin goes through the address policy (SPEC §6), proved on loopback.

Refusals are proved with a canary: a TCP listener on 127.0.0.1 that counts the
connections it accepts. A refused address must leave it at zero; a positive control
with the canary's IP allowed shows that the same setup does reach it, so the zero
means something. Host names come from a stub resolver; nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
import trustme
from google.protobuf.empty_pb2 import Empty

from ingestor import ExternalIngestor, IngestContext, PluginConnectionError, RegistryResolver
from registry import RegistryClient
from registry.migrate import upgrade
from registry.model import Plugin, PluginStatus, PluginType, Registration
from registry.poller import MAX_PLUGIN_MESSAGE, CheckSettings, HealthChecker
from registry.state import RegistryState
from registry.storage.store import SqlStore
from registry.testing import FakePlugin, eventually, running_registry
from registry.trust.addresses import AddressPolicy, AddressRefused, parse_address, vet
from registry.trust.dial import PluginCredentials
from registry.trust.tls import TlsFiles
from registry.wire import event_pb, pb, pb_grpc

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
DEADLINE = 15.0
GARBAGE = b"HTTP/1.1 400 SECRET-PEER-BYTES \x00\xff\x1b[31m<script>\r\n\r\n" * 4


def allow(*cidrs: str, unix_dirs: Sequence[str] = ()) -> AddressPolicy:
    return AddressPolicy.default("127.0.0.1:0", allow=list(cidrs), unix_dirs=unix_dirs)


class StubResolver:
    """Answers each name from a list of answers, one per lookup, the last one repeated.

    Never touches the network; ``lookups`` counts the lookups of each name.
    """

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: dict[str, int] = {}

    async def resolve(self, host: str, port: int) -> list[IP]:
        count = self.lookups.get(host, 0)
        self.lookups[host] = count + 1
        series = self.answers.get(host)
        if not series:
            raise OSError(f"{host}: not in the stub's table")
        return [ipaddress.ip_address(a) for a in series[min(count, len(series) - 1)]]


class Canary:
    """A TCP listener on 127.0.0.1 counting accepted connections; optionally answers junk."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Canary:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            if self.reply:
                writer.write(self.reply)
                await writer.drain()
            writer.close()
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def checker(tmp_path: Path, **settings: object) -> AsyncIterator[RegistryState]:
    """A real HealthChecker over a real state on SQLite; checks every 0.2 s."""
    store = SqlStore.open(f"sqlite:///{tmp_path / 'registry.db'}")
    await upgrade(store.engine)
    state = RegistryState(store, flush_interval=0.05)
    await state.start()
    options: dict[str, object] = {"interval": 0.2, "timeout": 2.0, "unhealthy_threshold": 3}
    options.update(settings)
    health = HealthChecker(state, CheckSettings(**options))  # type: ignore[arg-type]
    health.start()
    try:
        yield state
    finally:
        await health.stop()
        await state.stop()
        await store.close()


async def register(state: RegistryState, address: str, name: str = "probe") -> Plugin:
    """Store a registration as Register would (no lease: it lives by its checks)."""
    return await state.register(
        Registration(name=name, type=PluginType.INGESTOR, address=address, sources=(name,))
    )


async def checked(state: RegistryState, plugin_id: str, checks: int = 1) -> Plugin:
    """The plugin once it has been checked (``checks`` counts distinct check times)."""
    seen: set[object] = set()

    def probe() -> Plugin | None:
        plugin = state.catalog.get(plugin_id)
        if plugin is not None and plugin.last_check_at is not None:
            seen.add(plugin.last_check_at)
        return plugin if len(seen) >= checks else None

    found: Plugin = await eventually(probe, within=DEADLINE, what=f"{checks} check(s)")
    return found


async def wait_status(state: RegistryState, plugin_id: str, status: PluginStatus) -> Plugin:
    def probe() -> Plugin | None:
        plugin = state.catalog.get(plugin_id)
        return plugin if plugin is not None and plugin.status is status else None

    found: Plugin = await eventually(probe, within=DEADLINE, what=f"{plugin_id} {status.name}")
    return found


# -- (1) DNS rebinding at the health checker --------------------------------------------


async def test_rebinding_between_register_and_dial_is_refused_and_nothing_is_dialled(tmp_path):
    async with Canary() as canary:
        address = f"plugin.test:{canary.port}"
        # First lookup (at Register): an allowed IP. Every later one: the canary's.
        resolver = StubResolver({"plugin.test": [["127.0.0.2"], ["127.0.0.1"]]})
        policy = allow("127.0.0.2/32")
        at_register = await vet(parse_address("address", address), policy, resolver)
        assert at_register.target == f"ipv4:127.0.0.2:{canary.port}"

        async with checker(tmp_path, address_policy=policy, resolver=resolver) as state:
            plugin = await register(state, address)
            found = await checked(state, plugin.plugin_id, checks=3)
            assert resolver.lookups["plugin.test"] >= 3  # each check vetted it again

        assert found.last_error.startswith("refused by the address policy")
        assert "127.0.0.1" not in found.last_error
        assert canary.connections == 0


async def test_positive_control_the_same_setup_reaches_the_canary_when_allowed(tmp_path):
    async with Canary() as canary:
        resolver = StubResolver({"plugin.test": [["127.0.0.1"]]})
        async with checker(
            tmp_path, address_policy=allow("127.0.0.1/32"), resolver=resolver
        ) as state:
            plugin = await register(state, f"plugin.test:{canary.port}")
            await eventually(lambda: canary.connections, within=DEADLINE, what="a connection")
            found = await checked(state, plugin.plugin_id)
        assert canary.connections >= 1
        assert "address policy" not in found.last_error


async def test_a_cached_channel_keeps_its_vetted_ip_when_the_name_moves(tmp_path):
    """The first check vets 127.0.0.2 and dials only there; the name moving to the
    canary's IP later is refused when the channel is made again."""
    async with Canary() as canary:
        resolver = StubResolver({"plugin.test": [["127.0.0.2"], ["127.0.0.1"]]})
        policy = allow("127.0.0.2/32")
        async with checker(tmp_path, address_policy=policy, resolver=resolver) as state:
            plugin = await register(state, f"plugin.test:{canary.port}")

            def refused() -> Plugin | None:
                found = state.catalog.get(plugin.plugin_id)
                ok = found is not None and "address policy" in found.last_error
                return found if ok else None

            found = await eventually(refused, within=DEADLINE, what="the re-vetted refusal")
        # The first dial (127.0.0.2, nothing listening) failed; the next vetting saw the
        # canary's IP and refused it.
        assert resolver.lookups["plugin.test"] >= 2
        assert found.last_error.startswith("refused by the address policy")
        assert canary.connections == 0


# Every refused case is built so that a broken policy would dial loopback (the
# canary), never another address: names resolve to the canary's IP first.
LOOPBACK_THEN_METADATA = {"meta.test": [["127.0.0.1", "169.254.169.254"]]}
LOOPBACK_THEN_MAPPED = {"mapped.test": [["127.0.0.1", "::ffff:169.254.169.254"]]}


@pytest.mark.parametrize(
    ("address", "policy", "answers", "why"),
    [
        ("meta.test:{port}", None, LOOPBACK_THEN_METADATA, "link-local is never dialled"),
        ("mapped.test:{port}", None, LOOPBACK_THEN_MAPPED, "IPv4-mapped"),
        ("127.0.0.1:{port}", AddressPolicy.default("0.0.0.0:1"), {}, "not in the allowed"),
        ("[::ffff:127.0.0.1]:{port}", allow("10.0.0.0/8", "::/0"), {}, "IPv4-mapped"),
        ("nowhere.test:{port}", None, {}, "does not resolve"),
        ("unix:/tmp/polku-canary.sock", None, {}, "unix socket"),
    ],
    ids=[
        "any-address-refused",
        "mapped-metadata",
        "loopback-not-allowed",
        "mapped-judged-as-v4",
        "unresolvable",
        "unix-outside-dirs",
    ],
)
async def test_refused_addresses_are_never_dialled(tmp_path, address, policy, answers, why):
    async with Canary() as canary:
        resolver = StubResolver(answers)
        settings: dict[str, object] = {"resolver": resolver}
        if policy is not None:
            settings["address_policy"] = policy  # else the default: loopback only
        async with checker(tmp_path, **settings) as state:
            plugin = await register(state, address.format(port=canary.port))
            found = await checked(state, plugin.plugin_id, checks=2)
        assert found.last_error.startswith("refused by the address policy (")
        assert why in found.last_error
        assert "169.254.169.254" not in found.last_error
        assert canary.connections == 0


async def test_a_stored_address_that_no_longer_parses_neither_hangs_nor_crashes_the_checker(
    tmp_path,
):
    async with FakePlugin(sources=["ok"]) as good, checker(tmp_path) as state:
        bad = await register(state, "unix:///var/run/x.sock", name="old-form")
        found = await checked(state, bad.plugin_id, checks=2)
        assert found.last_error == "refused by the address policy (not a valid plugin address)"
        # The checker still works for everything else.
        fine = await register(state, good.address, name="ok")
        await wait_status(state, fine.plugin_id, PluginStatus.HEALTHY)


# -- (2) the gateway's ExternalIngestor -------------------------------------------------

CTX = IngestContext("k8s")


@pytest.mark.parametrize(
    ("address", "policy", "answers"),
    [
        ("plugin.test:{port}", allow("127.0.0.2/32"), {"plugin.test": [["127.0.0.1"]]}),
        ("127.0.0.1:{port}", AddressPolicy.default("0.0.0.0:1"), {}),
        ("[::ffff:127.0.0.1]:{port}", allow("10.0.0.0/8", "::/0"), {}),
    ],
    ids=["name-to-refused-ip", "loopback-under-private-default", "mapped-loopback"],
)
async def test_a_refused_static_endpoint_is_never_dialled(address, policy, answers):
    async with Canary() as canary:
        resolver = StubResolver(answers)
        async with ExternalIngestor(
            "k8s",
            address.format(port=canary.port),
            address_policy=policy,
            host_resolver=resolver,
            connect_timeout=2,
        ) as ingestor:
            for _ in range(3):  # every attempt is vetted again, and refused again
                with pytest.raises(PluginConnectionError, match="address policy") as caught:
                    await ingestor.ingest_async(CTX, b"line")
                assert caught.value.address == address.format(port=canary.port)
            with pytest.raises(PluginConnectionError, match="address policy"):
                await ingestor.health_async()
            assert ingestor.channels() == 0
        assert canary.connections == 0


async def test_positive_control_the_ingestor_reaches_the_canary_when_allowed():
    async with Canary() as canary:
        resolver = StubResolver({"plugin.test": [["127.0.0.1"]]})
        async with ExternalIngestor(
            "k8s",
            f"plugin.test:{canary.port}",
            address_policy=allow("127.0.0.1/32"),
            host_resolver=resolver,
            connect_timeout=2,
        ) as ingestor:
            with pytest.raises(PluginConnectionError) as caught:
                await ingestor.ingest_async(CTX, b"line")
        assert "address policy" not in str(caught.value)
        assert canary.connections >= 1


async def test_the_gateway_default_refuses_link_local_and_allows_loopback(plugin_on):
    async with plugin_on("127.0.0.1") as fake:
        async with ExternalIngestor("k8s", fake.address) as ingestor:
            events = await ingestor.ingest_async(CTX, b"a")
        assert [e.payload for e in events] == [b"a"]
    async with (
        Canary() as canary,
        ExternalIngestor(
            "k8s",
            f"meta.test:{canary.port}",
            host_resolver=StubResolver(LOOPBACK_THEN_METADATA),
        ) as ingestor,
    ):
        with pytest.raises(PluginConnectionError, match=r"address policy \(.*169\.254"):
            await ingestor.ingest_async(CTX, b"a")
    assert canary.connections == 0


def test_a_malformed_static_address_fails_at_construction():
    with pytest.raises(ValueError, match="own scheme"):
        ExternalIngestor("k8s", "dns:53")
    with pytest.raises(ValueError, match="dotted quad"):
        ExternalIngestor("k8s", "2130706433:80")


class CountingPlugin:
    """An IngestorPlugin servicer counting Ingest calls (for a plugin on any IP)."""

    def __init__(self) -> None:
        self.ingest_calls = 0

    async def Health(self, request: Empty, context: object) -> pb.PluginHealthResponse:
        return pb.PluginHealthResponse(healthy=True)

    async def Info(self, request: Empty, context: object) -> pb.PluginInfo:
        return pb.PluginInfo(name="fake")

    async def Ingest(self, request: pb.IngestRequest, context: object) -> pb.IngestResponse:
        self.ingest_calls += 1
        return pb.IngestResponse(events=[event_pb.Event(id="1", payload=request.data)])


@pytest.fixture
def plugin_on():
    @contextlib.asynccontextmanager
    async def serve(host: str) -> AsyncIterator[_Served]:
        servicer = CountingPlugin()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_IngestorPluginServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
        try:
            yield _Served(f"{host}:{port}", servicer)
        finally:
            await server.stop(None)

    return serve


class _Served:
    def __init__(self, address: str, servicer: CountingPlugin) -> None:
        self.address = address
        self.servicer = servicer


async def test_a_refused_instance_counts_as_unreachable_and_the_call_moves_on(tmp_path, plugin_on):
    """Two HEALTHY instances in the registry; the gateway's policy refuses one of them:
    every call lands on the other (retried there), and the refused one gets nothing."""
    async with (
        running_registry(tmp_path, health_interval=60) as registry,
        plugin_on("127.0.0.1") as allowed,
        plugin_on("127.0.0.2") as refused,
        RegistryResolver(registry.address) as resolver,
    ):
        async with RegistryClient(registry.address) as client:
            for served, name in ((allowed, "k8s-a"), (refused, "k8s-a")):
                info = pb.PluginInfo(name=name, type=pb.PLUGIN_TYPE_INGESTOR, sources=["k8s"])
                await client.register(info, served.address, no_lease=True)
        await resolver.wait_for_async(lambda view: len(view.endpoints("k8s")) == 2, DEADLINE)

        async with ExternalIngestor(
            "k8s", resolver=resolver, address_policy=allow("127.0.0.1/32")
        ) as ingestor:
            for i in range(4):
                events = await ingestor.ingest_async(CTX, f"call {i}".encode())
                assert [e.payload for e in events] == [f"call {i}".encode()]
        assert allowed.servicer.ingest_calls == 4
        assert refused.servicer.ingest_calls == 0

        # Positive control: the gateway's default policy does route to both.
        async with ExternalIngestor("k8s", resolver=resolver) as ingestor:
            for _ in range(4):
                await ingestor.ingest_async(CTX, b"x")
        assert refused.servicer.ingest_calls >= 1


# -- (3) https:// plugins: the TLS name is kept while the IP is dialled ----------------


class TlsPlugin:
    """A real IngestorPlugin served with TLS on 127.0.0.1 (optionally requiring mTLS)."""

    def __init__(self, cert: trustme.LeafCert, client_ca: trustme.CA | None = None) -> None:
        self.cert = cert
        self.client_ca = client_ca
        self.servicer = CountingHealth()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def __aenter__(self) -> TlsPlugin:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_IngestorPluginServicer_to_server(self.servicer, server)
        credentials = grpc.ssl_server_credentials(
            [
                (
                    self.cert.private_key_pem.bytes(),
                    b"".join(pem.bytes() for pem in self.cert.cert_chain_pems),
                )
            ],
            root_certificates=self.client_ca.cert_pem.bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )
        self.port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        await self._server.stop(None)


class CountingHealth(CountingPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.health_calls = 0

    async def Health(self, request: Empty, context: object) -> pb.PluginHealthResponse:
        self.health_calls += 1
        return pb.PluginHealthResponse(healthy=True)


@pytest.fixture
def pki(tmp_path):
    """A CA, a certificate for plugin.test, and a foreign CA; PEM files under tmp_path."""
    ca, foreign = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("plugin.test")
    client = ca.issue_cert("gateway.test")
    files = {
        "ca": tmp_path / "ca.pem",
        "foreign": tmp_path / "foreign.pem",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    foreign.cert_pem.write_to_path(str(files["foreign"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return ca, leaf, files


async def test_an_https_plugin_is_checked_at_its_vetted_ip_under_its_name(tmp_path, pki):
    _ca, leaf, files = pki
    resolver = StubResolver({"plugin.test": [["127.0.0.1"]]})
    trusted = PluginCredentials(TlsFiles(ca=files["ca"]))
    async with TlsPlugin(leaf) as plugin:
        async with checker(
            tmp_path, address_policy=allow("127.0.0.1/32"), resolver=resolver, plugin_tls=trusted
        ) as state:
            registered = await register(state, f"https://plugin.test:{plugin.port}")
            found = await wait_status(state, registered.plugin_id, PluginStatus.HEALTHY)
        assert found.last_error == ""
        assert plugin.servicer.health_calls >= 1


async def test_an_https_plugin_under_a_foreign_ca_fails_its_check(tmp_path, pki):
    _ca, leaf, files = pki
    resolver = StubResolver({"plugin.test": [["127.0.0.1"]]})
    foreign = PluginCredentials(TlsFiles(ca=files["foreign"]))
    async with TlsPlugin(leaf) as plugin:
        async with checker(
            tmp_path, address_policy=allow("127.0.0.1/32"), resolver=resolver, plugin_tls=foreign
        ) as state:
            registered = await register(state, f"https://plugin.test:{plugin.port}")
            found = await wait_status(state, registered.plugin_id, PluginStatus.UNHEALTHY)
        assert found.last_error == "UNAVAILABLE: unreachable, or not a gRPC server"
        assert plugin.servicer.health_calls == 0


async def test_the_certificate_name_must_match_the_address_name(tmp_path, pki):
    """Dialling the same IP under another name fails: the name is what is verified."""
    _ca, leaf, files = pki
    resolver = StubResolver({"other.test": [["127.0.0.1"]]})
    trusted = PluginCredentials(TlsFiles(ca=files["ca"]))
    async with TlsPlugin(leaf) as plugin:
        async with checker(
            tmp_path, address_policy=allow("127.0.0.1/32"), resolver=resolver, plugin_tls=trusted
        ) as state:
            registered = await register(state, f"https://other.test:{plugin.port}")
            found = await checked(state, registered.plugin_id, checks=2)
        assert found.status is not PluginStatus.HEALTHY
        assert plugin.servicer.health_calls == 0


async def test_mtls_to_a_plugin_with_the_client_certificate(tmp_path, pki):
    ca, leaf, files = pki
    resolver = StubResolver({"plugin.test": [["127.0.0.1"]]})
    mutual = PluginCredentials(
        TlsFiles(ca=files["ca"], cert=files["client_cert"], key=files["client_key"])
    )
    async with TlsPlugin(leaf, client_ca=ca) as plugin:
        async with checker(
            tmp_path, address_policy=allow("127.0.0.1/32"), resolver=resolver, plugin_tls=mutual
        ) as state:
            registered = await register(state, f"https://plugin.test:{plugin.port}")
            await wait_status(state, registered.plugin_id, PluginStatus.HEALTHY)
        # Without a client certificate the plugin refuses the handshake.
        async with ExternalIngestor(
            "k8s",
            f"https://plugin.test:{plugin.port}",
            address_policy=allow("127.0.0.1/32"),
            host_resolver=resolver,
            tls=TlsFiles(ca=files["ca"]),
            connect_timeout=2,
        ) as ingestor:
            with pytest.raises(PluginConnectionError):
                await ingestor.health_async()


async def test_the_ingestor_dials_an_https_plugin_at_its_vetted_ip(pki):
    _ca, leaf, files = pki
    resolver = StubResolver({"plugin.test": [["127.0.0.1"]]})
    async with TlsPlugin(leaf) as plugin:
        address = f"https://plugin.test:{plugin.port}"
        async with ExternalIngestor(
            "k8s",
            address,
            address_policy=allow("127.0.0.1/32"),
            host_resolver=resolver,
            tls=TlsFiles(ca=files["ca"]),
        ) as ingestor:
            events = await ingestor.ingest_async(CTX, b"over tls")
        assert [e.payload for e in events] == [b"over tls"]
        async with ExternalIngestor(
            "k8s",
            address,
            address_policy=allow("127.0.0.1/32"),
            host_resolver=resolver,
            tls=TlsFiles(ca=files["foreign"]),
            connect_timeout=2,
        ) as ingestor:
            with pytest.raises(PluginConnectionError):
                await ingestor.ingest_async(CTX, b"over tls")
        assert plugin.servicer.ingest_calls == 1


# -- (4) last_error never echoes the peer -----------------------------------------------


async def test_last_error_for_a_peer_writing_garbage_holds_none_of_its_bytes(tmp_path):
    async with Canary(reply=GARBAGE) as canary:
        async with checker(tmp_path, address_policy=allow("127.0.0.1/32")) as state:
            plugin = await register(state, f"127.0.0.1:{canary.port}")
            found = await checked(state, plugin.plugin_id, checks=2)
        assert canary.connections >= 1  # it was dialled, and answered its junk
        assert found.last_error in (
            "UNAVAILABLE: unreachable, or not a gRPC server",
            "DEADLINE_EXCEEDED: no answer within 2s",
        ) or found.last_error.endswith(": not a gRPC plugin, or it failed")
        for token in ("SECRET", "HTTP", "400", "script", "\x00", "\x1b"):
            assert token not in found.last_error


async def test_a_grpc_server_without_the_plugin_service_is_not_a_polku_plugin(tmp_path):
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with checker(tmp_path, address_policy=allow("127.0.0.1/32")) as state:
            plugin = await register(state, f"127.0.0.1:{port}")
            found = await checked(state, plugin.plugin_id)
    finally:
        await server.stop(None)
    assert found.last_error == "UNIMPLEMENTED: not a POLKU plugin (Health is not implemented)"


async def test_a_hanging_plugin_is_reported_in_fixed_words(tmp_path):
    async with FakePlugin() as fake, checker(tmp_path, timeout=0.2) as state:
        fake.health_delay = 5.0
        plugin = await register(state, fake.address)
        found = await checked(state, plugin.plugin_id)
    assert found.last_error == "DEADLINE_EXCEEDED: no answer within 0.2s"


async def test_an_unhealthy_plugins_own_message_is_kept_printable_and_short(tmp_path):
    message = "disk \x00full\n\x1b[2J" + "x" * 1000
    async with (
        FakePlugin(healthy=False, health_message=message) as fake,
        checker(tmp_path) as state,
    ):
        plugin = await register(state, fake.address)
        found = await checked(state, plugin.plugin_id)
    assert found.last_error.startswith("disk ?full??[2J")
    assert found.last_error.isprintable()
    assert len(found.last_error) == MAX_PLUGIN_MESSAGE


async def test_a_refused_address_at_register_names_the_address_policy():
    """What the Register handler gets from vet: INVALID_ARGUMENT naming the policy."""
    resolver = StubResolver({"plugin.test": [["127.0.0.1", "169.254.169.254"]]})
    with pytest.raises(AddressRefused) as caught:
        await vet(
            parse_address("address", "https://plugin.test:443"), allow("127.0.0.0/8"), resolver
        )
    assert caught.value.field == "address"
    assert "address policy" in str(caught.value)
