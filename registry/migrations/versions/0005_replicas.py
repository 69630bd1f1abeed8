"""Replicas on one PostgreSQL database (SPEC §8): the leader lease, the replicas'
reports, and the epoch that wrote each change.

``registry_leader`` is one row (id 1): who leads, under which epoch, until when
(the database's clock, so the replicas' clocks never matter). ``registry_replicas``
holds each replica's last report (role, epoch, applied revision) for GetStatus.
``changes.epoch`` records the leader epoch that committed each revision: 0 for
every row from before this release, and always 0 on SQLite (one registry per file).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("changes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "registry_leader",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=300), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_leader")),
    )
    # Free from the start: expired at the epoch of time, held by nobody.
    op.execute(
        "INSERT INTO registry_leader (id, epoch, holder, address, expires_at) "
        "VALUES (1, 0, '', '', '1970-01-01 00:00:00+00:00')"
    )
    op.create_table(
        "registry_replicas",
        sa.Column("address", sa.String(length=300), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("applied_revision", sa.BigInteger(), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_registry_replicas")),
    )


def downgrade() -> None:
    op.drop_table("registry_replicas")
    op.drop_table("registry_leader")
    with op.batch_alter_table("changes", schema=None) as batch_op:
        batch_op.drop_column("epoch")
