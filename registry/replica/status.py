"""What each replica reports of itself, and the registry's status built from the reports.

Every replica upserts its row in ``registry_replicas`` (by advertised address, so a
restart reuses it) every third of the leader lease: role, epoch, applied revision,
and when, by the database's clock. A replica that has not reported within one
lease is not up. The leader forgets rows silent for :data:`FORGET_AFTER` seconds,
which bounds the table by the replicas of the last hour.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.wire import pb

FORGET_AFTER = 3600.0

_REPORT = text(
    "INSERT INTO registry_replicas (address, holder, role, epoch, applied_revision, seen_at) "
    "VALUES (:address, :holder, :role, :epoch, :applied, clock_timestamp()) "
    "ON CONFLICT (address) DO UPDATE SET holder = excluded.holder, role = excluded.role, "
    "epoch = excluded.epoch, applied_revision = excluded.applied_revision, "
    "seen_at = excluded.seen_at"
)
_FORGET = text(
    "DELETE FROM registry_replicas "
    "WHERE seen_at < clock_timestamp() - make_interval(secs => :after)"
)
_READ = text(
    "SELECT address, role, epoch, applied_revision, seen_at, "
    "EXTRACT(EPOCH FROM (clock_timestamp() - seen_at)) AS age "
    "FROM registry_replicas ORDER BY address"
)
_HEAD = text("SELECT revision FROM registry_meta WHERE id = 1")


@dataclass(frozen=True, slots=True)
class Report:
    """One replica's last report."""

    address: str
    role: str  # "leader" or "follower"
    epoch: int
    applied_revision: int
    seen_at: datetime
    up: bool


async def report(
    engine: AsyncEngine,
    *,
    address: str,
    holder: str,
    role: str,
    epoch: int,
    applied: int,
    forget: bool,
) -> None:
    """Write this replica's row; the leader (``forget``) also drops long-silent rows.

    Raises:
        SQLAlchemyError, OSError: the database failed.
    """
    async with engine.begin() as conn:
        await conn.execute(
            _REPORT,
            {
                "address": address,
                "holder": holder,
                "role": role,
                "epoch": epoch,
                "applied": applied,
            },
        )
        if forget:
            await conn.execute(_FORGET, {"after": FORGET_AFTER})


async def read(engine: AsyncEngine, *, up_within: float) -> tuple[list[Report], int]:
    """Every replica's last report, and the database's head revision.

    Raises:
        SQLAlchemyError, OSError: the database failed.
    """
    async with engine.connect() as conn:
        rows = (await conn.execute(_READ)).all()
        head = await conn.scalar(_HEAD) or 0
    reports = [
        Report(
            address=row.address,
            role=row.role,
            epoch=int(row.epoch),
            applied_revision=int(row.applied_revision),
            seen_at=_utc(row.seen_at),
            up=float(row.age) < up_within,
        )
        for row in rows
    ]
    return reports, int(head)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


_ROLES = {"leader": pb.REPLICA_ROLE_LEADER, "follower": pb.REPLICA_ROLE_FOLLOWER}


def registry_status(
    *,
    address: str,
    leading: bool,
    leader: str,
    epoch: int,
    head: int,
    reports: list[Report],
    backend: str,
) -> pb.RegistryStatus:
    """GetStatus's answer: the answering replica's view, then every replica's report."""
    replicas = []
    for r in reports:
        seen = Timestamp()
        seen.FromDatetime(r.seen_at)
        replicas.append(
            pb.ReplicaStatus(
                address=r.address,
                role=_ROLES.get(r.role, pb.REPLICA_ROLE_UNSPECIFIED),
                epoch=r.epoch,
                applied_revision=r.applied_revision,
                lag=max(0, head - r.applied_revision),
                last_seen=seen,
                up=r.up,
            )
        )
    return pb.RegistryStatus(
        address=address,
        role=pb.REPLICA_ROLE_LEADER if leading else pb.REPLICA_ROLE_FOLLOWER,
        leader=leader,
        epoch=epoch,
        revision=head,
        replicas=replicas,
        backend=backend,
    )
