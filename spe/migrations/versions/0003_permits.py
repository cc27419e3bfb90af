"""permits: permits, versions, persons/datasets index, event outbox, idempotency keys

Revision ID: 0003_permits
Revises: 0001_foundation
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from spe.db.base import UTCDateTime

revision = "0003_permits"
down_revision = "0001_foundation"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "permits",
        sa.Column("seq", BIG, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("access_body", sa.String(255), nullable=False),
        sa.Column("reference", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("etag", sa.String(80), nullable=False),
        sa.Column("valid_from", UTCDateTime(), nullable=False),
        sa.Column("valid_until", UTCDateTime(), nullable=False),
        sa.Column("extended", sa.Boolean, nullable=False),
        sa.Column("group_state", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("access_body", "reference", name="uq_permits_access_body_reference"),
    )
    op.create_index("ix_permits_access_body", "permits", ["access_body"])
    op.create_index("ix_permits_status", "permits", ["status"])
    op.create_index("ix_permits_valid_until", "permits", ["valid_until"])
    op.create_table(
        "permit_versions",
        sa.Column("permit_id", sa.String(36), sa.ForeignKey("permits.id", ondelete="RESTRICT"),
                  primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("snapshot", sa.JSON, nullable=False),
        sa.Column("changed_fields", sa.JSON, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("time", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "permit_persons",
        sa.Column("permit_id", sa.String(36), sa.ForeignKey("permits.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("username", sa.String(100), primary_key=True),
    )
    op.create_index("ix_permit_persons_username", "permit_persons", ["username"])
    op.create_table(
        "permit_datasets",
        sa.Column("permit_id", sa.String(36), sa.ForeignKey("permits.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("dataset", sa.String(64), primary_key=True),
    )
    op.create_index("ix_permit_datasets_dataset", "permit_datasets", ["dataset"])
    op.create_table(
        "permit_events",
        sa.Column("id", BIG, primary_key=True, autoincrement=False),
        sa.Column("permit_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("time", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_permit_events_permit_id", "permit_events", ["permit_id"])
    head = op.create_table(
        "permit_event_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("last_id", BIG, nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "last_id": 0}])
    op.create_table(
        "permit_idempotency",
        sa.Column("access_body", sa.String(255), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("permit_id", sa.String(36), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("response", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )

    # Versions and events are history: append-only, like the audit log.
    bind = op.get_bind()
    for table in ("permit_versions", "permit_events"):
        if bind.dialect.name == "sqlite":
            for verb in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
        else:
            op.execute(
                f"CREATE FUNCTION {table}_append_only() RETURNS trigger AS $$ BEGIN "
                f"RAISE EXCEPTION '{table} is append-only'; END; $$ LANGUAGE plpgsql"
            )
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"
            )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        for table in ("permit_versions", "permit_events"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {table}_append_only()")
    for table in ("permit_idempotency", "permit_event_head", "permit_events",
                  "permit_datasets", "permit_persons", "permit_versions", "permits"):
        op.drop_table(table)
