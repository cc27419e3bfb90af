"""The audit log's archived mark: the database refuses to delete any entry above it.

``audit_head.archived_seq`` (0: nothing archived) is the last entry a retention archive holds.
The append-only triggers now let a DELETE through only for entries at or below the mark
(updates stay refused), and the mark may only grow and never pass the head. Everything above
the mark is as undeletable as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_audit_archive_mark"
down_revision = "0010_airlock_file_votes"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer, "sqlite")
_REFUSE = "SELECT RAISE(ABORT, 'audit log is append-only')"


def upgrade() -> None:
    op.add_column("audit_head", sa.Column("archived_seq", BIG, nullable=False,
                                          server_default="0"))
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER audit_log_no_delete")
        op.execute(
            "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
            "WHEN OLD.seq > (SELECT archived_seq FROM audit_head WHERE id = 1) "
            f"BEGIN {_REFUSE}; END")
        op.execute(
            "CREATE TRIGGER audit_head_archive_mark BEFORE UPDATE OF archived_seq ON audit_head "
            "WHEN NEW.archived_seq < OLD.archived_seq OR NEW.archived_seq > NEW.seq "
            "BEGIN SELECT RAISE(ABORT, 'the archived mark only grows, up to the head'); END")
    else:
        op.execute(
            "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$ BEGIN "
            "IF TG_OP = 'DELETE' AND OLD.seq <= "
            "(SELECT archived_seq FROM audit_head WHERE id = 1) THEN RETURN OLD; END IF; "
            "RAISE EXCEPTION 'audit log is append-only'; END; $$ LANGUAGE plpgsql")
        op.execute(
            "CREATE FUNCTION audit_head_archive_mark() RETURNS trigger AS $$ BEGIN "
            "IF NEW.archived_seq < OLD.archived_seq OR NEW.archived_seq > NEW.seq THEN "
            "RAISE EXCEPTION 'the archived mark only grows, up to the head'; END IF; "
            "RETURN NEW; END; $$ LANGUAGE plpgsql")
        op.execute(
            "CREATE TRIGGER audit_head_archive_mark BEFORE UPDATE ON audit_head "
            "FOR EACH ROW EXECUTE FUNCTION audit_head_archive_mark()")
        # TRUNCATE skips row triggers: refuse it outright.
        op.execute(
            "CREATE FUNCTION audit_log_no_truncate() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'audit log is append-only'; END; $$ LANGUAGE plpgsql")
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_no_truncate()")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER audit_head_archive_mark")
        op.execute("DROP TRIGGER audit_log_no_delete")
        op.execute(f"CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
                   f"BEGIN {_REFUSE}; END")
    else:
        op.execute("DROP TRIGGER audit_log_no_truncate ON audit_log")
        op.execute("DROP FUNCTION audit_log_no_truncate()")
        op.execute("DROP TRIGGER audit_head_archive_mark ON audit_head")
        op.execute("DROP FUNCTION audit_head_archive_mark()")
        op.execute(
            "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'audit log is append-only'; END; $$ LANGUAGE plpgsql")
    op.drop_column("audit_head", "archived_seq")
