"""`spe audit verify|archive|export|checkpoint|keys|rotate-key|alerts|verify-remote`.

Read-only commands (verify, export, keys) never create state: without a control database they
fail with a clear message (exit 2) instead of creating an empty one and reporting it intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from spe.db import Database

app = typer.Typer(help="Audit log: verify, export, checkpoints, keys, remote verification.",
                  no_args_is_help=True)


def _missing(message: str) -> typer.Exit:
    typer.secho(message, fg="red", err=True)
    return typer.Exit(2)


def existing_database() -> Database:
    """The control database as it is: never created, never migrated."""
    from spe.cli.main import settings

    url = settings().resolved_database_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:" or not Path(path).is_file():
            raise _missing("no control database found (data_dir has none): nothing to verify. "
                           "Check SPE_DATA_DIR / SPE_DATABASE_URL; `spe db upgrade` creates one.")
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
    except SQLAlchemyError:
        db.dispose()
        raise _missing("the control database cannot be reached: check SPE_DATABASE_URL") from None
    if not {"audit_log", "audit_head"} <= tables:
        db.dispose()
        raise _missing("the control database has no audit log (not initialised): "
                       "`spe db upgrade` creates it.")
    return db


@app.command("verify")
def verify() -> None:
    """Recompute the hash chain and check the log against every signed checkpoint; exit 1 at
    the first broken entry, 2 when there is no log to verify."""
    from spe.audit import verify_chain
    from spe.audit.archive import pending_files, verify_with_archive
    from spe.audit.checkpoints import CheckpointLog
    from spe.audit.models import AuditHead
    from spe.audit.proofs import check_against_checkpoints
    from spe.audit.writer import ChainReport
    from spe.cli.main import settings

    data_dir = settings().data_dir
    db = existing_database()
    held = CheckpointLog(data_dir).all()
    archived: list[str] = []
    report: ChainReport
    try:
        with db.read() as session:
            head = session.get(AuditHead, 1)
            if head is not None and head.archived_seq:
                # The archived prefix from its signed files, then the live chain after it.
                full = verify_with_archive(session, data_dir)
                if not full.ok and full.file:
                    typer.secho(f"audit archive {full.file} BROKEN at entry "
                                f"{full.first_bad_seq}: {full.problem}", fg="red", err=True)
                    raise typer.Exit(1)
                pending = full.pending
                report, archived = full, full.hashes
            else:
                pending = pending_files(data_dir, 0)
                report = verify_chain(session)
            for name in pending:
                typer.echo(f"note: {name} is above the archived mark (a run that did not "
                           "commit); ignored, the next archive run rewrites it")
            check = check_against_checkpoints(session, held, archived)
    finally:
        db.dispose()
    if not report.ok:
        typer.secho(f"audit chain BROKEN at entry {report.first_bad_seq}: {report.problem}",
                    fg="red", err=True)
        raise typer.Exit(1)
    if not check.ok:
        typer.secho(f"audit log CONTRADICTS a signed checkpoint, first bad entry "
                    f"{check.first_bad_seq}: {check.problem}", fg="red", err=True)
        raise typer.Exit(1)
    in_files = f" ({len(archived)} of them in signed archive files)" if archived else ""
    suffix = in_files + (f"; matches {check.checked} signed checkpoint(s), the latest of "
              f"{held[-1].size} entries" if held else "; no checkpoint held yet")
    typer.echo(f"audit chain intact: {report.entries} entries{suffix}")


@app.command("archive")
def archive() -> None:
    """Move entries older than audit_retention_days (at least 365) into a signed JSON Lines
    file under data_dir/audit/archive, then remove them from the database; `spe audit verify`
    still covers them. Exit 1 when refused."""
    from spe.audit.archive import ArchiveRefused, archive_expired
    from spe.cli.main import cli_principal, settings

    s = settings()
    principal = cli_principal()
    db = existing_database()
    try:
        run = archive_expired(db, s.data_dir, s.audit_retention_days, actor=principal.actor,
                              role=principal.primary_role())
    except ArchiveRefused as exc:
        typer.secho(f"NOT ARCHIVED: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    if run is None:
        typer.echo(f"nothing older than {s.audit_retention_days} days to archive")
        return
    typer.echo(f"archived entries {run.first_seq}..{run.last_seq} ({run.count}) to {run.path}; "
               f"{run.deleted} removed from the database")


@app.command("export")
def export(
    after: int = typer.Option(0, help="Only entries with a sequence number above this."),
    permit: str | None = typer.Option(None, help="Only this permit's entries."),
) -> None:
    """Write the audit log as JSON lines (one entry per line, with its hashes) to stdout, for
    a SIEM or an auditor; each line verifies on its own with its salt and prev_hash. Each
    line also names its action by its enum name (``action_name``, e.g. ``PERMIT_REVOKE``;
    ``spe audit actions`` lists them with their meanings); that name is not hashed."""
    from spe.audit.actions import action_name
    from spe.audit.proofs import entry_json
    from spe.audit.writer import iter_rows

    db = existing_database()
    try:
        with db.read() as session:
            for row in iter_rows(session, after=after):
                if permit is not None and row[4] != permit:
                    continue
                line = entry_json(row)
                line["action_name"] = action_name(str(line.get("action")))
                typer.echo(json.dumps(line, sort_keys=True))
    finally:
        db.dispose()


@app.command("actions")
def actions() -> None:
    """List every audit action: its enum name, its stored value and what it means."""
    from spe.audit.actions import MEANINGS, AuditAction

    for action in AuditAction:
        typer.echo(f"{action.name:<34} {action.value:<34} {MEANINGS[action]}")


@app.command("checkpoint")
def checkpoint() -> None:
    """Sign a checkpoint of the log now and append it to the write-once checkpoint file
    (refused, exit 1, when the log no longer extends the last checkpoint)."""
    from spe.audit.checkpoints import CheckpointLog, KeyStore, LogTampered
    from spe.audit.proofs import create_checkpoint
    from spe.cli.main import settings

    s = settings()
    db = existing_database()
    try:
        with db.read() as session:
            cp = create_checkpoint(session, KeyStore(s.data_dir), CheckpointLog(s.data_dir),
                                   s.api_base_url)
    except LogTampered as exc:
        typer.secho(f"NOT SIGNED: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    _record_operator_act("audit.checkpoint", {"size": cp.size, "root": cp.root,
                                              "key_id": cp.key_id})
    typer.echo(f"checkpoint signed: {cp.size} entries, root {cp.root}, key {cp.key_id}")


@app.command("keys")
def keys() -> None:
    """List the checkpoint signing keys (public part) with their validity."""
    from spe.audit.checkpoints import KeyStore
    from spe.cli.main import settings

    found = KeyStore(settings().data_dir).public_keys()
    if not found:
        raise _missing("no checkpoint key yet: `spe audit checkpoint` creates one")
    for key in found:
        typer.echo(f"{key.key_id}  {key.algorithm}  from {key.valid_from}  until "
                   f"{key.valid_until or '(current)'}  {key.public_key}")


@app.command("rotate-key")
def rotate_key() -> None:
    """End the current checkpoint key's validity and create the next one."""
    from spe.audit.checkpoints import KeyStore
    from spe.cli.main import settings

    key_id, _ = KeyStore(settings().data_dir).rotate()
    _record_operator_act("audit.key_rotate", {"key_id": key_id})
    typer.echo(f"new checkpoint key {key_id}; earlier keys stay published with their validity")


