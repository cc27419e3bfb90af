"""`spe incident freeze|thaw|status|evidence`: the incident switch (see spe.audit.incident).

A freeze refuses the permit's workspace tokens (queries, token refreshes, new tokens) and
deletes nothing; a thaw needs a reason; both are audit entries. ``evidence`` writes a signed
bundle for the access body. These commands never create a control database.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

app = typer.Typer(help="Incident switch: freeze, gather evidence, thaw.", no_args_is_help=True)


def _scope(permit: str | None, all_permits: bool) -> str | None:
    if (permit is None) == (not all_permits):
        typer.secho("name exactly one of --permit ID or --all", fg="red", err=True)
        raise typer.Exit(2)
    return permit


@app.command("freeze")
def freeze(
    permit: str | None = typer.Option(None, help="The permit to freeze."),
    all_permits: bool = typer.Option(False, "--all", help="Freeze every permit."),
    reason: str = typer.Option(..., help="Why (recorded in the audit log)."),
) -> None:
    """Freeze a permit (or all): its workspace tokens are refused, nothing is deleted."""
    from spe.audit import incident
    from spe.cli.audit import existing_database
    from spe.cli.main import cli_principal

    permit_id = _scope(permit, all_permits)
    db = existing_database()
    principal = cli_principal()
    try:
        seq = incident.freeze(db, actor=principal.actor, role=principal.primary_role(),
                              permit_id=permit_id, reason=reason)
    finally:
        db.dispose()
    typer.echo(f"frozen: {permit_id or 'all permits'} (audit entry {seq})")


@app.command("thaw")
def thaw(
    permit: str | None = typer.Option(None, help="The permit to thaw."),
    all_permits: bool = typer.Option(False, "--all", help="Lift the freeze of all permits."),
    reason: str = typer.Option(..., help="Why the freeze can end (recorded)."),
) -> None:
    """Lift a freeze, with a recorded reason."""
    from spe.audit import incident
    from spe.cli.audit import existing_database
    from spe.cli.main import cli_principal

    permit_id = _scope(permit, all_permits)
    if not reason.strip():
        typer.secho("a thaw needs a reason", fg="red", err=True)
        raise typer.Exit(2)
    db = existing_database()
    principal = cli_principal()
    try:
        seq = incident.thaw(db, actor=principal.actor, role=principal.primary_role(),
                            permit_id=permit_id, reason=reason)
    finally:
        db.dispose()
    typer.echo(f"thawed: {permit_id or 'all permits'} (audit entry {seq})")


@app.command("status")
def status() -> None:
    """What is frozen now."""
    from spe.audit import incident
    from spe.cli.audit import existing_database

    db = existing_database()
    try:
        with db.read() as session:
            state = incident.frozen_state(session)
    finally:
        db.dispose()
    typer.echo(f"all permits frozen: {'yes' if state['all'] else 'no'}")
    for pid in state["permits"]:
        typer.echo(f"frozen: {pid}")


@app.command("evidence")
def evidence(
    permit: str = typer.Option(..., help="The permit the evidence is for."),
    out: Path = typer.Option(..., help="File to write the signed bundle to (created, 0600)."),
) -> None:
    """Write a signed evidence bundle: a fresh checkpoint, keys, held checkpoints with
    consistency proofs, the permit's audit entries with inclusion proofs, its DP release
    receipts, export requests (with the receipts they cite) and versions."""
    from sqlalchemy import select

    from permits.models import PermitVersion
    from spe.airlock.models import ExportRequest
    from spe.audit import incident
    from spe.audit.checkpoints import CheckpointLog, KeyStore, LogTampered
    from spe.cli.audit import existing_database
    from spe.cli.main import cli_principal, settings

    s = settings()
    db = existing_database()
    principal = cli_principal()
    try:
        with db.read() as session:
            versions = [{"version": v.version, "change": v.change, "status": v.status,
                         "snapshot": v.snapshot, "changed_fields": v.changed_fields,
                         "actor": v.actor, "reason": v.reason, "time": v.time.isoformat()}
                        for v in session.execute(select(PermitVersion)
                                                 .where(PermitVersion.permit_id == permit)
                                                 .order_by(PermitVersion.version)).scalars()]
            exports = [{"request_id": r.id, "state": r.state, "requester": r.requester,
                        "round": r.round, "receipts": r.receipts or [],
                        "created_at": r.created_at.isoformat()}
                       for r in session.execute(select(ExportRequest)
                                                .where(ExportRequest.permit_id == permit)
                                                .order_by(ExportRequest.created_at)).scalars()]
        signed = incident.evidence(db, KeyStore(s.data_dir), CheckpointLog(s.data_dir),
                                   s.api_base_url, permit, actor=principal.actor,
                                   role=principal.primary_role(),
                                   extra={"permit_versions": versions,
                                          "export_requests": exports})
    except LogTampered as exc:
        typer.secho(f"NO EVIDENCE SIGNED: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(signed, fh, indent=1, sort_keys=True)
    bundle = signed["bundle"]
    typer.echo(f"evidence for permit {permit}: {len(bundle['audit']['entries'])} entries, "
               f"{len(versions)} permit versions, "
               f"{len(bundle['dp_release_receipts'])} DP release receipts, "
               f"{len(exports)} export requests, checkpoint of {bundle['checkpoint']['size']} "
               f"entries; signed with key {signed['key_id']}")
