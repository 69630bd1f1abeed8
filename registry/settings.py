"""The registry server's settings: one frozen dataclass, validated on construction.

Only the CLI reads flags and environment variables; library users build this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.store import default_database_url
from registry.validation import Limits


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
    reap_interval: float = 0.5
    watch_progress_interval: float = 5.0
    watch_max_backlog: int = 1024
    change_log_size: int = 10_000
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        lim = self.limits
        checks = {
            "listen": bool(self.listen),
            "database_url": bool(self.database_url),
            "lease_ttl": lim.min_lease_ttl <= self.lease_ttl <= lim.max_lease_ttl,
            "health_interval": self.health_interval > 0,
            "health_timeout": self.health_timeout > 0,
            "unhealthy_threshold": self.unhealthy_threshold >= 1,
            "healthy_threshold": self.healthy_threshold >= 1,
            "deregister_after": self.deregister_after >= 0,
            "max_message_bytes": self.max_message_bytes >= 4096,
            "flush_interval": self.flush_interval > 0,
            "db_check_interval": self.db_check_interval > 0,
            "health_concurrency": self.health_concurrency >= 1,
            "suspect_retry": self.suspect_retry > 0,
            "reap_interval": self.reap_interval > 0,
            "watch_progress_interval": self.watch_progress_interval > 0,
            "watch_max_backlog": self.watch_max_backlog >= 1,
            "change_log_size": self.change_log_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range")

    @property
    def heartbeat_interval(self) -> int:
        """What a plugin with the default lease is told: a third of it."""
        return max(1, self.lease_ttl // 3)
