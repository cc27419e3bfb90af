"""auth: workspace-token signing keys and grants

Revision ID: 0002_auth
Revises: 0001_foundation
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from spe.db.base import UTCDateTime

revision = "0002_auth"
down_revision = "0001_foundation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("algorithm", sa.String(16), nullable=False),
        sa.Column("public_key_pem", sa.Text, nullable=False),
        sa.Column("private_key_enc", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("retire_at", UTCDateTime(), nullable=True),
    )
    op.create_table(
        "auth_workspace_grants",
        sa.Column("jti", sa.String(64), primary_key=True),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("permit_id", sa.String(64), nullable=False),
        sa.Column("workspace_id", sa.String(128), nullable=False),
        sa.Column("kid", sa.String(64), nullable=False),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_reason", sa.String(255), nullable=True),
    )
    op.create_index("ix_auth_workspace_grants_permit_id", "auth_workspace_grants", ["permit_id"])
    op.create_index("ix_auth_workspace_grants_workspace_id", "auth_workspace_grants",
                    ["workspace_id"])


def downgrade() -> None:
    op.drop_index("ix_auth_workspace_grants_workspace_id", "auth_workspace_grants")
    op.drop_index("ix_auth_workspace_grants_permit_id", "auth_workspace_grants")
    op.drop_table("auth_workspace_grants")
    op.drop_table("auth_signing_keys")
