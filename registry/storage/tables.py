"""The database schema as typed SQLAlchemy tables, made by ``registry/migrations/``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class PluginRow(Base):
    """One registered plugin instance, as of its last revision.

    Sources, capabilities and labels are JSON: every lookup by them is served from
    the in-memory catalog, so the database only has to give them back whole. What
    changes without a revision (heartbeats, check results) is in :class:`LeaseRow`,
    so that writing it never rewrites this row (SPEC §7).
    """

    __tablename__ = "plugins"

    plugin_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    type: Mapped[int] = mapped_column(Integer)
    address: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(64), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    sources: Mapped[list[str]] = mapped_column(JSON, default=list)
    emitter_name: Mapped[str] = mapped_column(String(63), default="")
    capabilities: Mapped[list[str]] = mapped_column(JSON, default=list)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    lease_ttl_seconds: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[int] = mapped_column(Integer)
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revision: Mapped[int] = mapped_column(BigInteger)
    status_since: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class LeaseRow(Base):
    """A plugin's lease and last check: the fields that change without a revision.

    Apart from :class:`PluginRow` because they change all the time: a heartbeat or a
    health result rewrites these few bytes, never the plugin's labels and sources.
    A table of its own, not a narrow UPDATE of the plugin row, by measurement (per
    heartbeat of a plugin with 16 KiB of labels): SQLite writes a whole page of the
    plugin row for either a full upsert or a narrow UPDATE, but 1/45 of a page here;
    PostgreSQL logs 19 kB for the full upsert, 0.4 kB for a narrow UPDATE, 0.3 kB here.
    Written with every upsert of the plugin and deleted with it; no foreign key, so
    a lease stored for a row that went meanwhile is harmless.
    """

    __tablename__ = "plugin_leases"

    plugin_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_check_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")


class ChangeRow(Base):
    """The retained change log: one row per revision, so watchers resume across restarts."""

    __tablename__ = "changes"

    revision: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # Plugin states as JSON objects (see registry.storage.store): new ones, and removed ones.
    upserted: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    removed: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # The leader epoch that committed it (SPEC §8); 0 on SQLite and before replicas.
    epoch: Mapped[int] = mapped_column(BigInteger, server_default="0")


class RegistryMetaRow(Base):
    """A single row (id 1) holding the global revision, which outlives removed plugins.

    ``probed_at`` is when the registry last proved the database writable after a
    failed write (its own health, SPEC §7): a probe must change a value, or SQLite
    writes nothing and proves nothing.
    """

    __tablename__ = "registry_meta"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger)
    probed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class OwnerRow(Base):
    """The principal that owns a plugin name (SPEC §6), until an admin releases it.

    Outlives every instance of the name, so it is not tied to the plugins table.
    """

    __tablename__ = "owners"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    principal: Mapped[str] = mapped_column(String(255))
    claimed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ClaimRow(Base):
    """A source or emitter name claimed by a principal for one of its plugin names."""

    __tablename__ = "claims"
    __table_args__ = (CheckConstraint("kind IN ('source', 'emitter')", name="kind"),)

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    principal: Mapped[str] = mapped_column(String(255))
    plugin_name: Mapped[str] = mapped_column(String(63))
    claimed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class LeaderRow(Base):
    """The leader lease (one row, id 1): held by ``holder`` under ``epoch`` until ``expires_at``.

    Times are the database's own clock: replicas compare against ``now()`` there, so
    their clocks never decide who leads.
    """

    __tablename__ = "registry_leader"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    holder: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(300))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ReplicaRow(Base):
    """A replica's last report, by the address it advertises (so a restart reuses the row)."""

    __tablename__ = "registry_replicas"

    address: Mapped[str] = mapped_column(String(300), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column(BigInteger)
    applied_revision: Mapped[int] = mapped_column(BigInteger)
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime)
