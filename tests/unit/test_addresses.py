"""The one parser and policy of plugin addresses (registry.trust.addresses), no network."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.errors import InvalidArgument
from registry.trust.addresses import (
    AddressPolicy,
    AddressRefused,
    DialTarget,
    PluginAddress,
    SystemResolver,
    parse_address,
    vet,
)

ip = ipaddress.ip_address


def refused(address: str, field: str = "address") -> str:
    """parse_address's reason for refusing ``address``; checks the field is named."""
    with pytest.raises(InvalidArgument) as caught:
        parse_address(field, address)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    return caught.value.reason


# -- parse_address: accepted ----------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "scheme", "host", "port", "path"),
    [
        ("127.0.0.1:50051", "tcp", "127.0.0.1", 50051, ""),
        ("10.1.2.3:1", "tcp", "10.1.2.3", 1, ""),
        ("0.0.0.0:80", "tcp", "0.0.0.0", 80, ""),  # syntax only: the policy refuses it
        ("localhost:65535", "tcp", "localhost", 65535, ""),
        (
            "Plugin-1.Default.SVC.cluster.local:443",
            "tcp",
            "plugin-1.default.svc.cluster.local",
            443,
            "",
        ),
        ("a.b-c.d9:7", "tcp", "a.b-c.d9", 7, ""),
        ("xn--bcher-kva.example:1", "tcp", "xn--bcher-kva.example", 1, ""),
        ("1a.example:1", "tcp", "1a.example", 1, ""),
        ("0x7f.example:1", "tcp", "0x7f.example", 1, ""),  # a name: inet_aton refuses it
        ("[::1]:50051", "tcp", "::1", 50051, ""),
        ("[2001:DB8:0:0::1]:443", "tcp", "2001:db8::1", 443, ""),
        ("[::ffff:127.0.0.1]:1", "tcp", str(ipaddress.ip_address("::ffff:127.0.0.1")), 1, ""),
        ("http://h:1", "tcp", "h", 1, ""),
        ("http://[::1]:8080", "tcp", "::1", 8080, ""),
        ("https://plugin.test:443", "tls", "plugin.test", 443, ""),
        ("https://127.0.0.1:8443", "tls", "127.0.0.1", 8443, ""),
        ("https://[::1]:443", "tls", "::1", 443, ""),
        ("unix:/tmp/x.sock", "unix", "", 0, "/tmp/x.sock"),
        ("unix:/run/polku/plugin-1_a.sock", "unix", "", 0, "/run/polku/plugin-1_a.sock"),
        ("h:00080", "tcp", "h", 80, ""),
    ],
)
def test_accepted_forms(address, scheme, host, port, path):
    assert parse_address("address", address) == PluginAddress(address, scheme, host, port, path)


def test_a_name_of_253_characters_with_63_character_labels_is_accepted():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253
    assert parse_address("address", f"{name}:1", max_length=300).host == name


def test_authority_and_ip():
    assert parse_address("a", "[::1]:5").authority == "[::1]:5"
    assert parse_address("a", "https://Plugin.Test:5").authority == "plugin.test:5"
    assert parse_address("a", "unix:/tmp/s").authority == "localhost"
    assert parse_address("a", "10.0.0.1:5").ip == ip("10.0.0.1")
    assert parse_address("a", "plugin.test:5").ip is None


