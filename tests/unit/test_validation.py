"""registration_from_request, check_address and the ListPlugins filters, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from registry.errors import InvalidArgument
from registry.model import PluginStatus, PluginType, Registration
from registry.validation import (
    Limits,
    check_address,
    check_plugin_id,
    plugin_type_filter,
    registration_from_request,
    status_filter,
)
from registry.wire import pb

DEFAULT_TTL = 30


def request(
    *, address: str = "127.0.0.1:50051", request_fields: dict[str, Any] | None = None, **info: Any
) -> pb.RegisterRequest:
    fields: dict[str, Any] = {"name": "k8s-ingestor", "type": pb.PLUGIN_TYPE_INGESTOR}
    fields.setdefault("sources", ["k8s"])
    fields.update(info)
    return pb.RegisterRequest(
        info=pb.PluginInfo(**fields), address=address, **(request_fields or {})
    )


def field_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InvalidArgument) as caught:
        call(*args, **kwargs)
    assert str(caught.value).startswith(f"{caught.value.field}: ")
    assert caught.value.reason
    return caught.value.field


# -- registration_from_request --------------------------------------------------


def test_a_full_request_becomes_a_registration():
    got = registration_from_request(
        request(
            version="1.2.3",
            description="reads pods",
            sources=["k8s", "k8s/events"],
            capabilities=["batch"],
            request_fields={"lease_ttl_seconds": 12, "labels": {"zone": "a"}},
        ),
        DEFAULT_TTL,
    )
    assert got == Registration(
        name="k8s-ingestor",
        type=PluginType.INGESTOR,
        address="127.0.0.1:50051",
        version="1.2.3",
        description="reads pods",
        sources=("k8s", "k8s/events"),
        capabilities=("batch",),
        labels={"zone": "a"},
        lease_ttl_seconds=12,
    )
    assert got.emitter_key == ""


def test_lease_zero_takes_the_default_and_no_lease_takes_none():
    assert registration_from_request(request(), DEFAULT_TTL).lease_ttl_seconds == DEFAULT_TTL
    assert registration_from_request(request(), 7).lease_ttl_seconds == 7
    no_lease = request(request_fields={"no_lease": True})
    assert registration_from_request(no_lease, DEFAULT_TTL).lease_ttl_seconds == 0


def test_an_emitter_is_keyed_by_its_emitter_name_else_its_name():
    named = registration_from_request(
        request(name="es", type=pb.PLUGIN_TYPE_EMITTER, sources=[], emitter_name="elastic"),
        DEFAULT_TTL,
    )
    assert named.type is PluginType.EMITTER
    assert named.emitter_key == "elastic"
    plain = registration_from_request(
        request(name="stdout", type=pb.PLUGIN_TYPE_EMITTER, sources=[]), DEFAULT_TTL
    )
    assert plain.emitter_key == "stdout"


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (pb.RegisterRequest(address="h:1"), "info"),
        (request(name=""), "info.name"),
        (request(name="has space"), "info.name"),
        (request(name=".dot"), "info.name"),
        (request(name="a" * 64), "info.name"),
        (request(name="trailing\n"), "info.name"),
        (request(type=pb.PLUGIN_TYPE_UNSPECIFIED), "info.type"),
        (request(type=99), "info.type"),
        (request(sources=[]), "info.sources"),
        (request(sources=["ok", "not ok"]), "info.sources[1]"),
        (request(sources=["a", "a"]), "info.sources[1]"),
        (request(sources=[f"s{i}" for i in range(65)]), "info.sources"),
        (request(type=pb.PLUGIN_TYPE_EMITTER, sources=[], emitter_name="x y"), "info.emitter_name"),
        (request(version="v" * 65), "info.version"),
        (request(description="d" * 1025), "info.description"),
        (request(description="bell\a"), "info.description"),
        (request(capabilities=["c" * 65]), "info.capabilities[0]"),
        (request(capabilities=[f"c{i}" for i in range(33)]), "info.capabilities"),
        (request(address=""), "address"),
        (request(address="nope"), "address"),
        (request(request_fields={"labels": {"-bad": "v"}}), "labels"),
        (request(request_fields={"labels": {"k": "v" * 257}}), "labels[k]"),
        (request(request_fields={"labels": {f"k{i}": "" for i in range(33)}}), "labels"),
        (request(request_fields={"lease_ttl_seconds": 3601}), "lease_ttl_seconds"),
        (
            request(request_fields={"lease_ttl_seconds": 5, "no_lease": True}),
            "lease_ttl_seconds",
        ),
    ],
)
def test_bad_requests_name_the_field(req, field):
    assert field_of(registration_from_request, req, DEFAULT_TTL) == field


def test_an_out_of_range_default_lease_is_refused_too():
    assert field_of(registration_from_request, request(), 3601) == "lease_ttl_seconds"


@pytest.mark.parametrize("ttl", [1, 2, 3, 3600])
def test_leases_from_1_s_to_1_h_are_granted(ttl):
    """SPEC §7: etcd allows 2 s; tests and fast fail-over use 1-3 s."""
    asked = request(request_fields={"lease_ttl_seconds": ttl})
    assert registration_from_request(asked, DEFAULT_TTL).lease_ttl_seconds == ttl
    assert registration_from_request(request(), ttl).lease_ttl_seconds == ttl  # as the default


def test_limits_are_configurable():
    tight = Limits(max_name=5, max_sources=1, min_lease_ttl=1, max_lease_ttl=10)
    assert field_of(registration_from_request, request(name="sixsix"), 5, tight) == "info.name"
    two_sources = request(name="abc", sources=["a", "b"])
    assert field_of(registration_from_request, two_sources, 5, tight) == "info.sources"
    ok = registration_from_request(
        request(name="abc", request_fields={"lease_ttl_seconds": 1}), 5, tight
    )
    assert ok.lease_ttl_seconds == 1


# -- check_address ------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:50051",
        "localhost:1",
        "my-plugin.default.svc.cluster.local:65535",
        "[::1]:50051",
        "[2001:db8::1]:443",
        "http://h:1",
        "https://h:1",
        "http://[::1]:8080",
        "unix:/tmp/x.sock",
    ],
)
def test_accepted_addresses(address):
    assert check_address("address", address) == address


@pytest.mark.parametrize(
    "address",
    [
        "",
        "h",
        "h:",
        ":1",
        "h:0",
        "h:65536",
        "h:70000",
        "h:-1",
        "h:+1",
        "host:abc",
        "h:1.5",
        "ftp://h:1",
        "grpc://h:1",
        "http://h",
        "https://:1",
        "http://h:1/",
        "[::1",
        "[::1]",
        "[zz]:1",
        "[1.2.3.4]:1",
        "::1:50051",
        "unix:relative",
        "unix:",
        "unix:/",
        "bad host:1",
        "-leading.dash:1",
        "h:1\n",
        "a" * 252 + ":1234",
        # Accepted before the one address parser (registry.trust.addresses): gRPC reads
        # unix:///x as unix://authority/path, and host names are LDH (no underscore).
        "unix:///tmp/x.sock",
        "under_score:80",
    ],
)
def test_refused_addresses(address):
    assert field_of(check_address, "address", address) == "address"


def test_a_superscript_port_is_invalid_argument():
    """Regression: '²'.isdigit() is True but int('²') raised ValueError."""
    assert field_of(check_address, "address", "h:²") == "address"


def test_a_non_ascii_digit_port_is_refused():
    """Regression: Arabic-Indic digits passed as port 12."""
    assert field_of(check_address, "address", "h:\u0661\u0662") == "address"


def test_the_field_name_is_the_one_given():
    assert field_of(check_address, "endpoint.address", "nope") == "endpoint.address"


# -- plugin ids and list filters ------------------------------------------------


def test_check_plugin_id():
    assert check_plugin_id("plugin_id", "01ARZ3NDEKTSV4RRFFQ69G5FAV") == (
        "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    )
    assert field_of(check_plugin_id, "plugin_id", "") == "plugin_id"
    assert field_of(check_plugin_id, "plugin_id", "x" * 65) == "plugin_id"


def test_plugin_type_filter():
    assert plugin_type_filter(0) is PluginType.UNSPECIFIED
    assert plugin_type_filter(2) is PluginType.EMITTER
    assert field_of(plugin_type_filter, 99) == "type"
    assert field_of(plugin_type_filter, -1) == "type"


def test_status_filter():
    assert status_filter([]) == frozenset()
    assert status_filter([2, 4, 2]) == {PluginStatus.HEALTHY, PluginStatus.EXPIRED}
    assert field_of(status_filter, [2, 99]) == "statuses[1]"
    assert field_of(status_filter, [0]) == "statuses[0]"
