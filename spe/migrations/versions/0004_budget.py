"""budget ledger: accounts and charges

Revision ID: 0004_budget
Revises: 0001_foundation
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from spe.db.base import UTCDateTime

revision = "0004_budget"
down_revision = "0001_foundation"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "budget_accounts",
        sa.Column("permit_id", sa.String(64), primary_key=True),
        sa.Column("spent_epsilon_units", BIG, nullable=False),
        sa.Column("spent_delta_units", BIG, nullable=False),
        sa.Column("queries", sa.Integer, nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "budget_charges",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("permit_id", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("idempotency_key", sa.String(128)),
        sa.Column("epsilon_units", BIG, nullable=False),
        sa.Column("delta_units", BIG, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("plan_hash", sa.String(64), nullable=False),
        sa.Column("sql_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime()),
        sa.Column("result", sa.JSON),
        sa.Column("error", sa.Text),
        sa.UniqueConstraint("permit_id", "idempotency_key", name="uq_budget_charges_idem"),
    )
    op.create_index("ix_budget_charges_permit_id", "budget_charges", ["permit_id"])
    op.create_index("ix_budget_charges_actor", "budget_charges", ["actor"])


def downgrade() -> None:
    op.drop_table("budget_charges")
    op.drop_table("budget_accounts")