# -- parse_address: refused -----------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("", "required"),
        # forms gRPC would read differently from us
        ("unix://tmp/x.sock", "unix://authority"),
        ("unix:///tmp/x.sock", "unix://authority"),
        ("unix-abstract:name", "own scheme"),
        ("dns:53", "own scheme"),
        ("dns:///plugin.test:50051", "scheme 'dns'"),
        ("DNS:53", "own scheme"),
        ("ipv4:127.0.0.1:80", "own scheme"),
        ("ipv6:[::1]:80", "own scheme"),
        ("vsock:2:1234", "own scheme"),
        ("xds:53", "own scheme"),
        ("grpc://h:1", "scheme 'grpc'"),
        ("ftp://h:1", "scheme 'ftp'"),
        ("HTTP://h:1", "scheme 'HTTP'"),
        ("https:/h:1", "end at the port"),
        # anything after the port, user information
        ("h:1/", "end at the port"),
        ("http://h:1/path", "end at the port"),
        ("h:1?q=1", "end at the port"),
        ("h:1#f", "end at the port"),
        ("a@h:1", "user information"),
        ("http://user:pw@h:1", "user information"),
        # numeric hosts that are not a plain dotted quad
        ("2130706433:80", "dotted"),
        ("0x7f000001:80", "dotted"),
        ("0X7F000001:80", "dotted"),
        ("127.1:80", "dotted"),
        ("127.0.1:80", "dotted"),
        ("0177.0.0.1:80", "dotted"),
        ("127.000.0.1:80", "dotted"),
        ("0x7f.0.0.1:80", "dotted"),
        ("256.0.0.1:80", "dotted"),
        ("1.2.3.4.5:80", "last label"),
        ("example.123:80", "last label"),
        # IPv6
        ("[fe80::1%eth0]:80", "zone id"),
        ("[fe80::1%25eth0]:80", "zone id"),
        ("::1:50051", "outside brackets"),
        ("fe80::1:80", "outside brackets"),
        ("[::1]", "[v6]:port"),
        ("[::1", "[v6]:port"),
        ("[::1]x:1", "[v6]:port"),
        ("[zz]:1", "not an IPv6"),
        ("[1.2.3.4]:1", "not an IPv6"),
        ("[]:1", "not an IPv6"),
        # host and port
        (":1", "empty host"),
        ("http://:1", "empty host"),
        ("h", "must be"),
        ("h:", "port"),
        ("h:0", "port"),
        ("h:65536", "port"),
        ("h:99999999999999999999", "port"),
        ("h:-1", "port"),
        ("h:+1", "port"),
        ("h:1.5", "port"),
        ("h:²", "non-ASCII"),
        ("h:\u0661\u0662", "non-ASCII"),
        ("h:\uff11", "non-ASCII"),
        # whitespace, control characters, non-ASCII names
        (" h:1", "whitespace"),
        ("h:1 ", "whitespace"),
        ("h :1", "whitespace"),
        ("h:1\n", "whitespace"),
        ("h\t:1", "whitespace"),
        ("h\x00:1", "control"),
        ("h\x7f:1", "control"),
        ("bücher.example:1", "non-ASCII"),
        # host names: LDH labels
        ("under_score:80", "not a host name"),
        ("-leading.dash:1", "not a host name"),
        ("trailing-.dash:1", "not a host name"),
        ("double..dot:1", "not a host name"),
        (".leading.dot:1", "not a host name"),
        ("trailing.dot.:1", "not a host name"),
        ("a*b:1", "not a host name"),
        ("a!b:1", "not a host name"),
        ("a" * 64 + ".example:1", "not a host name"),
        # unix paths
        ("unix:", "unix:/absolute/path"),
        ("unix:/", "unix:/absolute/path"),
        ("unix:relative", "unix:/absolute/path"),
        ("unix:/tmp/../etc/x.sock", "normalised"),
        ("unix:/tmp/./x.sock", "normalised"),
        ("unix:/tmp//x.sock", "normalised"),
        ("unix:/tmp/plugins/", "normalised"),
        ("unix:/tmp/%2e%2e/x.sock", "characters"),
        ("unix:/tmp/x.sock?q", "characters"),
        ("unix:/tmp/x#y", "characters"),
        ("unix:/tmp/x\x00y", "control"),
        ("unix:/tmp/sp ace", "whitespace"),
    ],
)
def test_refused_forms(address, why):
    reason = refused(address)
    assert why in reason, reason
    if address:
        assert repr(address) in reason or "characters long" in reason


def test_over_length_is_refused_and_the_limit_is_configurable():
    long = "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + ":50051"
    assert len(long) > 200
    assert "limit is 200" in refused_with_limit(long, 200)
    assert parse_address("address", long, max_length=300).port == 50051
    assert "limit is 255" in refused("h" * 250 + ":12345")


def refused_with_limit(address: str, limit: int) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse_address("address", address, max_length=limit)
    return caught.value.reason


def test_a_host_name_over_253_characters_is_refused():
    name = ".".join(["a" * 63] * 4)  # 255 characters
    assert "253" in refused_with_limit(f"{name}:1", 300)


@pytest.mark.parametrize("field", ["address", "advertise", "endpoints[3].address"])
def test_the_message_names_the_field_given(field):
    refused("nope", field=field)


