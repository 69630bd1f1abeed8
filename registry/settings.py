"""The registry server's settings: one frozen dataclass, validated on construction.

Only the CLI reads flags and environment variables; library users build this.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from registry.trust.tls import TlsFiles
from registry.validation import Limits

# Live instances per principal while a policy is in force (SPEC §6); the other
# per-principal defaults are registry.trust.auth.CallerLimits'.
POLICY_MAX_INSTANCES = 1000
# Settings whose value never goes into an error message.
_SECRETS = frozenset({"cluster_token"})


def is_loopback(listen: str) -> bool:
    """Whether a listen address is reachable from this machine only (loopback, unix)."""
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_listen(listen: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` (``[::1]:9090``; an empty host is every address).

    Raises:
        ValueError: not ``host:port`` with a port from 0 to 65535.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or "/" in host:
        raise ValueError(f"{listen!r} is not host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _is_host_port(listen: str) -> bool:
    try:
        split_listen(listen)
    except ValueError:
        return False
    return True


def default_database_url() -> str:
    """The embedded default: an SQLite file under the user's data directory."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite+aiosqlite:///{base / 'polku-registry' / 'registry.db'}"


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """How a registry server runs. Durations are in seconds.

    Raises:
        ValueError: a setting is out of range (the message names it).
    """

    listen: str = "127.0.0.1:50051"
    database_url: str = field(default_factory=default_database_url)
    lease_ttl: int = 30
    health_interval: float = 10.0
    health_timeout: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    deregister_after: float = 300.0
    max_message_bytes: int = 1024 * 1024
    # How often heartbeat timestamps that nothing else wrote are flushed.
    flush_interval: float = 5.0
    # How often the database is pinged for the registry's own health.
    db_check_interval: float = 5.0
    health_concurrency: int = 256
    # A plugin whose connection broke is re-checked this often until it passes or fails.
    suspect_retry: float = 0.1
    # How long Register waits for a new plugin's first health check, to store it with
    # the result (one change, one watch message); past it, it is stored UNKNOWN. 0: off.
    first_check_wait: float = 0.25
    reap_interval: float = 0.5
    watch_progress_interval: float = 5.0
    watch_max_backlog: int = 1024
    change_log_size: int = 10_000
    limits: Limits = field(default_factory=Limits)
    # -- totals (SPEC §7) --
    max_plugins: int = 50_000
    # The encoded RegisteredPlugin of one registration.
    max_bytes_per_plugin: int = 64 * 1024
    # -- trust (SPEC §6) --
    # The TOML policy of principals; None is open mode (loopback or unix listen only).
    auth_policy: str | None = None
    # Open mode on a non-loopback listen address, knowingly.
    insecure: bool = False
    reflection: bool = True
    # The server's certificate and key; with ``ca``, client certificates are required.
    tls: TlsFiles | None = None
    # How the health checker dials https:// plugins (CA, optional client certificate).
    plugin_tls: TlsFiles | None = None
    # CIDRs plugins may be at; None: loopback on a loopback listen, else private ranges.
    allow_addresses: tuple[str, ...] | None = None
    allow_unix_dirs: tuple[str, ...] = ()
    # Per principal; None: the policy default, or off in open mode. 0: off.
    register_rate: float | None = None
    register_burst: int | None = None
    max_instances_per_principal: int | None = None
    max_streams_per_principal: int | None = None
    # Always on, whatever the mode.
    max_concurrent_rpcs: int = 1024
    max_connections_per_peer: int = 256
    # -- replicas on PostgreSQL (SPEC §8) --
    leader_lease: float = 5.0
    # The address other replicas and clients reach this one at; None: the listen
    # address with the port bound (its host name when it listens on every address).
    advertise: str | None = None
    # Shared by every replica; authenticates forwarded writes and heartbeat batches.
    cluster_token: str | None = None
    # How often a replica's change pump polls when no NOTIFY woke it.
    replica_poll_interval: float = 1.0
    # -- operations (SPEC §9) --
    # ``host:port`` to serve Prometheus metrics on (GET /metrics); None: not served.
    metrics_listen: str | None = None

    @property
    def replicated(self) -> bool:
        """Whether this is one of possibly several replicas (PostgreSQL)."""
        scheme = self.database_url.partition(":")[0].partition("+")[0].lower()
        return scheme in ("postgresql", "postgres")

    @property
    def secured(self) -> bool:
        """Whether a policy is in force (every RPC needs an identity)."""
        return self.auth_policy is not None

    def per_principal(self, value: float | None, policy_default: float) -> float:
        """A per-principal limit as it applies: set, else the policy default, else off (0)."""
        if value is not None:
            return value
        return policy_default if self.secured else 0

    def __post_init__(self) -> None:
        lim = self.limits
        checks = {
            "listen": (bool(self.listen), "must not be empty"),
            "database_url": (bool(self.database_url), "must not be empty"),
            "lease_ttl": (
                lim.min_lease_ttl <= self.lease_ttl <= lim.max_lease_ttl,
                f"must be from {lim.min_lease_ttl} to {lim.max_lease_ttl} seconds",
            ),
            "health_interval": (self.health_interval > 0, "must be positive"),
            "health_timeout": (self.health_timeout > 0, "must be positive"),
            "unhealthy_threshold": (self.unhealthy_threshold >= 1, "must be at least 1"),
            "healthy_threshold": (self.healthy_threshold >= 1, "must be at least 1"),
            "deregister_after": (self.deregister_after >= 0, "must not be negative (0: never)"),
            "max_message_bytes": (self.max_message_bytes >= 4096, "must be at least 4096"),
            "flush_interval": (self.flush_interval > 0, "must be positive"),
            "db_check_interval": (self.db_check_interval > 0, "must be positive"),
            "health_concurrency": (self.health_concurrency >= 1, "must be at least 1"),
            "suspect_retry": (self.suspect_retry > 0, "must be positive"),
            "first_check_wait": (
                0 <= self.first_check_wait <= 60,
                "must be from 0 (off) to 60 seconds",
            ),
            "reap_interval": (self.reap_interval > 0, "must be positive"),
            "watch_progress_interval": (self.watch_progress_interval > 0, "must be positive"),
            "watch_max_backlog": (self.watch_max_backlog >= 1, "must be at least 1"),
            "change_log_size": (self.change_log_size >= 1, "must be at least 1"),
            "max_plugins": (self.max_plugins >= 1, "must be at least 1"),
            "max_bytes_per_plugin": (self.max_bytes_per_plugin >= 1024, "must be at least 1024"),
            "max_concurrent_rpcs": (self.max_concurrent_rpcs >= 1, "must be at least 1"),
            "max_connections_per_peer": (self.max_connections_per_peer >= 1, "must be at least 1"),
            "leader_lease": (0.5 <= self.leader_lease <= 300, "must be from 0.5 to 300 seconds"),
            "replica_poll_interval": (self.replica_poll_interval > 0, "must be positive"),
            "metrics_listen": (
                self.metrics_listen is None or _is_host_port(self.metrics_listen),
                "must be host:port (port 0 to 65535)",
            ),
            "cluster_token": (
                self.cluster_token is None or 16 <= len(self.cluster_token) <= 512,
                "must be 16 to 512 characters",
            ),
            "register_rate": (not self.register_rate or self.register_rate > 0, "must be >= 0"),
            "register_burst": (not self.register_burst or self.register_burst > 0, "must be >= 0"),
            "max_instances_per_principal": (
                not self.max_instances_per_principal or self.max_instances_per_principal > 0,
                "must be >= 0",
            ),
            "max_streams_per_principal": (
                not self.max_streams_per_principal or self.max_streams_per_principal > 0,
                "must be >= 0",
            ),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                shown = "<redacted>" if name in _SECRETS else repr(getattr(self, name))
                raise ValueError(f"{name}: {shown} {rule}")
        if self.tls is not None and (self.tls.cert is None or self.tls.key is None):
            raise ValueError("tls: serving TLS needs a certificate and its key")
        if self.secured and self.replicated and self.cluster_token is None:
            raise ValueError(
                "cluster_token: required with an auth policy on PostgreSQL: replicas "
                "forward writes with the caller's identity only under it "
                "(give --cluster-token or POLKU_REGISTRY_CLUSTER_TOKEN)"
            )
        if self.cluster_token is not None and not all("!" <= c <= "~" for c in self.cluster_token):
            raise ValueError("cluster_token: must be printable ASCII without spaces")
        if not self.secured and not self.insecure and not is_loopback(self.listen):
            raise ValueError(
                f"listen: {self.listen!r} is not a loopback address; without an auth policy "
                "anyone who reaches it could redirect the gateway's payloads "
                "(give --auth-policy FILE, or --insecure to accept that)"
            )
