"""merge the package branches (auth, permits, budget, workspaces) into one head

The first migrations of each package were written in parallel on top of 0001_foundation;
this revision joins them so later migrations have a single parent.

Revision ID: 0006_merge_packages
Revises: 0002_auth, 0003_permits, 0004_budget, 0005_workspaces
Create Date: 2026-11-25
"""

revision = "0006_merge_packages"
down_revision = ("0002_auth", "0003_permits", "0004_budget", "0005_workspaces")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
