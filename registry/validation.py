"""Checks every field a client sends, before anything is stored.

Each failure raises :class:`~registry.errors.InvalidArgument` naming the field
and the reason, e.g. ``info.sources[2]: must match [A-Za-z0-9][A-Za-z0-9._:/-]*``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from registry.errors import InvalidArgument
from registry.model import PluginStatus, PluginType, Registration
from registry.trust.addresses import parse_address
from registry.wire import pb

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Limits:
    """How large each field may be. The defaults suit any real plugin."""

    max_name: int = 63
    max_version: int = 64
    max_description: int = 1024
    max_address: int = 255
    max_sources: int = 64
    max_source: int = 128
    max_capabilities: int = 32
    max_capability: int = 64
    max_labels: int = 32
    max_label_key: int = 63
    max_label_value: int = 256
    max_plugin_id: int = 64
    # etcd allows 2 s; fast fail-over and tests use 1-3 s (SPEC §7).
    min_lease_ttl: int = 1
    max_lease_ttl: int = 3600


DEFAULT_LIMITS = Limits()

# The types a plugin can register as, by wire value.
_PLUGIN_TYPES = {int(t): t for t in (PluginType.INGESTOR, PluginType.EMITTER)}


def _text(field: str, value: str, limit: int, *, required: bool = False) -> str:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} characters long; the limit is {limit}")
    if not value.isprintable():
        raise InvalidArgument(field, "contains control characters")
    return value


def _matching(field: str, value: str, limit: int, pattern: re.Pattern[str]) -> str:
    _text(field, value, limit, required=True)
    if not pattern.match(value):
        raise InvalidArgument(field, f"{value!r} must match {pattern.pattern.strip('^$')}")
    return value


def _names(
    field: str, values: Iterable[str], count: int, limit: int, pattern: re.Pattern[str] | None
) -> tuple[str, ...]:
    items = tuple(values)
    if len(items) > count:
        raise InvalidArgument(field, f"has {len(items)} entries; the limit is {count}")
    seen: set[str] = set()
    for i, item in enumerate(items):
        # The same checks as _text/_matching, inline: only a failing item pays for
        # building its field name (``info.sources[2]``) and gets the full message.
        if not (item and len(item) <= limit and item.isprintable()) or (
            pattern is not None and not pattern.match(item)
        ):
            if pattern is None:
                _text(f"{field}[{i}]", item, limit, required=True)
            else:
                _matching(f"{field}[{i}]", item, limit, pattern)
        if item in seen:
            raise InvalidArgument(f"{field}[{i}]", f"{item!r} is listed twice")
        seen.add(item)
    return items


def check_address(field: str, address: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """Accept ``host:port``, ``[v6]:port``, ``http(s)://host:port`` or ``unix:/path``.

    The syntax only (see :func:`registry.trust.addresses.parse_address`); whether the
    address may be dialled is the address policy's call, made with DNS.

    Raises:
        InvalidArgument: naming ``field`` and why.
    """
    parse_address(field, address, max_length=limits.max_address)
    return address


def check_sources(
    field: str, sources: Iterable[str], limits: Limits = DEFAULT_LIMITS
) -> tuple[str, ...]:
    """Validate a list of source names (a Watch filter, an ingestor's sources)."""
    return _names(field, sources, limits.max_sources, limits.max_source, _SOURCE)


def check_plugin_name(field: str, name: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """A plugin name: ``[A-Za-z0-9][A-Za-z0-9._-]*``, up to ``max_name`` characters."""
    return _matching(field, name, limits.max_name, _NAME)


def check_plugin_id(field: str, plugin_id: str, limits: Limits = DEFAULT_LIMITS) -> str:
    return _text(field, plugin_id, limits.max_plugin_id, required=True)


def registration_from_request(
    request: pb.RegisterRequest, default_ttl: int, limits: Limits = DEFAULT_LIMITS
) -> Registration:
    """Validate a RegisterRequest and return what it registers.

    Raises:
        InvalidArgument: naming the first field that is wrong.
    """
    if not request.HasField("info"):
        raise InvalidArgument("info", "is required")
    info = request.info
    name = _matching("info.name", info.name, limits.max_name, _NAME)
    raw_type = int(info.type)
    if raw_type not in _PLUGIN_TYPES:
        what = (
            "must be set"
            if raw_type == PluginType.UNSPECIFIED
            else f"{raw_type} is not a known plugin type"
        )
        raise InvalidArgument("info.type", f"{what} (PLUGIN_TYPE_INGESTOR or PLUGIN_TYPE_EMITTER)")
    plugin_type = _PLUGIN_TYPES[raw_type]
    sources = check_sources("info.sources", info.sources, limits)
    if plugin_type is PluginType.INGESTOR and not sources:
        raise InvalidArgument("info.sources", "an ingestor must declare at least one source")
    emitter_name = ""
    if info.emitter_name:
        emitter_name = _matching("info.emitter_name", info.emitter_name, limits.max_name, _NAME)
    # An empty map is the common case; copying one goes through the Mapping ABC.
    labels: Mapping[str, str] = dict(request.labels) if len(request.labels) else {}
    if len(labels) > limits.max_labels:
        raise InvalidArgument(
            "labels", f"has {len(labels)} entries; the limit is {limits.max_labels}"
        )
    for key, value in labels.items():
        _matching("labels", key, limits.max_label_key, _LABEL_KEY)
        _text(f"labels[{key}]", value, limits.max_label_value)
    ttl = request.lease_ttl_seconds or default_ttl
    if request.no_lease:
        if request.lease_ttl_seconds:
            raise InvalidArgument("lease_ttl_seconds", "must be 0 with no_lease")
        ttl = 0
    elif not limits.min_lease_ttl <= ttl <= limits.max_lease_ttl:
        raise InvalidArgument(
            "lease_ttl_seconds",
            f"{ttl} is out of range "
            f"({limits.min_lease_ttl} to {limits.max_lease_ttl}, or 0 for the default)",
        )
    return Registration(
        name=name,
        type=plugin_type,
        address=check_address("address", request.address, limits),
        version=_text("info.version", info.version, limits.max_version),
        description=_text("info.description", info.description, limits.max_description),
        sources=sources,
        emitter_name=emitter_name,
        capabilities=_names(
            "info.capabilities",
            info.capabilities,
            limits.max_capabilities,
            limits.max_capability,
            None,
        ),
        labels=labels,
        lease_ttl_seconds=ttl,
    )


def plugin_type_filter(value: int) -> PluginType:
    if value not in PluginType._value2member_map_:
        raise InvalidArgument("type", f"{value} is not a known plugin type")
    return PluginType(value)


def status_filter(values: Iterable[int]) -> frozenset[PluginStatus]:
    statuses = set()
    for i, value in enumerate(values):
        if value not in PluginStatus._value2member_map_ or value == PluginStatus.UNSPECIFIED:
            raise InvalidArgument(f"statuses[{i}]", f"{value} is not a known plugin status")
        statuses.add(PluginStatus(value))
    return frozenset(statuses)
