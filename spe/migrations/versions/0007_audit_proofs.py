"""audit: per-entry salt and per-permit sequence (for per-permit Merkle proofs)

Entries written before this revision keep NULL in both columns and verify as before.

Revision ID: 0007_audit_proofs
Revises: 0006_merge_packages
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_audit_proofs"
down_revision = "0006_merge_packages"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("salt", sa.String(32), nullable=True))
    op.add_column("audit_log", sa.Column("permit_seq", BIG, nullable=True))
    op.create_index("ix_audit_log_permit_seq", "audit_log", ["permit_id", "permit_seq"],
                    unique=True)


def downgrade() -> None:
    op.drop_index("ix_audit_log_permit_seq", table_name="audit_log")
    op.drop_column("audit_log", "permit_seq")
    op.drop_column("audit_log", "salt")
