"""Ownership of plugin names, sources and emitter names by principals (SPEC §6).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "owners",
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("principal", sa.String(length=255), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_owners")),
    )
    op.create_table(
        "claims",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("principal", sa.String(length=255), nullable=False),
        sa.Column("plugin_name", sa.String(length=63), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('source', 'emitter')", name=op.f("ck_claims_kind")),
        sa.PrimaryKeyConstraint("kind", "key", name=op.f("pk_claims")),
    )


def downgrade() -> None:
    op.drop_table("claims")
    op.drop_table("owners")
