"""workspaces: per-(person, permit) workspaces and GPU allocations

Revision ID: 0005_workspaces
Revises: 0001_foundation
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from spe.db.base import UTCDateTime

revision = "0005_workspaces"
down_revision = "0001_foundation"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("person", sa.String(255), nullable=False),
        sa.Column("permit_id", sa.String(64), nullable=False),
        sa.Column("unix_user", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime()),
        sa.Column("stopped_at", UTCDateTime()),
        sa.Column("delete_after", UTCDateTime()),
        sa.Column("last_error", sa.Text),
    )
    op.create_index("ix_workspaces_person", "workspaces", ["person"])
    op.create_index("ix_workspaces_permit_id", "workspaces", ["permit_id"])
    op.create_table(
        "workspace_gpus",
        sa.Column("id", BIG, primary_key=True, autoincrement=True),
        sa.Column("gpu_index", sa.Integer, nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("permit_id", sa.String(64), nullable=False),
        sa.Column("person", sa.String(255), nullable=False),
        sa.Column("allocated_at", UTCDateTime(), nullable=False),
        sa.Column("released_at", UTCDateTime()),
    )
    op.create_index("ix_workspace_gpus_workspace_id", "workspace_gpus", ["workspace_id"])
    op.create_index("ix_workspace_gpus_permit_id", "workspace_gpus", ["permit_id"])
    op.create_index("uq_workspace_gpus_active", "workspace_gpus", ["gpu_index", "slot"],
                    unique=True, sqlite_where=sa.text("released_at IS NULL"),
                    postgresql_where=sa.text("released_at IS NULL"))


def downgrade() -> None:
    op.drop_table("workspace_gpus")
    op.drop_table("workspaces")
