"""Lease and check fields apart from the plugin row; when writes were last probed.

``last_heartbeat_at``, ``last_check_at`` and ``last_error`` change without a
revision, on every heartbeat and health result: they move from ``plugins`` to
``plugin_leases`` (one row per plugin, same id), so that writing them never
rewrites a plugin's labels and sources again (SPEC §7). Rows move in place both
ways; nothing is lost. ``registry_meta.probed_at`` is what the registry's own
health writes to prove the database takes writes again after a failed one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-11
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_MOVED = ("last_heartbeat_at", "last_check_at", "last_error")


def upgrade() -> None:
    op.create_table(
        "plugin_leases",
        sa.Column("plugin_id", sa.String(length=64), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_check_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("plugin_id", name=op.f("pk_plugin_leases")),
    )
    columns = ", ".join(("plugin_id", *_MOVED))
    op.execute(f"INSERT INTO plugin_leases ({columns}) SELECT {columns} FROM plugins")
    with op.batch_alter_table("plugins", schema=None) as batch_op:
        for name in _MOVED:
            batch_op.drop_column(name)
    with op.batch_alter_table("registry_meta", schema=None) as batch_op:
        batch_op.add_column(sa.Column("probed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("registry_meta", schema=None) as batch_op:
        batch_op.drop_column("probed_at")
    with op.batch_alter_table("plugins", schema=None) as batch_op:
        # A default only while rows are filled in: 0003 has none.
        batch_op.add_column(sa.Column("last_error", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("last_heartbeat_at", sa.DateTime(timezone=True)))
        batch_op.add_column(sa.Column("last_check_at", sa.DateTime(timezone=True)))
    lease = "(SELECT l.{0} FROM plugin_leases l WHERE l.plugin_id = plugins.plugin_id)"
    op.execute(
        "UPDATE plugins SET "
        f"last_heartbeat_at = {lease.format('last_heartbeat_at')}, "
        f"last_check_at = {lease.format('last_check_at')}, "
        f"last_error = COALESCE({lease.format('last_error')}, '')"
    )
    with op.batch_alter_table("plugins", schema=None) as batch_op:
        batch_op.alter_column("last_error", existing_type=sa.Text(), server_default=None)
    op.drop_table("plugin_leases")
