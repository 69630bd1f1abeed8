"""The registry server's settings: one frozen dataclass, validated on construction.

Only the CLI reads flags and environment variables; library users build this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from registry.validation import Limits


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
    reap_interval: float = 0.5
    watch_progress_interval: float = 5.0
    watch_max_backlog: int = 1024
    change_log_size: int = 10_000
    limits: Limits = field(default_factory=Limits)

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
            "reap_interval": (self.reap_interval > 0, "must be positive"),
            "watch_progress_interval": (self.watch_progress_interval > 0, "must be positive"),
            "watch_max_backlog": (self.watch_max_backlog >= 1, "must be at least 1"),
            "change_log_size": (self.change_log_size >= 1, "must be at least 1"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} {rule}")