@given(st.text(max_size=300))
def test_random_text_is_parsed_or_invalid_argument_nothing_else(text):
    try:
        parsed = parse_address("address", text)
    except InvalidArgument as exc:
        field = exc.field
    else:
        assert parsed.raw == text
        assert parsed.scheme in ("tcp", "tls", "unix")
        return
    assert field == "address"


@given(
    st.from_regex(
        r"\A(https?://)?([a-z0-9.\-\[\]:%@/_]{0,30}|[0-9.x]{1,20}):[0-9]{0,6}\Z", fullmatch=True
    )
)
def test_address_like_text_is_parsed_or_invalid_argument(text):
    try:
        parsed = parse_address("address", text)
    except InvalidArgument:
        return
    assert 0 < parsed.port < 65536
    assert parsed.host


# -- the policy: always refused -------------------------------------------------------

EVERYTHING = AddressPolicy.default("0.0.0.0:1", allow=["0.0.0.0/0", "::/0"])

NEVER = [
    ("0.0.0.0", "0.0.0.0/8"),
    ("0.1.2.3", "0.0.0.0/8"),
    ("169.254.169.254", "169.254.0.0/16 link-local"),
    ("169.254.0.1", "169.254.0.0/16 link-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.254", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("100.100.100.200", "cloud metadata"),
    ("::", "unspecified"),
    ("fe80::1", "fe80::/10 link-local"),
    ("febf::1", "fe80::/10 link-local"),
    ("ff02::1", "multicast"),
    ("fd00:ec2::254", "cloud metadata"),
    ("fe80::1%eth0", "zone id"),
    ("fd00::1%2", "zone id"),
]


def embedded_forms(v4: str) -> list[tuple[str, str]]:
    """The IPv6 spellings of an IPv4 address, and the kind each is named by."""
    packed = int(ipaddress.IPv4Address(v4))
    high, low = f"{packed >> 16:x}", f"{packed & 0xFFFF:x}"
    forms = [
        (f"::ffff:{v4}", "IPv4-mapped"),
        (f"::ffff:{high}:{low}", "IPv4-mapped"),
        (f"0:0:0:0:0:ffff:{high}:{low}", "IPv4-mapped"),
        (f"64:ff9b::{v4}", "NAT64"),
        (f"64:ff9b::{high}:{low}", "NAT64"),
        (f"2002:{high}:{low}::1", "6to4"),
    ]
    if packed > 1:  # ::0.0.0.0 is ::, and ::0.0.0.1 is ::1
        forms += [(f"::{v4}", "IPv4-compatible"), (f"::{high}:{low}", "IPv4-compatible")]
    return forms


@pytest.mark.parametrize(("address", "why"), NEVER)
@pytest.mark.parametrize(
    "policy",
    [
        EVERYTHING,
        AddressPolicy.default("127.0.0.1:1"),
        AddressPolicy.gateway_default(),
        AddressPolicy.default("127.0.0.1:1", allow=["169.254.0.0/16", "fe80::/10", "224.0.0.0/3"]),
    ],
    ids=["allow-all", "loopback", "gateway", "allow-the-ranges"],
)
def test_always_refused_whatever_is_allowed(policy, address, why):
    reason = policy.refusal(ip(address))
    assert reason is not None
    assert why in reason, reason


@pytest.mark.parametrize(
    ("v4", "why"),
    [(a, w) for a, w in NEVER if ":" not in a and a != "0.0.0.0"] + [("0.0.0.2", "0.0.0.0/8")],
)
def test_every_ipv6_form_of_a_refused_ipv4_is_refused(v4, why):
    for form, kind in embedded_forms(v4):
        reason = EVERYTHING.refusal(ip(form))
        assert reason is not None, form
        assert why in reason, (form, reason)
        assert kind in reason, (form, reason)


def test_teredo_embedding_a_refused_ipv4_is_refused():
    # 2001:0::/32, server 65.54.227.120, client 169.254.169.254 (stored inverted).
    client = int(ipaddress.IPv4Address("169.254.169.254")) ^ 0xFFFFFFFF
    teredo = ipaddress.IPv6Address((0x20010000 << 96) | (0x4136E378 << 64) | client)
    assert teredo.teredo[1] == ipaddress.IPv4Address("169.254.169.254")
    assert "Teredo" in (EVERYTHING.refusal(teredo) or "")


@pytest.mark.parametrize(
    ("policy", "address"),
    [
        (EVERYTHING, "169.254.169.254"),
        (EVERYTHING, "224.1.2.3"),
        (EVERYTHING, "::ffff:169.254.1.2"),
        (EVERYTHING, "64:ff9b::169.254.1.2"),
        (AddressPolicy.default("127.0.0.1:1"), "10.9.8.7"),
        (AddressPolicy.default("127.0.0.1:1"), "2001:db8::7"),
    ],
)
def test_the_reason_names_no_address(policy, address):
    """A name's resolved IP must not leak through the message (no DNS oracle)."""
    reason = policy.refusal(ip(address))
    assert reason
    assert address not in reason
    assert "169.254.1.2" not in reason


# -- the policy: allowed ranges -------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "address", "allowed"),
    [
        # listening on loopback: loopback only
        (AddressPolicy.default("127.0.0.1:50051"), "127.0.0.1", True),
        (AddressPolicy.default("127.0.0.1:50051"), "127.255.0.9", True),
        (AddressPolicy.default("127.0.0.1:50051"), "::1", True),
        (AddressPolicy.default("127.0.0.1:50051"), "::ffff:127.0.0.1", True),
        (AddressPolicy.default("127.0.0.1:50051"), "::ffff:7f00:1", True),
        (AddressPolicy.default("127.0.0.1:50051"), "10.0.0.1", False),
        (AddressPolicy.default("127.0.0.1:50051"), "192.168.1.1", False),
        (AddressPolicy.default("127.0.0.1:50051"), "8.8.8.8", False),
        (AddressPolicy.default("[::1]:50051"), "::1", True),
        (AddressPolicy.default("[::1]:50051"), "10.0.0.1", False),
        (AddressPolicy.default("localhost:50051"), "127.0.0.1", True),
        (AddressPolicy.default("unix:/run/registry.sock"), "127.0.0.1", True),
        (AddressPolicy.default("unix:/run/registry.sock"), "10.0.0.1", False),
        # listening elsewhere: the private ranges, loopback not
        (AddressPolicy.default("0.0.0.0:50051"), "127.0.0.1", False),
        (AddressPolicy.default("0.0.0.0:50051"), "::1", False),
        (AddressPolicy.default("0.0.0.0:50051"), "::ffff:127.0.0.1", False),
        (AddressPolicy.default("0.0.0.0:50051"), "10.0.0.1", True),
        (AddressPolicy.default("0.0.0.0:50051"), "10.255.255.255", True),
        (AddressPolicy.default("0.0.0.0:50051"), "172.16.0.1", True),
        (AddressPolicy.default("0.0.0.0:50051"), "172.31.255.1", True),
        (AddressPolicy.default("0.0.0.0:50051"), "172.32.0.1", False),
        (AddressPolicy.default("0.0.0.0:50051"), "192.168.3.4", True),
        (AddressPolicy.default("0.0.0.0:50051"), "fd12:3456::1", True),
        (AddressPolicy.default("0.0.0.0:50051"), "fc00::1", True),
        (AddressPolicy.default("0.0.0.0:50051"), "::ffff:10.1.2.3", True),
        (AddressPolicy.default("0.0.0.0:50051"), "::10.1.2.3", True),
        (AddressPolicy.default("0.0.0.0:50051"), "8.8.8.8", False),
        (AddressPolicy.default("0.0.0.0:50051"), "2001:db8::1", False),
        (AddressPolicy.default("[::]:50051"), "10.0.0.1", True),
        (AddressPolicy.default("10.0.0.5:50051"), "127.0.0.1", False),
        (AddressPolicy.default("registry.internal:50051"), "10.0.0.1", True),
        # an explicit list: exactly those
        (AddressPolicy.default("0.0.0.0:1", allow=["127.0.0.1/32"]), "127.0.0.1", True),
        (AddressPolicy.default("0.0.0.0:1", allow=["127.0.0.1/32"]), "127.0.0.2", False),
        (AddressPolicy.default("127.0.0.1:1", allow=["10.1.0.0/16"]), "127.0.0.1", False),
        (AddressPolicy.default("127.0.0.1:1", allow=["10.1.0.0/16"]), "10.1.2.3", True),
        (AddressPolicy.default("127.0.0.1:1", allow=["10.1.0.0/16"]), "10.2.0.1", False),
        (
            AddressPolicy.default("127.0.0.1:1", allow="10.1.0.0/16, 2001:db8::/32"),
            "2001:db8::5",
            True,
        ),
        (AddressPolicy.default("127.0.0.1:1", allow=[]), "127.0.0.1", False),
        (AddressPolicy.default("127.0.0.1:1", allow=["203.0.113.7"]), "203.0.113.7", True),
        # a mapped form is judged as its IPv4, whatever the IPv6 ranges say
        (AddressPolicy.default("0.0.0.0:1", allow=["::/0"]), "::ffff:10.0.0.1", False),
        (AddressPolicy.default("0.0.0.0:1", allow=["10.0.0.0/8"]), "::ffff:10.0.0.1", True),
        # NAT64 / 6to4 of an allowed IPv4 are judged as themselves
        (AddressPolicy.default("0.0.0.0:1", allow=["10.0.0.0/8"]), "64:ff9b::10.0.0.1", False),
        (AddressPolicy.default("0.0.0.0:1", allow=["64:ff9b::/96"]), "64:ff9b::10.0.0.1", True),
        (AddressPolicy.default("0.0.0.0:1", allow=["2002::/16"]), "2002:a00:1::1", True),
        # the gateway: loopback and the private ranges
        (AddressPolicy.gateway_default(), "127.0.0.1", True),
        (AddressPolicy.gateway_default(), "::1", True),
        (AddressPolicy.gateway_default(), "10.3.2.1", True),
        (AddressPolicy.gateway_default(), "fd00::1", True),
        (AddressPolicy.gateway_default(), "8.8.8.8", False),
    ],
)
def test_allowed_ranges(policy, address, allowed):
    reason = policy.refusal(ip(address))
    assert (reason is None) is allowed, reason
    if not allowed:
        assert reason