def _record_operator_act(action: str, details: dict[str, object]) -> None:
    """Audit an operator's act when a control database exists (never create one for it)."""
    from spe.audit import AuditAction, AuditEvent, record
    from spe.cli.main import cli_principal

    try:
        db = existing_database()
    except typer.Exit:
        typer.secho("note: no control database: the act is not in the audit log", err=True)
        return
    principal = cli_principal()
    try:
        with db.write() as session:
            record(session, AuditEvent(action=AuditAction(action), actor=principal.actor,
                                       role=principal.primary_role(), details=details))
    finally:
        db.dispose()


@app.command("alerts")
def alerts_cmd(
    scan: bool = typer.Option(False, "--scan", help="Run the alert rules over the entries "
                              "recorded since the last scan first (records and sends alerts)."),
    limit: int = typer.Option(50, help="How many of the latest alerts to list."),
) -> None:
    """List the latest alerts (audit.alert entries); with --scan, run the rules first."""
    from sqlalchemy import select

    from spe.audit import alerts
    from spe.audit.models import AuditEntry
    from spe.cli.main import settings

    db = existing_database()
    try:
        if scan:
            s = settings()
            found = alerts.scan(db, s.data_dir, alerts.Policy(
                refusals=s.audit_alert_refusals, repeats=s.audit_alert_repeats,
                window_seconds=s.audit_alert_window_seconds),
                webhook_url=s.audit_alert_webhook_url, syslog_address=s.audit_alert_syslog)
            typer.echo(f"scan: {len(found)} new alert(s)")
        with db.read() as session:
            rows = list(session.execute(
                select(AuditEntry).where(AuditEntry.action == "audit.alert")
                .order_by(AuditEntry.seq.desc()).limit(limit)).scalars())
        for entry in reversed(rows):
            d = entry.details
            typer.echo(f"{entry.seq}  {entry.time.isoformat(timespec='seconds')}  "
                       f"{d.get('rule')}  permit={entry.permit_id or '-'}  key={d.get('key')}  "
                       f"count={d.get('count')}  entries {d.get('first_seq')}..{d.get('last_seq')}")
    finally:
        db.dispose()


@app.command("verify-remote")
def verify_remote(
    url: str = typer.Option(..., help="Base URL of the SPE API."),
    permit: str = typer.Option(..., help="The permit whose entries to verify."),
    token_env: str = typer.Option("SPE_TOKEN", help="Environment variable with the token."),
    state: Path | None = typer.Option(None, help="File of the last verified checkpoint."),
    keys_file: Path | None = typer.Option(None, "--keys", help="Pinned public keys (JSON)."),
) -> None:
    """Verify one permit's entries against the SPE's latest signed checkpoint, as an access
    body does (same code as the standalone spe/audit/verify_remote.py)."""
    from spe.audit import verify_remote as vr

    argv = ["--url", url, "--permit", permit, "--token-env", token_env]
    if state is not None:
        argv += ["--state", str(state)]
    if keys_file is not None:
        argv += ["--keys", str(keys_file)]
    code = vr.main(argv)
    if code:
        raise typer.Exit(code)
