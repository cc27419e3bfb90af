"""airlock: export requests, their files, reviewers' votes and the per-permit release ledger

Revision ID: 0009_airlock
Revises: 0008_web_sessions
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

from spe.db.base import UTCDateTime

revision = "0009_airlock"
down_revision = "0008_web_sessions"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "export_requests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("permit_id", sa.String(64), nullable=False, index=True),
        sa.Column("requester", sa.String(255), nullable=False, index=True),
        sa.Column("justification", sa.Text, nullable=False),
        sa.Column("state", sa.String(32), nullable=False, index=True),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("reviewers_required", sa.Integer, nullable=False),
        sa.Column("receipts", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "export_files",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(32), nullable=False, index=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False, index=True),
        sa.Column("size", BIG, nullable=False),
        sa.Column("kind", sa.String(32)),
        sa.Column("outcome", sa.String(16)),
        sa.Column("checks", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "export_votes",
        sa.Column("id", BIG, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(32), nullable=False, index=True),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("reviewer", sa.String(255), nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("shared", sa.Boolean, nullable=False),
        sa.Column("override_reason", sa.Text),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("request_id", "round", "reviewer", name="uq_export_votes_reviewer"),
    )
    op.create_table(
        "export_releases",
        sa.Column("id", BIG, primary_key=True, autoincrement=True),
        sa.Column("permit_id", sa.String(64), nullable=False, index=True),
        sa.Column("request_id", sa.String(32), nullable=False),
        sa.Column("file_id", sa.String(32), nullable=False, unique=True),
        sa.Column("sha256", sa.String(64), nullable=False, index=True),
        sa.Column("kind", sa.String(32)),
        sa.Column("released_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("export_releases")
    op.drop_table("export_votes")
    op.drop_table("export_files")
    op.drop_table("export_requests")