@pytest.mark.parametrize(
    ("allow", "bad"),
    [(["10.0.0.0/8", "10.0.0.1/8"], "10.0.0.1/8"), (["nope"], "nope"), (["::1/129"], "::1/129")],
)
def test_a_bad_cidr_is_named(allow, bad):
    with pytest.raises(ValueError, match="address policy") as caught:
        AddressPolicy.default("127.0.0.1:1", allow=allow)
    assert repr(bad) in str(caught.value)


def test_a_relative_unix_dir_is_refused():
    with pytest.raises(ValueError, match="not absolute"):
        AddressPolicy.default("127.0.0.1:1", unix_dirs=["run/plugins"])
    with pytest.raises(ValueError, match="not absolute"):
        AddressPolicy.gateway_default(unix_dirs=["plugins"])
    with pytest.raises(ValueError, match="normalised"):
        AddressPolicy(allow=(), unix_dirs=("/tmp/a/../b",))


# -- the policy: unix directories -----------------------------------------------------


@pytest.mark.parametrize(
    ("dirs", "path", "allowed"),
    [
        (["/tmp/plugins"], "/tmp/plugins/a.sock", True),
        (["/tmp/plugins/"], "/tmp/plugins/a.sock", True),
        (["/tmp//plugins/./"], "/tmp/plugins/sub/a.sock", True),
        (["/tmp/plugins"], "/tmp/plugins-evil/a.sock", False),
        (["/tmp/plugins"], "/tmp/pluginsX", False),
        (["/tmp/plugins"], "/tmp/plugins", False),
        (["/tmp/plugins"], "/tmp/other.sock", False),
        (["/tmp/plugins"], "/etc/x.sock", False),
        (["/tmp/a", "/run/b"], "/run/b/x.sock", True),
        (["/"], "/anything/x.sock", True),
        ([], "/tmp/plugins/a.sock", False),
    ],
)
def test_unix_dirs(dirs, path, allowed):
    policy = AddressPolicy.default("127.0.0.1:1", unix_dirs=dirs)
    reason = policy.unix_refusal(path)
    assert (reason is None) is allowed, reason


