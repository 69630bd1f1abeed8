"""What a client refuses before it dials, and how it reads the registry's refusals.

No server here: every refusal must happen in the constructor, before any channel exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
import trustme

from ingestor.resolver import RegistryResolver
from registry.client import RegistryClient, error_from_rpc, is_loopback_target
from registry.errors import (
    AlreadyExists,
    InvalidArgument,
    PermissionDenied,
    RegistryError,
    RegistryUnavailable,
    ResourceExhausted,
    Unauthenticated,
)
from registry.sdk import PluginHost, run_plugin
from registry.trust.tls import TlsFiles
from registry.wire import event_pb, pb

TOKEN = "tok-3f9a1c77d2"
INFO = {"name": "lines", "sources": ["lines"]}


def ingest(request: pb.IngestRequest) -> list[event_pb.Event]:
    return []


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


OFF_HOST = [
    "10.1.2.3:50051",
    "example.com:443",
    "http://10.0.0.1:1",
    "http://example.com:80",
    "[2001:db8::1]:50051",
    "[::ffff:10.0.0.1]:1",
    "localhost.example.com:1",
    "127.1:50051",  # gRPC's resolver might read it as 127.0.0.1, we do not guess
    "2130706433:1",
    "dns:///localhost:1",
    "ipv4:127.0.0.1:1",
    "::1:50051",  # bracketless IPv6 with a port: ambiguous
    "0.0.0.0:1",
]


@pytest.mark.parametrize("address", OFF_HOST)
def test_a_token_is_never_sent_in_clear_off_the_host(address: str) -> None:
    # A plain (not async) test: without an event loop no channel could even be made.
    with pytest.raises(RegistryError, match="use https:// or TLS") as caught:
        RegistryClient(address, token=TOKEN)
    message = str(caught.value)
    assert "\n" not in message
    assert TOKEN not in message
    assert address in message


LOOPBACK = [
    "127.0.0.1:50051",
    "127.42.0.9:1",
    "localhost:50051",
    "LocalHost:1",
    "[::1]:50051",
    "[::ffff:127.0.0.1]:1",
    "http://127.0.0.1:1",
    "http://localhost:1",
    "unix:/run/polku/registry.sock",
]


@pytest.mark.parametrize("address", LOOPBACK)
def test_a_token_may_go_in_clear_on_the_host(address: str) -> None:
    client = RegistryClient(address, token=TOKEN)
    assert not client.secure
    assert is_loopback_target(client._target)


@pytest.mark.parametrize("address", ["https://example.com:443", "https://10.1.2.3:50051"])
def test_a_token_may_go_anywhere_over_tls(address: str) -> None:
    assert RegistryClient(address, token=TOKEN).secure


@pytest.mark.parametrize("address", ["example.com:443", "http://10.0.0.1:1", "unix:/x.sock"])
def test_tls_files_make_any_address_form_tls(address: str, ca_file: Path) -> None:
    assert RegistryClient(address, token=TOKEN, tls=TlsFiles(ca=ca_file)).secure


def test_no_token_keeps_every_address_form() -> None:
    for address in [*OFF_HOST, *LOOPBACK]:
        assert not RegistryClient(address).secure


@pytest.mark.parametrize("token", ["", "two words", "line\n", "t\u00e9"])
def test_a_malformed_token_is_refused_without_echo(token: str) -> None:
    with pytest.raises(RegistryError, match="token: ") as caught:
        RegistryClient("127.0.0.1:1", token=token)
    assert not token or token not in str(caught.value)


def test_the_token_never_shows(ca_file: Path) -> None:
    client = RegistryClient("https://registry.internal:443", token=TOKEN, tls=TlsFiles(ca=ca_file))
    for text in (repr(client), str(client), repr(vars(client)), repr(client._interceptors)):
        assert TOKEN not in text
    assert "<redacted>" in repr(client)
    assert "token=None" in repr(RegistryClient("127.0.0.1:1"))


# -- the other clients refuse the same, at construction ----------------------------------------


def test_plugin_host_refuses_a_token_in_clear() -> None:
    with pytest.raises(RegistryError, match=re.escape("in clear to 10.0.0.7:50051")):
        PluginHost(INFO, ingest=ingest, registry="10.0.0.7:50051", token=TOKEN)


def test_run_plugin_reads_the_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLKU_REGISTRY_TOKEN", TOKEN)
    with pytest.raises(RegistryError, match=re.escape("in clear to 10.0.0.7:50051")):
        run_plugin(INFO, ingest=ingest, registry="10.0.0.7:50051")


def test_an_explicit_token_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLKU_REGISTRY_TOKEN", TOKEN)
    with pytest.raises(RegistryError, match="token: empty"):
        run_plugin(INFO, ingest=ingest, registry="127.0.0.1:1", token="")


def test_resolver_refuses_a_token_in_clear() -> None:
    with pytest.raises(RegistryError, match=re.escape("in clear to example.com:50051")):
        RegistryResolver("example.com:50051", token=TOKEN)


def test_resolver_refuses_unreadable_tls_files(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read CA bundle"):
        RegistryResolver("https://localhost:1", tls=TlsFiles(ca=tmp_path / "missing.pem"))


# -- status codes back into errors ------------------------------------------------------------


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_error_from_rpc_maps_the_trust_codes() -> None:
    error = error_from_rpc(rpc_error(grpc.StatusCode.UNAUTHENTICATED, "no identity"))
    assert type(error) is Unauthenticated
    assert str(error) == "no identity"

    error = error_from_rpc(rpc_error(grpc.StatusCode.PERMISSION_DENIED, "needs scope register"))
    assert type(error) is PermissionDenied
    assert str(error) == "needs scope register"

    error = error_from_rpc(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "register_rate: 20/s"))
    assert isinstance(error, ResourceExhausted)
    assert (error.limit, str(error)) == ("register_rate", "register_rate: 20/s")

    # gRPC's own size check has no "limit: " prefix.
    error = error_from_rpc(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large"))
    assert isinstance(error, ResourceExhausted)
    assert (error.limit, str(error)) == ("limit", "limit: message too large")


def test_error_from_rpc_keeps_the_other_mappings() -> None:
    error = error_from_rpc(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "info.name: empty"))
    assert isinstance(error, InvalidArgument)
    assert (error.field, error.reason) == ("info.name", "empty")
    assert type(error_from_rpc(rpc_error(grpc.StatusCode.ALREADY_EXISTS, "x"))) is AlreadyExists
    assert isinstance(
        error_from_rpc(rpc_error(grpc.StatusCode.UNAVAILABLE, "down")), RegistryUnavailable
    )
    other = error_from_rpc(rpc_error(grpc.StatusCode.INTERNAL, "boom"))
    assert type(other) is RegistryError
    assert str(other) == "INTERNAL: boom"
