"""Domain types: what the registry knows about a plugin, free of protobuf and SQL."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any


class PluginType(enum.IntEnum):
    """Mirrors ``polku.v1.PluginType``."""

    UNSPECIFIED = 0
    INGESTOR = 1
    EMITTER = 2


class PluginStatus(enum.IntEnum):
    """Mirrors ``polku.v1.PluginStatus``."""

    UNSPECIFIED = 0
    UNKNOWN = 1
    HEALTHY = 2
    UNHEALTHY = 3
    EXPIRED = 4
    # Taken out of routing by an operator: still checked, never reaped, its
    # heartbeats acknowledged (SPEC §1.3, §9).
    DRAINING = 5


@dataclass(frozen=True, slots=True)
class Registration:
    """A validated Register request: what a plugin says about itself."""

    name: str
    type: PluginType
    address: str
    version: str = ""
    description: str = ""
    sources: tuple[str, ...] = ()
    emitter_name: str = ""
    capabilities: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    # Seconds; 0 means no lease (the plugin lives by health checks alone).
    lease_ttl_seconds: int = 0

    @property
    def emitter_key(self) -> str:
        """The name an emitter is resolved by: its emitter name, else its plugin name."""
        return (self.emitter_name or self.name) if self.type is PluginType.EMITTER else ""


@dataclass(frozen=True, slots=True)
class Plugin:
    """One registered plugin instance. Immutable: a change makes a new one."""

    plugin_id: str
    registration: Registration
    status: PluginStatus
    registered_at: datetime
    last_heartbeat_at: datetime | None = None
    last_check_at: datetime | None = None
    last_error: str = ""
    # The registry revision of this plugin's last change.
    revision: int = 0
    # When the status last changed (for deregister_after); registered_at at first.
    status_since: datetime | None = None

    def with_fields(self, **fields: Any) -> Plugin:
        """A copy with ``fields`` changed: ``dataclasses.replace`` at a third less cost
        (a heartbeat or a check result makes one per plugin, thousands a second).

        Raises:
            TypeError: a name is not a field of Plugin.
        """
        if not _PLUGIN_FIELDS.issuperset(fields):
            unknown = ", ".join(sorted(set(fields) - _PLUGIN_FIELDS))
            raise TypeError(f"Plugin has no field {unknown}")
        get = fields.get
        return Plugin(
            get("plugin_id", self.plugin_id),
            get("registration", self.registration),
            get("status", self.status),
            get("registered_at", self.registered_at),
            get("last_heartbeat_at", self.last_heartbeat_at),
            get("last_check_at", self.last_check_at),
            get("last_error", self.last_error),
            get("revision", self.revision),
            get("status_since", self.status_since),
        )

    def renewed(self, at: datetime) -> Plugin:
        """A copy whose lease was renewed ``at`` (a heartbeat): the cheapest copy there is,
        made for every renewal."""
        return Plugin(
            self.plugin_id,
            self.registration,
            self.status,
            self.registered_at,
            at,
            self.last_check_at,
            self.last_error,
            self.revision,
            self.status_since,
        )

    def checked(self, at: datetime, error: str) -> Plugin:
        """A copy checked ``at`` with ``error`` ("" when it passed), its status unchanged."""
        return Plugin(
            self.plugin_id,
            self.registration,
            self.status,
            self.registered_at,
            self.last_heartbeat_at,
            at,
            error,
            self.revision,
            self.status_since,
        )

    @property
    def name(self) -> str:
        return self.registration.name

    @property
    def address(self) -> str:
        return self.registration.address

    @property
    def routable(self) -> bool:
        """Whether traffic may be sent to it."""
        return self.status is PluginStatus.HEALTHY

    @property
    def live(self) -> bool:
        """Whether it still holds its sources and emitter name (its lease has not lapsed).

        A DRAINING instance is live: it is out of routing, not gone.
        """
        return self.status is not PluginStatus.EXPIRED


_PLUGIN_FIELDS = frozenset(f.name for f in fields(Plugin))


@dataclass(frozen=True, slots=True)
class Change:
    """One revision of the registry: plugins added or changed, and plugins removed.

    ``removed`` holds the removed plugins' last states, so that a filtered watcher
    can tell whether a removal concerns it.
    """

    revision: int
    upserted: tuple[Plugin, ...] = ()
    removed: tuple[Plugin, ...] = ()

    @property
    def removed_ids(self) -> list[str]:
        return [p.plugin_id for p in self.removed]


# The scopes a policy grants (SPEC §6): admin implies every other.
SCOPES = ("register", "read", "admin")


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller and what the policy grants it.

    ``names`` and ``sources`` are glob patterns (``fnmatch``, case-sensitive);
    ``sources=None`` allows any source or emitter name that nobody owns yet.
    In open mode (no policy) there is no principal: callers pass ``None``.
    """

    name: str
    scopes: frozenset[str] = frozenset()
    names: tuple[str, ...] = ()
    sources: tuple[str, ...] | None = None

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        """Whether the principal holds ``scope`` (admin holds every scope)."""
        return self.admin or scope in self.scopes

    def may_name(self, plugin_name: str) -> bool:
        """Whether it may register instances of ``plugin_name``."""
        return self.admin or any(fnmatchcase(plugin_name, p) for p in self.names)

    def may_claim(self, key: str) -> bool:
        """Whether it may claim a source or emitter name that nobody owns."""
        if self.admin or self.sources is None:
            return True
        return any(fnmatchcase(key, p) for p in self.sources)