def test_parse_then_policy_closes_the_dot_dot_trick():
    policy = AddressPolicy.default("127.0.0.1:1", unix_dirs=["/tmp/plugins"])
    with pytest.raises(InvalidArgument):
        parse_address("address", "unix:/tmp/plugins/../secret.sock")
    assert policy.unix_refusal("/tmp/plugins/ok.sock") is None


# -- vet: literals, names, unix -------------------------------------------------------


class StubResolver:
    """Answers from a table; counts lookups. Never touches the network."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = table or {}
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int
    ) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        self.lookups.append(host)
        if host not in self.table:
            raise OSError(f"{host} not in the stub table")
        return [ip(a) for a in self.table[host]]


LOOPBACK = AddressPolicy.default("127.0.0.1:1")


async def vetted(address: str, policy: AddressPolicy = LOOPBACK, **table: list[str]) -> DialTarget:
    resolver = StubResolver({k.replace("_", "."): v for k, v in table.items()})
    return await vet(parse_address("address", address), policy, resolver)


async def test_ip_literals_are_dialled_as_ipv4_or_ipv6_targets():
    assert await vetted("127.0.0.1:50051") == DialTarget(
        "ipv4:127.0.0.1:50051", "127.0.0.1:50051", False, "127.0.0.1"
    )
    assert await vetted("https://[::1]:443") == DialTarget(
        "ipv6:[::1]:443", "[::1]:443", True, "::1"
    )


async def test_a_name_is_dialled_at_its_first_vetted_ip_keeping_the_name():
    target = await vetted("https://plugin.test:8443", plugin_test=["127.0.0.9", "::1"])
    assert target == DialTarget(
        "ipv4:127.0.0.9:8443", "plugin.test:8443", True, "plugin.test", resolved=True
    )
    v6 = await vetted("plugin.test:1", plugin_test=["::1"])
    assert v6.target == "ipv6:[::1]:1"


async def test_a_name_is_refused_if_any_address_is_refused():
    with pytest.raises(AddressRefused) as caught:
        await vetted("plugin.test:1", plugin_test=["127.0.0.1", "169.254.169.254"])
    message = str(caught.value)
    assert message.startswith("address: 'plugin.test:1' is refused by the address policy")
    assert "link-local" in message
    assert "169.254.169.254" not in message  # the resolved IP is not told


async def test_a_name_that_does_not_resolve_is_refused():
    with pytest.raises(AddressRefused, match="does not resolve"):
        await vetted("nowhere.test:1")
    with pytest.raises(AddressRefused, match="does not resolve"):
        await vetted("empty.test:1", empty_test=[])


async def test_a_refused_literal_names_the_policy_and_the_range():
    with pytest.raises(AddressRefused) as caught:
        await vetted("https://169.254.169.254:443", EVERYTHING)
    assert str(caught.value) == (
        "address: 'https://169.254.169.254:443' is refused by the address policy "
        "(169.254.0.0/16 link-local is never dialled)"
    )
    assert isinstance(caught.value, InvalidArgument)
    assert caught.value.field == "address"


async def test_an_ip_literal_is_not_resolved():
    resolver = StubResolver()
    await vet(parse_address("a", "127.0.0.1:1"), LOOPBACK, resolver)
    assert resolver.lookups == []


async def test_unix_sockets_only_under_the_allowed_dirs():
    policy = AddressPolicy.default("127.0.0.1:1", unix_dirs=["/tmp/plugins"])
    target = await vetted("unix:/tmp/plugins/a.sock", policy)
    assert target == DialTarget("unix:/tmp/plugins/a.sock", "localhost", False, "")
    with pytest.raises(AddressRefused, match="address policy"):
        await vetted("unix:/tmp/plugins-evil/a.sock", policy)
    with pytest.raises(AddressRefused, match="no unix socket directory"):
        await vetted("unix:/tmp/plugins/a.sock")


async def test_the_field_is_the_one_given():
    with pytest.raises(AddressRefused) as caught:
        await vet(
            parse_address("advertise", "10.0.0.1:1"), LOOPBACK, StubResolver(), field="advertise"
        )
    assert caught.value.field == "advertise"
    assert str(caught.value).startswith("advertise: ")


async def test_the_system_resolver_answers_a_literal_without_dns():
    assert await SystemResolver(timeout=5).resolve("127.0.0.1", 1) == [ip("127.0.0.1")]
