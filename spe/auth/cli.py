"""`spe auth ...`: operator commands of the identity package (a Typer sub-app).

Mount it in ``spe.cli.main`` with ``app.add_typer(auth_cli.app, name="auth")``.

* ``spe auth rotate-key [--compromised]``: new workspace-token signing key; older keys keep
  verifying until their tokens expire, or stop at once with ``--compromised``.
* ``spe auth revoke-workspace WORKSPACE_ID`` / ``spe auth revoke-permit PERMIT_ID``: revoke
  live workspace tokens (audited, as the operator running the command).
"""

from __future__ import annotations

import typer

app = typer.Typer(help="Identity: workspace-token keys and revocation.", no_args_is_help=True)


@app.command("rotate-key")
def rotate_key(
    compromised: bool = typer.Option(False, "--compromised",
                                     help="retire every older key now (suspected compromise)"),
) -> None:
    """Create a new workspace-token signing key."""
    from spe.auth.keys import rotate_signing_key
    from spe.cli.main import cli_principal, database, settings

    db = database()
    with db.write() as session:
        kid = rotate_signing_key(session, settings(), actor=cli_principal(),
                                 retire_previous_now=compromised)
    typer.echo(f"new signing key {kid}" + (" (older keys retired now)" if compromised else ""))


@app.command("revoke-workspace")
def revoke_workspace(workspace_id: str) -> None:
    """Revoke every live token of a workspace."""
    from spe.auth.workspace_tokens import revoke_workspace_tokens
    from spe.cli.main import cli_principal, database

    with database().write() as session:
        count = revoke_workspace_tokens(session, workspace_id, actor=cli_principal(),
                                        reason="revoked by operator")
    typer.echo(f"revoked {count} token(s) of workspace {workspace_id}")


@app.command("revoke-permit")
def revoke_permit(permit_id: str) -> None:
    """Revoke every live workspace token of a permit."""
    from spe.auth.workspace_tokens import revoke_permit_tokens
    from spe.cli.main import cli_principal, database

    with database().write() as session:
        count = revoke_permit_tokens(session, permit_id, actor=cli_principal(),
                                     reason="revoked by operator")
    typer.echo(f"revoked {count} token(s) of permit {permit_id}")
