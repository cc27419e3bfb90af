"""airlock: reviewers decide per file (export_votes.files: {file id: decision})

Votes written before this revision have NULL and count as their request-level decision for
every file.

Revision ID: 0010_airlock_file_votes
Revises: 0009_airlock
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_airlock_file_votes"
down_revision = "0009_airlock"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("export_votes", sa.Column("files", sa.JSON, nullable=True))


def downgrade() -> None:
    op.drop_column("export_votes", "files")
