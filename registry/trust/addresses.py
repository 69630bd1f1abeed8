"""The one parser and policy of plugin addresses (SPEC §6 "Address policy").

Register, the health checker and the gateway's dialer all go through here, so the
three can never disagree about what an address means or whether it may be dialled:

    address = parse_address("address", "https://plugin.test:443")   # syntax, sync
    target = await vet(address, policy, resolver)                    # policy, DNS
    channel = plugin_channel(target, credentials)                    # registry.trust.dial

:func:`parse_address` accepts exactly ``host:port``, ``[v6]:port``,
``http://host:port``, ``https://host:port`` and ``unix:/absolute/path``, and refuses
every form that gRPC would read differently from us (its own schemes, numeric
shorthands that ``inet_aton`` expands, anything after the port). :func:`vet` judges
the address's IPs against an :class:`AddressPolicy` and answers a :class:`DialTarget`
that names the vetted IP itself (``ipv4:…``, ``ipv6:…``, ``unix:…``), so a name that
resolves elsewhere later (DNS rebinding) can never redirect a dial; the name is kept
as the ``:authority`` and the TLS name.

Decisions worth knowing:

- IPv4-mapped (``::ffff:a.b.c.d``, also in hex) and IPv4-compatible (``::a.b.c.d``)
  addresses are judged as the IPv4 address they carry, whatever the IPv6 allow list
  says: the kernel dials that IPv4 address.
- NAT64 (``64:ff9b::/96``), 6to4 (``2002::/16``) and Teredo (``2001::/32``) addresses
  are refused when the IPv4 address they embed is one that is never dialled; otherwise
  they are judged as themselves (they reach a translator or relay, whose range the
  operator must allow explicitly).
- ``unix:`` paths are compared as normalised text; symbolic links are not followed
  (the allowed directories are the operator's and hold what the operator put there).
- Refusal messages name the category ("169.254.0.0/16 link-local is never dialled"),
  never the IP a name resolved to: the registry must not become a DNS oracle for the
  network it sits in.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import posixpath
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from registry.errors import InvalidArgument

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MAX_LENGTH = 255

_ACCEPTED = "host:port, [v6]:port, http://host:port, https://host:port or unix:/absolute/path"
# Target schemes gRPC resolves itself: "dns:53" would be a host "dns" to us, a DNS
# lookup of "53" to gRPC. Compared case-insensitively (refusing more is harmless).
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A label inet_aton would read as a number: decimal, octal (leading 0) or hex (0x…).
_NUMERIC_LABEL = re.compile(r"^([0-9]+|0x[0-9a-f]*)$")
# Characters of a unix socket path. No "%", "?" or "#": gRPC parses its target as a
# URI and would percent-decode the path (``%2e%2e`` → ``..``) or cut it short.
_UNIX_PATH = re.compile(r"^[A-Za-z0-9._~+=,@/-]+$")


@dataclass(frozen=True, slots=True)
class PluginAddress:
    """A parsed plugin address.

    ``scheme``: ``tcp`` (``host:port``, ``http://``), ``tls`` (``https://``) or
    ``unix``. ``host``: an IP literal without brackets (in its canonical text) or a
    lower-cased DNS name; ``""`` for unix. ``path``: the socket path (unix only).
    """

    raw: str
    scheme: str
    host: str
    port: int = 0
    path: str = ""

    @property
    def ip(self) -> IPAddress | None:
        """The host as an IP address, or None for a DNS name (and unix)."""
        if not self.host:
            return None
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def authority(self) -> str:
        """``host:port`` (``[v6]:port``), the :authority a dial sends; unix: ``localhost``."""
        if self.scheme == "unix":
            return "localhost"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# Addresses parsed and accepted (they are immutable): a plugin's address is parsed at
# its registration, at each dial and at each check; the same few recur. Cleared whole
# when full, so a flood of distinct addresses costs what no cache would.
_PARSED: dict[tuple[str, int], PluginAddress] = {}
_MAX_PARSED = 4096


def parse_address(
    field: str, address: str, *, max_length: int = DEFAULT_MAX_LENGTH
) -> PluginAddress:
    """Parse a plugin address strictly; see the module docstring for the forms.

    Raises:
        InvalidArgument: naming ``field`` and why the address is not accepted.
    """
    key = (address, max_length)
    parsed = _PARSED.get(key)
    if parsed is None:
        parsed = _parse(field, address, max_length)
        if len(_PARSED) >= _MAX_PARSED:
            _PARSED.clear()
        _PARSED[key] = parsed
    return parsed


def _parse(field: str, address: str, max_length: int) -> PluginAddress:
    def refuse(reason: str) -> InvalidArgument:
        return InvalidArgument(field, f"{address!r} {reason}")

    if not address:
        raise InvalidArgument(field, "is required")
    if len(address) > max_length:
        raise InvalidArgument(
            field, f"is {len(address)} characters long; the limit is {max_length}"
        )
    if any(c.isspace() or not c.isprintable() for c in address):
        raise refuse("contains whitespace or control characters")
    if not address.isascii():
        raise refuse("contains non-ASCII characters (write host names in their xn-- form)")
    if address.startswith("unix:"):
        return _parse_unix(address, refuse)
    scheme, rest = "tcp", address
    if "://" in address:
        prefix, _, rest = address.partition("://")
        if prefix == "http":
            scheme = "tcp"
        elif prefix == "https":
            scheme = "tls"
        else:
            raise refuse(f"has the scheme {prefix!r}; accepted forms are {_ACCEPTED}")
    elif address.lower().startswith(_GRPC_SCHEMES):
        grpc_scheme = address.partition(":")[0]
        raise refuse(f"starts with {grpc_scheme + ':'!r}, which gRPC reads as its own scheme")
    host, port = _split_host_port(rest, refuse)
    return PluginAddress(raw=address, scheme=scheme, host=host, port=port)


def _parse_unix(address: str, refuse: _Refuse) -> PluginAddress:
    path = address.removeprefix("unix:")
    if path.startswith("//"):
        raise refuse("is read by gRPC as unix://authority/path; write unix:/absolute/path")
    if not path.startswith("/") or path == "/":
        raise refuse("must be unix:/absolute/path")
    if not _UNIX_PATH.match(path):
        raise refuse("has a socket path with characters other than letters, digits and ._~+=,@/-")
    if posixpath.normpath(path) != path:
        raise refuse("has a socket path that is not normalised (no '.', '..', '//' or trailing /)")
    return PluginAddress(raw=address, scheme="unix", host="", path=path)


class _Refuse(Protocol):
    def __call__(self, reason: str) -> InvalidArgument: ...


def _split_host_port(rest: str, refuse: _Refuse) -> tuple[str, int]:
    if "@" in rest:
        raise refuse("has user information (user@host); it is not accepted")
    if any(c in rest for c in "/?#"):
        raise refuse("must end at the port: no path, query or fragment")
    if rest.startswith("["):
        inside, bracket, after = rest[1:].partition("]")
        if not bracket or not after.startswith(":"):
            raise refuse("must be [v6]:port")
        host = _ipv6_literal(inside, refuse)
        port_text = after[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise refuse(f"must be {_ACCEPTED}")
        if ":" in host:
            raise refuse("has an IPv6 address outside brackets; write [v6]:port")
        host = _ipv4_or_name(host, refuse)
    return host, _port(port_text, refuse)


def _ipv6_literal(text: str, refuse: _Refuse) -> str:
    if "%" in text:
        raise refuse("has an IPv6 zone id; zone ids are not accepted")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise refuse(f"has {text!r} in brackets, which is not an IPv6 address") from None


def _ipv4_or_name(host: str, refuse: _Refuse) -> str:
    if not host:
        raise refuse("has an empty host")
    name = host.lower()
    labels = name.split(".")
    if 1 <= len(labels) <= 4 and all(_NUMERIC_LABEL.match(label) for label in labels):
        # gRPC (through getaddrinfo → inet_aton) would expand 127.1, 2130706433,
        # 0x7f000001 or 0177.0.0.1; only the plain dotted quad means one thing.
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise refuse(
                f"has the numeric host {host!r}; an IPv4 address must be a plain dotted "
                "quad (four decimal numbers 0-255, no leading zeros)"
            ) from None
    if len(name) > 253:
        raise refuse("has a host name over 253 characters")
    for label in labels:
        if not _LABEL.match(label):
            raise refuse(
                f"has the host {host!r}, which is not a host name (labels of letters, digits "
                "and inner hyphens, 1-63 characters, no trailing dot) or an IPv4 address"
            )
    if labels[-1].isdigit():
        raise refuse(f"has the host {host!r}: the last label of a host name is not all digits")
    return name


def _port(text: str, refuse: _Refuse) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 0 < int(text) < 65536:
        raise refuse("must have a port from 1 to 65535")
    return int(text)


# -- the policy ----------------------------------------------------------------------

_LOOPBACK = ("127.0.0.0/8", "::1/128")
_PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), label) for net, label in pairs)


# Never dialled, whatever is allowed. Broadcast before reserved, so it is named as such.
_NEVER_V4 = _nets(
    ("0.0.0.0/8", "0.0.0.0/8 'this network'"),
    ("169.254.0.0/16", "169.254.0.0/16 link-local"),
    ("224.0.0.0/4", "224.0.0.0/4 multicast"),
    ("255.255.255.255/32", "255.255.255.255 broadcast"),
    ("240.0.0.0/4", "240.0.0.0/4 reserved"),
    ("100.100.100.200/32", "100.100.100.200 cloud metadata"),
)
_NEVER_V6 = _nets(
    ("::/128", ":: unspecified"),
    ("fe80::/10", "fe80::/10 link-local"),
    ("ff00::/8", "ff00::/8 multicast"),
    ("fd00:ec2::254/128", "fd00:ec2::254 cloud metadata"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _never_v4(ip: ipaddress.IPv4Address) -> str | None:
    """The label of the always-refused range holding ``ip``, if any."""
    for net, label in _NEVER_V4:
        if ip in net:
            return label
    return None


def _parse_networks(texts: Sequence[str]) -> tuple[IPNetwork, ...]:
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"address policy: {text!r} is not a CIDR network ({exc})") from exc
    return tuple(networks)


def _normalise_dir(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"address policy: the unix socket directory {path!r} is not absolute")
    # normpath keeps a leading "//" (POSIX leaves its meaning open); we do not.
    return "/" + posixpath.normpath(path).lstrip("/")


def _is_loopback_listen(listen: str) -> bool:
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0] if ":" in listen else listen
    host = host.removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(values: Sequence[str] | str) -> list[str]:
    # A comma-separated string (as a flag gives it) is taken as the list it spells.
    if isinstance(values, str):
        return [v for v in (part.strip() for part in values.split(",")) if v]
    return list(values)


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which plugin addresses may be dialled.

    ``allow``: the networks whose IPs may be dialled (the always-refused ranges stay
    refused even under ``0.0.0.0/0`` or ``::/0``). ``unix_dirs``: absolute, normalised
    directories under which ``unix:`` sockets may be dialled.

    Raises:
        ValueError: a unix directory is relative or not normalised.
    """

    allow: tuple[IPNetwork, ...]
    unix_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for path in self.unix_dirs:
            if _normalise_dir(path) != path:
                raise ValueError(f"address policy: write the directory {path!r} normalised")

    @classmethod
    def default(
        cls,
        listen: str,
        allow: Sequence[str] | str | None = None,
        unix_dirs: Sequence[str] | str = (),
    ) -> AddressPolicy:
        """The registry's policy: ``allow`` as given, else by where it listens.

        Listening on loopback (127.x, ::1, localhost) or a unix socket: loopback only.
        Anywhere else: the private ranges 10/8, 172.16/12, 192.168/16 and fc00::/7
        (loopback then only when listed in ``allow``).

        Raises:
            ValueError: naming a bad CIDR or a relative unix directory.
        """
        if allow is not None:
            networks = _parse_networks(_split(allow))
        elif _is_loopback_listen(listen):
            networks = _parse_networks(_LOOPBACK)
        else:
            networks = _parse_networks(_PRIVATE)
        return cls(networks, tuple(_normalise_dir(d) for d in _split(unix_dirs)))

    @classmethod
    def gateway_default(cls, unix_dirs: Sequence[str] | str = ()) -> AddressPolicy:
        """The gateway's policy: loopback and the private ranges (its plugins' network)."""
        networks = _parse_networks((*_LOOPBACK, *_PRIVATE))
        return cls(networks, tuple(_normalise_dir(d) for d in _split(unix_dirs)))

    def refusal(self, ip: IPAddress) -> str | None:
        """None when ``ip`` may be dialled, else a short reason (naming no IP)."""
        if isinstance(ip, ipaddress.IPv4Address):
            never = _never_v4(ip)
            return self._outside(ip) if never is None else f"{never} is never dialled"
        if ip.scope_id:
            return "IPv6 zone ids are never dialled"
        carried = ip.ipv4_mapped
        if carried is not None:
            inner = self.refusal(carried)
            return None if inner is None else f"an IPv4-mapped address: {inner}"
        if ip in _COMPATIBLE and int(ip) > 1:  # not :: nor ::1
            inner = self.refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return None if inner is None else f"an IPv4-compatible address: {inner}"
        for net, label in _NEVER_V6:
            if ip in net:
                return f"{label} is never dialled"
        for kind, embedded in _translated(ip):
            never = _never_v4(embedded)
            if never is not None:
                return f"a {kind} address embedding {never}, which is never dialled"
        return self._outside(ip)

    def unix_refusal(self, path: str) -> str | None:
        """None when the (normalised) socket ``path`` lies under an allowed directory."""
        for directory in self.unix_dirs:
            if directory == "/" or path.startswith(directory + "/"):
                return None
        if not self.unix_dirs:
            return "no unix socket directory is allowed"
        return "the socket is not under an allowed directory"

    def _outside(self, ip: IPAddress) -> str | None:
        for net in self.allow:
            if ip in net:
                return None
        return "not in the allowed address ranges"


def _translated(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses an IPv6 address reaches through a translator or relay."""
    found = []
    if ip in _NAT64:
        found.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo", server), ("Teredo", client)]
    return found


# -- resolving and vetting -----------------------------------------------------------


class HostResolver(Protocol):
    """Resolves a host name to IP addresses (a seam: tests give a stub).

    Raises ``OSError`` (``socket.gaierror``, ``TimeoutError``) when the name does not
    resolve; an empty list means the same.
    """

    async def resolve(self, host: str, port: int) -> list[IPAddress]: ...


class SystemResolver:
    """The operating system's resolver (``getaddrinfo`` in the loop's executor).

    Raises:
        OSError: the name does not resolve, or not within ``timeout`` seconds
            (``TimeoutError``).
    """

    def __init__(self, timeout: float = 3.0) -> None:
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"SystemResolver(timeout={self.timeout:g})"

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        ips: list[IPAddress] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0])
            if ip not in ips:
                ips.append(ip)
        return ips


class AddressRefused(InvalidArgument):
    """The address is well-formed but the address policy refuses to dial it.

    ``address`` is the address as given; ``why`` the policy's short reason.
    """

    def __init__(self, field: str, address: str, why: str) -> None:
        super().__init__(field, f"{address!r} is refused by the address policy ({why})")
        self.address = address
        self.why = why


class Unresolvable(AddressRefused):
    """A host name that does not resolve (now): nothing to dial, nothing refused yet.

    Register accepts such a plugin (SPEC §2: an unreachable plugin is accepted, UNKNOWN
    until checked); every dial resolves again and is vetted then.
    """


@dataclass(frozen=True, slots=True)
class DialTarget:
    """Where a vetted address is dialled.

    ``target``: a gRPC target that gRPC cannot reinterpret (``ipv4:1.2.3.4:50051``,
    ``ipv6:[::1]:50051``, ``unix:/path``); ``authority``: the address's own
    ``host:port``, sent as :authority and checked as the TLS name; ``tls``: dial with
    TLS; ``host``: the name (or IP) the certificate must carry; ``""`` for unix.
    ``resolved``: the IP came from DNS (a later dial resolves again).
    """

    target: str
    authority: str
    tls: bool
    host: str
    resolved: bool = False


async def vet(
    address: PluginAddress,
    policy: AddressPolicy,
    resolver: HostResolver,
    *,
    field: str = "address",
) -> DialTarget:
    """Judge ``address`` by ``policy``; where to dial it.

    IP literals are judged directly; a host name is resolved and refused when it does
    not resolve or when ANY of its addresses is refused; the dial then goes to its
    first address, the name kept as authority. Unix paths must lie under one of the
    policy's directories.

    Raises:
        AddressRefused: the policy refuses the address (the message says why).
    Cancellation abandons the lookup.
    """
    if address.scheme == "unix":
        why = policy.unix_refusal(address.path)
        if why is not None:
            raise AddressRefused(field, address.raw, why)
        return DialTarget(f"unix:{address.path}", address.authority, False, "")
    tls = address.scheme == "tls"
    literal = address.ip
    if literal is not None:
        why = policy.refusal(literal)
        if why is not None:
            raise AddressRefused(field, address.raw, why)
        return DialTarget(_ip_target(literal, address.port), address.authority, tls, address.host)
    try:
        ips = await resolver.resolve(address.host, address.port)
    except OSError as exc:
        log.debug("%s does not resolve: %r", address.host, exc)
        ips = []
    if not ips:
        raise Unresolvable(field, address.raw, f"{address.host} does not resolve")
    for ip in ips:
        why = policy.refusal(ip)
        if why is not None:
            raise AddressRefused(
                field, address.raw, f"{address.host} resolves to a refused address: {why}"
            )
    return DialTarget(
        _ip_target(ips[0], address.port), address.authority, tls, address.host, resolved=True
    )


def _ip_target(ip: IPAddress, port: int) -> str:
    if isinstance(ip, ipaddress.IPv6Address):
        return f"ipv6:[{ip}]:{port}"
    return f"ipv4:{ip}:{port}"
